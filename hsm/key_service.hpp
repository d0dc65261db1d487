// KeyService: the narrow seam between vaultfs and whatever holds its keys.
//
// Key hierarchy (DESIGN §3):
//   token ── KEK (AES-256, one per vault, generated inside the token,
//   │             sensitive, never extractable, encrypt/decrypt only)
//   │          └─ seals each version's DEK (CKM_AES_GCM, AAD binds the row)
//   └─ audit signing key (EC P-256, sign only; public half exported)
//
// No key material ever crosses this interface outwards: callers get key ids,
// sealed blobs, signatures and public keys. Unsealed DEKs come back in locked
// memory.
//
// Thread-safety: every method may be called from any thread concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "hsm/error.hpp"
#include "hsm/secure_buffer.hpp"

namespace vaultfs::hsm {

// The token object's CKA_ID, as lowercase hex (stored in the database).
struct KeyId {
    std::string hex;
    bool operator==(const KeyId&) const = default;
};

inline constexpr std::size_t dek_size = 32;

class KeyService {
public:
    virtual ~KeyService() = default;

    // Generates a new AES-256 KEK inside the token: CKA_SENSITIVE, not
    // extractable, encrypt/decrypt only (every usage flag set explicitly).
    virtual Result<KeyId> create_kek(const std::string& label) = 0;

    // Succeeds when a key with this id exists in the token.
    virtual Result<void> find_key(const KeyId& id) = 0;

    // Seals a 32-byte DEK under the KEK with AES-GCM and `aad`. The blob is
    // iv(12) | ciphertext(32) | tag(16).
    virtual Result<std::vector<std::uint8_t>> seal(const KeyId& kek, const SecureBuffer& dek,
                                                   std::span<const std::uint8_t> aad) = 0;

    // Reverses seal(). Errc::authentication_failed when the blob or the AAD
    // has been altered.
    virtual Result<SecureBuffer> unseal(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                        std::span<const std::uint8_t> aad) = 0;

    // Generates an EC P-256 signing key pair in the token (private half
    // sensitive, not extractable, sign only).
    virtual Result<KeyId> create_signing_key(const std::string& label) = 0;

    // The signing key's public point, uncompressed (0x04 | X | Y, 65 bytes).
    virtual Result<std::vector<std::uint8_t>> public_point(const KeyId& key) = 0;

    // ECDSA over a SHA-256 digest; the signature is r | s (64 bytes).
    virtual Result<std::vector<std::uint8_t>> sign_digest(const KeyId& key,
                                                          std::span<const std::uint8_t, 32> digest) = 0;

    // A cheap round trip to the token (for status and health checks).
    virtual Result<void> ping() = 0;
};

}  // namespace vaultfs::hsm
