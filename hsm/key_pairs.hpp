// KeyPairService: application key pairs held in the token -- the keys and
// non-exportable certificate keys of vaults (docs/keys-and-certificates.md "Certificates and
// keys"), as opposed to vaultfs's own keys (key_service.hpp).
//
//   token ── application key pair (RSA 2048/3072/4096 or EC P-256/384/521)
//            private half: sensitive, never extractable, only the usages
//            asked for; public half: exported as SPKI
//
// What crosses this seam: key ids, public keys, signatures and decrypted
// data (in locked memory). Never a private key.
//
// Thread-safety: every method may be called from any thread concurrently.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/error.hpp"
#include "hsm/key_service.hpp"
#include "hsm/secure_buffer.hpp"

namespace vaultfs::hsm {

enum class KeyType { rsa_2048, rsa_3072, rsa_4096, ec_p256, ec_p384, ec_p521 };

// "rsa-2048", "ec-p256", ...; nullopt for anything else.
std::optional<KeyType> key_type_from(std::string_view text);
std::string_view to_string(KeyType type);
bool is_rsa(KeyType type);

// What the private half may do (its CKA_SIGN / CKA_DECRYPT).
struct KeyUsage {
    bool sign = false;
    bool decrypt = false;  // RSA only; unwrapping a key is a decrypt
    bool unwrap = false;   // RSA only: a transport key (C_WrapKey/C_UnwrapKey, nothing else)
};

enum class Digest { sha1, sha256, sha384, sha512 };
std::size_t digest_size(Digest d);

// A private-key operation, named as the token does it.
struct Mechanism {
    enum class Kind {
        rsa_pkcs1_sign,  // RSASSA-PKCS1-v1_5 over a digest (the DigestInfo is added here)
        rsa_pss,         // RSASSA-PSS over a digest, MGF1 and salt of the digest's size
        ecdsa,           // ECDSA over a digest; the signature comes back as r | s
        rsa_oaep,        // RSAES-OAEP decryption with `digest` for the hash and MGF1
        rsa_pkcs1_decrypt,  // RSAES-PKCS1-v1_5 decryption
    };
    Kind kind;
    Digest digest = Digest::sha256;
};

class KeyPairService {
public:
    virtual ~KeyPairService() = default;

    // Generates a key pair inside the token, both halves token objects with
    // `label` and a fresh random CKA_ID (returned). The private half is
    // CKA_SENSITIVE, not extractable, and holds exactly `usage`.
    virtual Result<KeyId> create_key_pair(KeyType type, const std::string& label, KeyUsage usage) = 0;

    // The public half as DER SubjectPublicKeyInfo.
    virtual Result<std::vector<std::uint8_t>> public_key_der(const KeyId& key) = 0;

    // Signs `digest` (of the size the mechanism's digest has; else
    // Errc::invalid_argument). Errc::not_permitted when the key may not sign.
    virtual Result<std::vector<std::uint8_t>> sign(const KeyId& key, Mechanism mechanism,
                                                   std::span<const std::uint8_t> digest) = 0;

    // Decrypts `data`. Errc::authentication_failed when the token rejects
    // the ciphertext (wrong key, wrong padding); Errc::not_permitted when the
    // key may not decrypt.
    virtual Result<SecureBuffer> decrypt(const KeyId& key, Mechanism mechanism,
                                         std::span<const std::uint8_t> data) = 0;

    // Removes both halves from the token (a purge). A key already gone is fine.
    virtual Result<void> destroy_key_pair(const KeyId& key) = 0;

    // Moves on every time the token connection was re-made: what was built
    // on the old one (libp11's EVP_PKEYs, token_evp.hpp) must be rebuilt.
    virtual std::uint64_t connection_epoch() const = 0;
};

}  // namespace vaultfs::hsm
