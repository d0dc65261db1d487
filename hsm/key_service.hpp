// KeyService: the narrow seam between vaultfs and whatever holds its keys.
//
// Key hierarchy (docs/design.md §3):
//   token ── KEK (AES-256, one per vault, generated inside the token,
//   │             sensitive, encrypt/decrypt only; never extractable on
//   │             one host, extractable only under keys the token's
//   │             Security Officer trusts on a shared store (KekReach);
//   │             with a MAC key beside it on tokens without GCM)
//   │          └─ seals each version's DEK (AES-GCM, or AES-CBC-PAD +
//   │             HMAC-SHA256; the AAD binds the row: mechanisms.hpp)
//   └─ audit signing key (EC P-256 or RSA-3072, sign only; public half
//                         exported)
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

// Where a KEK may ever go (SECURITY.md "What each key is, and who can move it").
enum class KekReach {
    // One host: CKA_EXTRACTABLE false (and so CKA_NEVER_EXTRACTABLE): no
    // key, trusted or not, wraps it out of the token, whoever holds the PIN.
    this_token,
    // A shared store: CKA_EXTRACTABLE with CKA_WRAP_WITH_TRUSTED, so that
    // only a key the token's Security Officer marked CKA_TRUSTED (an
    // enrolled host's transport key) can wrap it. The user PIN alone wraps
    // it for nobody.
    trusted_tokens,
};

class KeyService {
public:
    virtual ~KeyService() = default;

    // Generates a new KEK inside the token for the state's seal scheme: an
    // AES-256 key, CKA_SENSITIVE, encrypt/decrypt only (every usage flag
    // set explicitly), extractable as `reach` says; and for
    // aes-cbc-pad+hmac-sha256 its MAC key, sign/verify only (such a pair
    // never leaves the token, whatever `reach`).
    virtual Result<KeyId> create_kek(const std::string& label, KekReach reach) = 0;

    // Succeeds when a key with this id exists in the token.
    virtual Result<void> find_key(const KeyId& id) = 0;

    // Seals a 32-byte DEK under the KEK, bound to `aad`, with the state's
    // seal scheme (mechanisms.hpp gives each blob's layout).
    virtual Result<std::vector<std::uint8_t>> seal(const KeyId& kek, const SecureBuffer& dek,
                                                   std::span<const std::uint8_t> aad) = 0;

    // Reverses seal(). Errc::authentication_failed when the blob or the AAD
    // has been altered.
    virtual Result<SecureBuffer> unseal(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                        std::span<const std::uint8_t> aad) = 0;

    // Generates the signing key pair of the state's signature scheme in the
    // token (EC P-256 or RSA-3072; private half sensitive, not extractable,
    // sign only).
    virtual Result<KeyId> create_signing_key(const std::string& label) = 0;

    // A key pair's public half as DER SubjectPublicKeyInfo.
    virtual Result<std::vector<std::uint8_t>> public_key_der(const KeyId& key) = 0;

    // Signs a SHA-256 digest with the state's signature scheme: ECDSA r | s
    // (64 bytes) or RSA-PSS (mechanisms.hpp).
    virtual Result<std::vector<std::uint8_t>> sign_digest(const KeyId& key,
                                                          std::span<const std::uint8_t, 32> digest) = 0;

    // A cheap round trip to the token (for status and health checks).
    virtual Result<void> ping() = 0;
};

}  // namespace vaultfs::hsm
