// signing: the digests and signatures shared by the audit trail and backups.
// The token signs (hsm::KeyService::sign_digest over a SHA-256 digest:
// ECDSA P-256 as r | s, or RSA-PSS; hsm/pkcs11/mechanisms.hpp); anyone holding the
// public half checks, with no token. The key decides the scheme, never the
// signed data.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/hex.hpp"
#include "hsm/key_service.hpp"
#include "vault/model/error.hpp"

struct evp_pkey_st;  // OpenSSL's EVP_PKEY

namespace vaultfs::vault {

using hsm::from_hex;
using hsm::to_hex;

std::array<std::uint8_t, 32> sha256(std::string_view data);
std::string sha256_hex(std::string_view data);

// Checks audit signatures over SHA-256 digests with a PEM public key: a
// P-256 key checks ECDSA r | s (64 bytes); an RSA key of 3072 bits or more
// checks RSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt). Any other key is
// not usable.
class SignatureVerifier {
public:
    explicit SignatureVerifier(const std::string& public_key_pem);
    ~SignatureVerifier();
    SignatureVerifier(const SignatureVerifier&) = delete;
    SignatureVerifier& operator=(const SignatureVerifier&) = delete;
    bool usable() const { return key_ != nullptr; }
    bool verify(std::span<const std::uint8_t, 32> digest, std::span<const std::uint8_t> signature) const;

private:
    ::evp_pkey_st* key_ = nullptr;
    bool rsa_ = false;
};

// PEM for a DER SubjectPublicKeyInfo (hsm::KeyService::public_key_der).
Result<std::string> public_key_pem(const std::vector<std::uint8_t>& spki_der);

// A token key pair's public half as PEM; Errc::key_unavailable, with the
// token's reason, if the token cannot give it.
Result<std::string> public_key_pem(hsm::KeyService& keys, const hsm::KeyId& key);

// The same key, whatever the PEM's line breaks: compares the keys the two
// PEM texts hold. False when either does not parse.
bool same_public_key(const std::string& pem_a, const std::string& pem_b);

}  // namespace vaultfs::vault
