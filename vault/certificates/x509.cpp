#include "vault/certificates/x509.hpp"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include <cstring>

namespace vaultfs::vault::certificates {

namespace {

struct BioFree {
    void operator()(BIO* b) const { BIO_free(b); }
};
using Bio = std::unique_ptr<BIO, BioFree>;

// Drains OpenSSL's error queue into one line (never key material).
std::string openssl_error()
{
    std::string out;
    while (const unsigned long e = ERR_get_error()) {
        char buf[256];
        ERR_error_string_n(e, buf, sizeof buf);
        if (!out.empty())
            out += "; ";
        out += buf;
    }
    return out.empty() ? "unknown OpenSSL error" : out;
}

std::string_view trim(std::string_view s)
{
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
        s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
        s.remove_suffix(1);
    return s;
}

// "CN=web,O=Example" as an X509_NAME.
Result<X509_NAME*> parse_subject(std::string_view text)
{
    X509_NAME* name = X509_NAME_new();
    std::size_t start = 0;
    bool any = false;
    while (start < text.size()) {
        const std::size_t comma = std::min(text.find(',', start), text.size());
        const std::string_view rdn = trim(text.substr(start, comma - start));
        const std::size_t eq = rdn.find('=');
        if (eq == std::string_view::npos || eq == 0 || eq + 1 >= rdn.size()) {
            X509_NAME_free(name);
            return fail(Errc::invalid_argument, "the subject '" + std::string(text) +
                                                    "' is not KEY=VALUE,... (like CN=web.example,O=Example)");
        }
        const std::string key(trim(rdn.substr(0, eq)));
        const std::string value(trim(rdn.substr(eq + 1)));
        if (X509_NAME_add_entry_by_txt(name, key.c_str(), MBSTRING_UTF8,
                                       reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1, 0) != 1) {
            X509_NAME_free(name);
            ERR_clear_error();
            return fail(Errc::invalid_argument, "the subject names an unknown attribute '" + key + "'");
        }
        any = true;
        start = comma + 1;
    }
    if (!any) {
        X509_NAME_free(name);
        return fail(Errc::invalid_argument, "a certificate needs a subject (--subject CN=...)");
    }
    return name;
}

Result<void> check_sans(std::string_view sans)
{
    std::size_t start = 0;
    while (start < sans.size()) {
        const std::size_t comma = std::min(sans.find(',', start), sans.size());
        const std::string_view one = trim(sans.substr(start, comma - start));
        const bool dns = one.starts_with("DNS:") && one.size() > 4;
        bool ip = false;
        if (one.starts_with("IP:") && one.size() > 3) {
            const std::string addr(one.substr(3));
            ASN1_OCTET_STRING* parsed = a2i_IPADDRESS(addr.c_str());
            ip = parsed != nullptr;
            ASN1_OCTET_STRING_free(parsed);
            ERR_clear_error();
        }
        const bool email = one.starts_with("email:") && one.size() > 6;
        const bool uri = one.starts_with("URI:") && one.size() > 4;
        if (!dns && !ip && !email && !uri)
            return fail(Errc::invalid_argument, "the SAN '" + std::string(one) +
                                                    "' is not DNS:name, IP:address, email:address or URI:uri");
        start = comma + 1;
    }
    return {};
}

Result<void> add_ext(X509* cert, X509* issuer, int nid, const char* value)
{
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer != nullptr ? issuer : cert, cert, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    if (ext == nullptr)
        return fail(Errc::invalid_argument, std::string("cannot make the extension ") + OBJ_nid2sn(nid) + "=" +
                                                value + ": " + openssl_error());
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return {};
}

Micros micros_of(const ASN1_TIME* t)
{
    struct tm tm {};
    if (ASN1_TIME_to_tm(t, &tm) != 1)
        return 0;
    return static_cast<Micros>(timegm(&tm)) * 1000000;
}

Result<hsm::SecureBuffer> to_secure(BIO* bio)
{
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio, &data);
    auto out = hsm::SecureBuffer::allocate(static_cast<std::size_t>(n));
    if (!out)
        return fail(Errc::out_of_memory, out.error().message);
    std::memcpy(out->data(), data, static_cast<std::size_t>(n));
    OPENSSL_cleanse(data, static_cast<std::size_t>(n));
    return std::move(*out);
}

}  // namespace

Result<Pkey> generate_key(hsm::KeyType type)
{
    EVP_PKEY* key = nullptr;
    switch (type) {
    case hsm::KeyType::rsa_2048:
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048});
        break;
    case hsm::KeyType::rsa_3072:
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{3072});
        break;
    case hsm::KeyType::rsa_4096:
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{4096});
        break;
    case hsm::KeyType::ec_p256:
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
        break;
    case hsm::KeyType::ec_p384:
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384");
        break;
    case hsm::KeyType::ec_p521:
        key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-521");
        break;
    }
    if (key == nullptr)
        return fail(Errc::key_unavailable, "cannot generate a key: " + openssl_error());
    return Pkey(key);
}

Result<hsm::SecureBuffer> private_key_der(EVP_PKEY* key)
{
    PKCS8_PRIV_KEY_INFO* p8 = EVP_PKEY2PKCS8(key);
    if (p8 == nullptr)
        return fail(Errc::key_unavailable, "cannot encode a private key: " + openssl_error());
    const int len = i2d_PKCS8_PRIV_KEY_INFO(p8, nullptr);
    auto out = hsm::SecureBuffer::allocate(static_cast<std::size_t>(std::max(len, 0)));
    if (!out) {
        PKCS8_PRIV_KEY_INFO_free(p8);
        return fail(Errc::out_of_memory, out.error().message);
    }
    unsigned char* p = out->data();
    i2d_PKCS8_PRIV_KEY_INFO(p8, &p);
    PKCS8_PRIV_KEY_INFO_free(p8);
    return std::move(*out);
}

Result<Pkey> private_key_from_der(std::span<const std::uint8_t> der)
{
    const unsigned char* p = der.data();
    PKCS8_PRIV_KEY_INFO* p8 = d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p, static_cast<long>(der.size()));
    if (p8 == nullptr)
        return fail(Errc::integrity, "a stored private key does not parse");
    EVP_PKEY* key = EVP_PKCS82PKEY(p8);
    PKCS8_PRIV_KEY_INFO_free(p8);
    if (key == nullptr)
        return fail(Errc::integrity, "a stored private key does not parse");
    return Pkey(key);
}

Result<hsm::SecureBuffer> private_key_pem(std::span<const std::uint8_t> der)
{
    auto key = private_key_from_der(der);
    if (!key)
        return tl::unexpected(key.error());
    Bio bio(BIO_new(BIO_s_secmem()));
    if (!bio || PEM_write_bio_PrivateKey(bio.get(), key->get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
        return fail(Errc::out_of_memory, "cannot write a private key: " + openssl_error());
    return to_secure(bio.get());
}

std::vector<std::uint8_t> spki_of(EVP_PKEY* key)
{
    const int len = i2d_PUBKEY(key, nullptr);
    std::vector<std::uint8_t> out(static_cast<std::size_t>(std::max(len, 0)));
    unsigned char* p = out.data();
    i2d_PUBKEY(key, &p);
    return out;
}

Result<Pkey> public_key_from_spki(std::span<const std::uint8_t> der)
{
    const unsigned char* p = der.data();
    EVP_PKEY* key = d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size()));
    if (key == nullptr)
        return fail(Errc::integrity, "a stored public key does not parse");
    return Pkey(key);
}

Result<void> check_request(const Request& r)
{
    auto name = parse_subject(r.subject);
    if (!name)
        return tl::unexpected(name.error());
    X509_NAME_free(*name);
    if (auto s = check_sans(r.sans); !s)
        return s;
    if (r.not_after <= r.not_before)
        return fail(Errc::invalid_argument, "a certificate's validity must be positive");
    return {};
}

Result<Cert> issue(const Request& r, EVP_PKEY* subject_key, X509* issuer, EVP_PKEY* signer)
{
    auto name = parse_subject(r.subject);
    if (!name)
        return tl::unexpected(name.error());
    Cert cert(X509_new());
    X509_set_version(cert.get(), 2);
    std::uint8_t serial[16];
    RAND_bytes(serial, sizeof serial);
    serial[0] &= 0x7f;  // positive
    BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
    BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
    BN_free(bn);
    X509_set_subject_name(cert.get(), *name);
    X509_set_issuer_name(cert.get(), issuer != nullptr ? X509_get_subject_name(issuer) : *name);
    X509_NAME_free(*name);
    ASN1_TIME_set(X509_getm_notBefore(cert.get()), static_cast<time_t>(r.not_before / 1000000));
    ASN1_TIME_set(X509_getm_notAfter(cert.get()), static_cast<time_t>(r.not_after / 1000000));
    X509_set_pubkey(cert.get(), subject_key);
    if (auto e = add_ext(cert.get(), issuer, NID_basic_constraints, r.ca ? "critical,CA:TRUE" : "critical,CA:FALSE"); !e)
        return tl::unexpected(e.error());
    if (auto e = add_ext(cert.get(), issuer, NID_key_usage,
                         r.ca ? "critical,keyCertSign,cRLSign,digitalSignature"
                              : "critical,digitalSignature,keyEncipherment");
        !e)
        return tl::unexpected(e.error());
    if (!r.ca)
        if (auto e = add_ext(cert.get(), issuer, NID_ext_key_usage, "serverAuth,clientAuth"); !e)
            return tl::unexpected(e.error());
    if (auto e = add_ext(cert.get(), issuer, NID_subject_key_identifier, "hash"); !e)
        return tl::unexpected(e.error());
    if (issuer != nullptr)
        if (auto e = add_ext(cert.get(), issuer, NID_authority_key_identifier, "keyid:always"); !e)
            return tl::unexpected(e.error());
    if (!r.sans.empty())
        if (auto e = add_ext(cert.get(), issuer, NID_subject_alt_name, r.sans.c_str()); !e)
            return tl::unexpected(e.error());
    if (X509_sign(cert.get(), signer, EVP_sha256()) <= 0)
        return fail(Errc::key_unavailable, "signing the certificate failed: " + openssl_error());
    return cert;
}

Result<std::string> make_csr(const Request& r, EVP_PKEY* subject_key, EVP_PKEY* signer)
{
    auto name = parse_subject(r.subject);
    if (!name)
        return tl::unexpected(name.error());
    X509_REQ* req = X509_REQ_new();
    X509_REQ_set_version(req, 0);
    X509_REQ_set_subject_name(req, *name);
    X509_NAME_free(*name);
    X509_REQ_set_pubkey(req, subject_key);
    if (!r.sans.empty()) {
        STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
        X509V3_CTX ctx;
        X509V3_set_ctx_nodb(&ctx);
        X509V3_set_ctx(&ctx, nullptr, nullptr, req, nullptr, 0);
        X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, NID_subject_alt_name, r.sans.c_str());
        if (ext != nullptr)
            sk_X509_EXTENSION_push(exts, ext);
        X509_REQ_add_extensions(req, exts);
        sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    }
    if (X509_REQ_sign(req, signer, EVP_sha256()) <= 0) {
        X509_REQ_free(req);
        return fail(Errc::key_unavailable, "signing the CSR failed: " + openssl_error());
    }
    Bio bio(BIO_new(BIO_s_mem()));
    PEM_write_bio_X509_REQ(bio.get(), req);
    X509_REQ_free(req);
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(n));
}

std::string to_pem(X509* cert)
{
    Bio bio(BIO_new(BIO_s_mem()));
    PEM_write_bio_X509(bio.get(), cert);
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(n));
}

Result<std::vector<Cert>> certs_from_pem(std::string_view pem)
{
    Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    std::vector<Cert> out;
    while (X509* c = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr))
        out.emplace_back(c);
    const unsigned long last = ERR_peek_last_error();
    ERR_clear_error();
    if (out.empty() || (last != 0 && ERR_GET_REASON(last) != PEM_R_NO_START_LINE))
        return fail(Errc::invalid_argument, "no certificate in the PEM text, or one does not parse");
    return out;
}

Result<Imported> import(std::span<const std::uint8_t> data, const std::string& password)
{
    Imported out;
    const std::string_view text(reinterpret_cast<const char*>(data.data()), data.size());
    if (text.find("-----BEGIN") != std::string_view::npos) {
        auto chain = certs_from_pem(text);
        if (!chain)
            return tl::unexpected(chain.error());
        out.chain = std::move(*chain);
        Bio bio(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
        EVP_PKEY* key = PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, const_cast<char*>(password.c_str()));
        ERR_clear_error();
        out.key.reset(key);
    } else {
        Bio bio(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
        PKCS12* p12 = d2i_PKCS12_bio(bio.get(), nullptr);
        if (p12 == nullptr) {
            ERR_clear_error();
            return fail(Errc::invalid_argument, "the file is neither PEM nor PKCS#12");
        }
        EVP_PKEY* key = nullptr;
        X509* leaf = nullptr;
        STACK_OF(X509)* ca = nullptr;
        const int ok = PKCS12_parse(p12, password.c_str(), &key, &leaf, &ca);
        PKCS12_free(p12);
        if (ok != 1 || leaf == nullptr) {
            ERR_clear_error();
            EVP_PKEY_free(key);
            X509_free(leaf);
            sk_X509_pop_free(ca, X509_free);
            return fail(Errc::invalid_argument, "the PKCS#12 file does not open (a wrong password?)");
        }
        out.key.reset(key);
        out.chain.emplace_back(leaf);
        for (int i = 0; ca != nullptr && i < sk_X509_num(ca); ++i)
            out.chain.emplace_back(sk_X509_value(ca, i));
        sk_X509_free(ca);
    }
    if (out.key && X509_check_private_key(out.chain.front().get(), out.key.get()) != 1) {
        ERR_clear_error();
        return fail(Errc::invalid_argument, "the private key does not belong to the first certificate");
    }
    return out;
}

Result<hsm::SecureBuffer> to_pkcs12(EVP_PKEY* key, const std::vector<X509*>& chain, std::string_view friendly_name)
{
    STACK_OF(X509)* ca = sk_X509_new_null();
    for (std::size_t i = 1; i < chain.size(); ++i)
        sk_X509_push(ca, chain[i]);
    const std::string name(friendly_name);
    PKCS12* p12 = PKCS12_create("", name.c_str(), key, chain.front(), ca, 0, 0, 0, 0, 0);
    sk_X509_free(ca);
    if (p12 == nullptr)
        return fail(Errc::key_unavailable, "cannot make the PKCS#12 file: " + openssl_error());
    Bio bio(BIO_new(BIO_s_secmem()));
    i2d_PKCS12_bio(bio.get(), p12);
    PKCS12_free(p12);
    return to_secure(bio.get());
}

Micros not_after_of(X509* cert) { return micros_of(X509_get0_notAfter(cert)); }
Micros not_before_of(X509* cert) { return micros_of(X509_get0_notBefore(cert)); }

bool matches(X509* cert, std::span<const std::uint8_t> spki)
{
    EVP_PKEY* key = X509_get0_pubkey(cert);
    return key != nullptr && spki_of(key) == std::vector<std::uint8_t>(spki.begin(), spki.end());
}

std::optional<hsm::KeyType> key_type_of(EVP_PKEY* key)
{
    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA) {
        switch (EVP_PKEY_get_bits(key)) {
        case 2048:
            return hsm::KeyType::rsa_2048;
        case 3072:
            return hsm::KeyType::rsa_3072;
        case 4096:
            return hsm::KeyType::rsa_4096;
        default:
            return std::nullopt;
        }
    }
    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_EC) {
        switch (EVP_PKEY_get_bits(key)) {
        case 256:
            return hsm::KeyType::ec_p256;
        case 384:
            return hsm::KeyType::ec_p384;
        case 521:
            return hsm::KeyType::ec_p521;
        default:
            return std::nullopt;
        }
    }
    return std::nullopt;
}

}  // namespace vaultfs::vault::certificates
