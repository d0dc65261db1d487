// x509: the X.509 work of certificates, with OpenSSL 3 and nothing else --
// software key pairs for exportable certificates, certificates and CSRs
// built and signed by whatever EVP_PKEY is given (a software key, or a
// token key through libp11: hsm/pkcs11/token_evp.hpp), PEM and PKCS#12 in and out.
// Pure: no paths, policies, storage or token sessions.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <chrono>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/key_pairs.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/model/error.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault::certificates {

struct PkeyFree {
    void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct X509Free {
    void operator()(X509* p) const { X509_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Cert = std::unique_ptr<X509, X509Free>;

// A new key pair in software (for exportable certificates only).
Result<Pkey> generate_key(hsm::KeyType type);
// PKCS#8 DER of a private key, in locked memory; and back.
Result<hsm::SecureBuffer> private_key_der(EVP_PKEY* key);
Result<Pkey> private_key_from_der(std::span<const std::uint8_t> der);
// PEM ("-----BEGIN PRIVATE KEY-----") of a PKCS#8 DER, in locked memory.
Result<hsm::SecureBuffer> private_key_pem(std::span<const std::uint8_t> der);

std::vector<std::uint8_t> spki_of(EVP_PKEY* key);
Result<Pkey> public_key_from_spki(std::span<const std::uint8_t> der);

// What a certificate says. `subject` is "CN=web,O=Example" (comma-separated
// RDNs); `sans` "DNS:a.example,IP:10.0.0.1".
struct Request {
    std::string subject;
    std::string sans;
    Micros not_before = 0;
    Micros not_after = 0;
    bool ca = false;  // a CA certificate (basicConstraints CA:TRUE, keyCertSign)
};

// Errc::invalid_argument naming what does not parse (a subject, a SAN).
Result<void> check_request(const Request& r);

// A certificate for `subject_key` (SPKI), issued by `issuer` (nullptr:
// self-signed) and signed by `signer` (the issuer's key, or the subject's
// own for a self-signed one).
Result<Cert> issue(const Request& r, EVP_PKEY* subject_key, X509* issuer, EVP_PKEY* signer);
// A PKCS#10 request for `r`, signed by the subject's key.
Result<std::string> make_csr(const Request& r, EVP_PKEY* subject_key, EVP_PKEY* signer);

std::string to_pem(X509* cert);
// Every certificate in a PEM text, in order. Errc::invalid_argument when
// there is none or one does not parse.
Result<std::vector<Cert>> certs_from_pem(std::string_view pem);
// A PEM text with at most one private key and certificates, or a PKCS#12
// file (with `password`, often empty). The key is checked against the first
// (leaf) certificate.
struct Imported {
    Pkey key;  // may be empty for a PEM without one
    std::vector<Cert> chain;  // leaf first
};
Result<Imported> import(std::span<const std::uint8_t> data, const std::string& password);
// A PKCS#12 file of key and chain (password "", AES-256 and PBKDF2, as
// OpenSSL 3 does by default), in locked memory.
Result<hsm::SecureBuffer> to_pkcs12(EVP_PKEY* key, const std::vector<X509*>& chain, std::string_view friendly_name);

Micros not_after_of(X509* cert);
Micros not_before_of(X509* cert);
// Whether `key` is the subject key of `cert`.
bool matches(X509* cert, std::span<const std::uint8_t> spki);
// The key type of a public key (rsa-2048, ec-p256, ...), if vaultfs knows it.
std::optional<hsm::KeyType> key_type_of(EVP_PKEY* key);

}  // namespace vaultfs::vault::certificates
