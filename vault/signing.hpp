// signing: the digests and signatures shared by the audit trail and backups.
// The token signs (hsm::KeyService::sign_digest, ECDSA P-256 over a SHA-256
// digest, r | s); anyone holding the public half checks, with no token.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/hex.hpp"
#include "vault/error.hpp"

struct evp_pkey_st;  // OpenSSL's EVP_PKEY

namespace vaultfs::vault {

using hsm::from_hex;
using hsm::to_hex;

std::array<std::uint8_t, 32> sha256(std::string_view data);
std::string sha256_hex(std::string_view data);

// Checks ECDSA P-256 signatures (r | s, 64 bytes) over SHA-256 digests with
// a PEM public key.
class P256Verifier {
public:
    explicit P256Verifier(const std::string& public_key_pem);
    ~P256Verifier();
    P256Verifier(const P256Verifier&) = delete;
    P256Verifier& operator=(const P256Verifier&) = delete;
    bool usable() const { return key_ != nullptr; }
    bool verify(std::span<const std::uint8_t, 32> digest, std::span<const std::uint8_t> signature) const;

private:
    ::evp_pkey_st* key_ = nullptr;
};

// PEM (SubjectPublicKeyInfo) for an uncompressed P-256 point.
Result<std::string> p256_public_key_pem(const std::vector<std::uint8_t>& point);

// The same key, whatever the PEM's line breaks: compares the keys the two
// PEM texts hold. False when either does not parse.
bool same_public_key(const std::string& pem_a, const std::string& pem_b);

}  // namespace vaultfs::vault
