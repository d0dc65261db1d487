#include "vault/crypto/signing.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <memory>

namespace vaultfs::vault {

std::array<std::uint8_t, 32> sha256(std::string_view data)
{
    // Fetched once: an implicit fetch costs a provider lookup per digest.
    static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    std::array<std::uint8_t, 32> out{};
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), out.data(), &len, md, nullptr);
    return out;
}

std::string sha256_hex(std::string_view data)
{
    const auto d = sha256(data);
    return to_hex(d);
}

SignatureVerifier::SignatureVerifier(const std::string& pem)
{
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    if (bio == nullptr)
        return;
    key_ = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    if (key_ == nullptr)
        return;
    // Only the two audit signature schemes (hsm/pkcs11/mechanisms.hpp): a P-256
    // key, or an RSA key of at least 3072 bits.
    char group[32] = {};
    if (EVP_PKEY_is_a(key_, "EC") && EVP_PKEY_get_utf8_string_param(key_, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                                                    sizeof group, nullptr) == 1 &&
        std::string_view(group) == "prime256v1") {
        rsa_ = false;
        return;
    }
    if (EVP_PKEY_is_a(key_, "RSA") && EVP_PKEY_get_bits(key_) >= 3072) {
        rsa_ = true;
        return;
    }
    EVP_PKEY_free(key_);
    key_ = nullptr;
}

SignatureVerifier::~SignatureVerifier() { EVP_PKEY_free(key_); }

bool SignatureVerifier::verify(std::span<const std::uint8_t, 32> digest, std::span<const std::uint8_t> sig) const
{
    if (key_ == nullptr)
        return false;
    if (rsa_) {
        EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key_, nullptr);
        const bool ok = ctx != nullptr && EVP_PKEY_verify_init(ctx) == 1 &&
                        EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) == 1 &&
                        EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) == 1 &&
                        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1 &&
                        EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, 32) == 1 &&
                        EVP_PKEY_verify(ctx, sig.data(), sig.size(), digest.data(), digest.size()) == 1;
        EVP_PKEY_CTX_free(ctx);
        return ok;
    }
    if (sig.size() != 64)
        return false;
    // OpenSSL wants DER; the token gives r | s.
    ECDSA_SIG* es = ECDSA_SIG_new();
    BIGNUM* r = BN_bin2bn(sig.data(), 32, nullptr);
    BIGNUM* s = BN_bin2bn(sig.data() + 32, 32, nullptr);
    if (es == nullptr || r == nullptr || s == nullptr || ECDSA_SIG_set0(es, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(es);
        return false;
    }
    unsigned char* der = nullptr;
    const int der_len = i2d_ECDSA_SIG(es, &der);
    ECDSA_SIG_free(es);
    if (der_len <= 0)
        return false;
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key_, nullptr);
    const bool ok = ctx != nullptr && EVP_PKEY_verify_init(ctx) == 1 &&
                    EVP_PKEY_verify(ctx, der, static_cast<std::size_t>(der_len), digest.data(), digest.size()) == 1;
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(der);
    return ok;
}

Result<std::string> public_key_pem(const std::vector<std::uint8_t>& spki_der)
{
    const unsigned char* p = spki_der.data();
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
        d2i_PUBKEY(nullptr, &p, static_cast<long>(spki_der.size())), EVP_PKEY_free);
    if (!key)
        return fail(Errc::invalid_argument, "the token's public key does not parse");
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    if (!bio || PEM_write_bio_PUBKEY(bio.get(), key.get()) != 1)
        return fail(Errc::invalid_argument, "cannot encode the public key");
    char* data = nullptr;
    const long len = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(len));
}

Result<std::string> public_key_pem(hsm::KeyService& keys, const hsm::KeyId& key)
{
    auto der = keys.public_key_der(key);
    if (!der)
        return fail(Errc::key_unavailable, "cannot read the public half of key " + key.hex + ": " + der.error().message);
    return public_key_pem(*der);
}

bool same_public_key(const std::string& pem_a, const std::string& pem_b)
{
    const auto load = [](const std::string& pem) {
        std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())),
                                                      BIO_free);
        return std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>(
            bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr, EVP_PKEY_free);
    };
    const auto a = load(pem_a);
    const auto b = load(pem_b);
    return a && b && EVP_PKEY_eq(a.get(), b.get()) == 1;
}

}  // namespace vaultfs::vault
