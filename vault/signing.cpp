#include "vault/signing.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>

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

P256Verifier::P256Verifier(const std::string& pem)
{
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    if (bio != nullptr) {
        key_ = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
        BIO_free(bio);
    }
}

P256Verifier::~P256Verifier() { EVP_PKEY_free(key_); }

bool P256Verifier::verify(std::span<const std::uint8_t, 32> digest, std::span<const std::uint8_t> sig) const
{
    if (key_ == nullptr || sig.size() != 64)
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

Result<std::string> p256_public_key_pem(const std::vector<std::uint8_t>& point)
{
    std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(OSSL_PARAM_BLD_new(), OSSL_PARAM_BLD_free);
    if (!bld || OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()) != 1)
        return fail(Errc::invalid_argument, "cannot build the public key parameters");
    std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(OSSL_PARAM_BLD_to_param(bld.get()), OSSL_PARAM_free);
    std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr),
                                                                   EVP_PKEY_CTX_free);
    EVP_PKEY* raw = nullptr;
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1)
        return fail(Errc::invalid_argument, "the token's public point is not a valid P-256 key");
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(raw, EVP_PKEY_free);
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    if (!bio || PEM_write_bio_PUBKEY(bio.get(), key.get()) != 1)
        return fail(Errc::invalid_argument, "cannot encode the public key");
    char* data = nullptr;
    const long len = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(len));
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
