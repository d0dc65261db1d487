// Unit tests for application key pairs (hsm/key_pairs.hpp) and the libp11
// adapter (hsm/pkcs11/token_evp.hpp) against a real SoftHSM2 token: every key type
// is made in the token, its public half parses in OpenSSL, and signatures
// and decryptions made by the token check out with OpenSSL alone.
#include <catch2/catch.hpp>

#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <memory>
#include <string>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"
#include "hsm/pkcs11/token_evp.hpp"
#include "tests/support/temp_token.hpp"

namespace vaultfs::hsm {
namespace {

using Bytes = std::vector<std::uint8_t>;

struct PkeyFree {
    void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

Pkey parse_spki(const Bytes& der)
{
    const unsigned char* p = der.data();
    return Pkey(d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
}

Bytes sha(const EVP_MD* md, const std::string& data)
{
    Bytes out(EVP_MD_get_size(md));
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), out.data(), &len, md, nullptr);
    return out;
}

// OpenSSL's verdict on `sig` over `data` (hashed with `md`), PSS when asked.
bool verifies(EVP_PKEY* pub, const EVP_MD* md, const std::string& data, const Bytes& sig, bool pss)
{
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX* pctx = nullptr;
    bool ok = EVP_DigestVerifyInit(ctx, &pctx, md, nullptr, pub) == 1;
    if (ok && pss)
        ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) == 1;
    ok = ok && EVP_DigestVerify(ctx, sig.data(), sig.size(), reinterpret_cast<const unsigned char*>(data.data()),
                                data.size()) == 1;
    EVP_MD_CTX_free(ctx);
    return ok;
}

Bytes encrypt(EVP_PKEY* pub, const Bytes& plain, int padding, const EVP_MD* oaep_md)
{
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(pub, nullptr);
    REQUIRE(EVP_PKEY_encrypt_init(ctx) == 1);
    REQUIRE(EVP_PKEY_CTX_set_rsa_padding(ctx, padding) == 1);
    if (oaep_md != nullptr) {
        REQUIRE(EVP_PKEY_CTX_set_rsa_oaep_md(ctx, oaep_md) == 1);
        REQUIRE(EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, oaep_md) == 1);
    }
    std::size_t len = 0;
    REQUIRE(EVP_PKEY_encrypt(ctx, nullptr, &len, plain.data(), plain.size()) == 1);
    Bytes out(len);
    REQUIRE(EVP_PKEY_encrypt(ctx, out.data(), &len, plain.data(), plain.size()) == 1);
    out.resize(len);
    EVP_PKEY_CTX_free(ctx);
    return out;
}

TEST_CASE("EC keys of every curve sign digests that OpenSSL verifies", "[hsm][keypairs]")
{
    testing::TempToken token;
    auto keys = token.open();
    REQUIRE(keys);
    struct Case {
        KeyType type;
        Digest digest;
        const EVP_MD* md;
    };
    for (const Case c : {Case{KeyType::ec_p256, Digest::sha256, EVP_sha256()},
                         Case{KeyType::ec_p384, Digest::sha384, EVP_sha384()},
                         Case{KeyType::ec_p521, Digest::sha512, EVP_sha512()}}) {
        INFO(to_string(c.type));
        auto id = (*keys)->create_key_pair(c.type, "app-ec", KeyUsage{.sign = true});
        REQUIRE(id);
        auto der = (*keys)->public_key_der(*id);
        REQUIRE(der);
        auto pub = parse_spki(*der);
        REQUIRE(pub);
        CHECK(EVP_PKEY_get_base_id(pub.get()) == EVP_PKEY_EC);
        const std::string data = "data to sign";
        auto sig = (*keys)->sign(*id, Mechanism{Mechanism::Kind::ecdsa, c.digest}, sha(c.md, data));
        REQUIRE(sig);
        CHECK(verifies(pub.get(), c.md, data, *sig, false));
        CHECK_FALSE(verifies(pub.get(), c.md, "other data", *sig, false));
        // The wrong digest size is refused before the token sees it.
        auto wrong = (*keys)->sign(*id, Mechanism{Mechanism::Kind::ecdsa, c.digest}, Bytes(7));
        REQUIRE_FALSE(wrong);
        CHECK(wrong.error().code == Errc::invalid_argument);
        // An EC key cannot decrypt.
        auto dec = (*keys)->decrypt(*id, Mechanism{Mechanism::Kind::rsa_oaep, Digest::sha1}, Bytes(32));
        CHECK_FALSE(dec);
    }
}

TEST_CASE("RSA keys sign (PKCS#1 v1.5, PSS) and decrypt (OAEP, OAEP-256, v1.5) as OpenSSL expects", "[hsm][keypairs]")
{
    testing::TempToken token;
    auto keys = token.open();
    REQUIRE(keys);
    auto id = (*keys)->create_key_pair(KeyType::rsa_2048, "app-rsa", KeyUsage{.sign = true, .decrypt = true});
    REQUIRE(id);
    auto der = (*keys)->public_key_der(*id);
    REQUIRE(der);
    auto pub = parse_spki(*der);
    REQUIRE(pub);
    CHECK(EVP_PKEY_get_bits(pub.get()) == 2048);

    const std::string data = "sign me";
    auto rs = (*keys)->sign(*id, Mechanism{Mechanism::Kind::rsa_pkcs1_sign, Digest::sha256}, sha(EVP_sha256(), data));
    REQUIRE(rs);
    CHECK(verifies(pub.get(), EVP_sha256(), data, *rs, false));
    auto ps = (*keys)->sign(*id, Mechanism{Mechanism::Kind::rsa_pss, Digest::sha384}, sha(EVP_sha384(), data));
    REQUIRE(ps);
    CHECK(verifies(pub.get(), EVP_sha384(), data, *ps, true));

    const Bytes plain{'k', 'e', 'y', ' ', 'b', 'y', 't', 'e', 's'};
    auto oaep = (*keys)->decrypt(*id, Mechanism{Mechanism::Kind::rsa_oaep, Digest::sha1},
                                 encrypt(pub.get(), plain, RSA_PKCS1_OAEP_PADDING, EVP_sha1()));
    REQUIRE(oaep);
    CHECK(Bytes(oaep->data(), oaep->data() + oaep->size()) == plain);
    auto v15 = (*keys)->decrypt(*id, Mechanism{Mechanism::Kind::rsa_pkcs1_decrypt},
                                encrypt(pub.get(), plain, RSA_PKCS1_PADDING, nullptr));
    REQUIRE(v15);
    CHECK(Bytes(v15->data(), v15->data() + v15->size()) == plain);
    auto oaep256 = (*keys)->decrypt(*id, Mechanism{Mechanism::Kind::rsa_oaep, Digest::sha256},
                                    encrypt(pub.get(), plain, RSA_PKCS1_OAEP_PADDING, EVP_sha256()));
    // SoftHSM 2.6.1 offers OAEP with SHA-1 only: the token decrypts raw and
    // the padding comes off on the host.
    REQUIRE(oaep256);
    CHECK(Bytes(oaep256->data(), oaep256->data() + oaep256->size()) == plain);
    auto tampered256 = encrypt(pub.get(), plain, RSA_PKCS1_OAEP_PADDING, EVP_sha256());
    tampered256[5] ^= 1;
    auto bad256 = (*keys)->decrypt(*id, Mechanism{Mechanism::Kind::rsa_oaep, Digest::sha256}, tampered256);
    REQUIRE_FALSE(bad256);
    CHECK(bad256.error().code == Errc::authentication_failed);

    // Tampered ciphertext is refused.
    auto good = encrypt(pub.get(), plain, RSA_PKCS1_OAEP_PADDING, EVP_sha1());
    good[10] ^= 1;
    auto bad = (*keys)->decrypt(*id, Mechanism{Mechanism::Kind::rsa_oaep, Digest::sha1}, good);
    REQUIRE_FALSE(bad);
    CHECK(bad.error().code == Errc::authentication_failed);
}

TEST_CASE("A key pair's usage is what was asked, and removing it leaves nothing", "[hsm][keypairs]")
{
    testing::TempToken token;
    auto keys = token.open();
    REQUIRE(keys);
    auto id = (*keys)->create_key_pair(KeyType::rsa_2048, "decrypt-only", KeyUsage{.sign = false, .decrypt = true});
    REQUIRE(id);
    auto sig = (*keys)->sign(*id, Mechanism{Mechanism::Kind::rsa_pkcs1_sign, Digest::sha256}, Bytes(32));
    REQUIRE_FALSE(sig);
    CHECK(sig.error().code == Errc::not_permitted);
    REQUIRE((*keys)->find_key(*id));
    REQUIRE((*keys)->destroy_key_pair(*id));
    auto gone = (*keys)->find_key(*id);
    REQUIRE_FALSE(gone);
    CHECK(gone.error().code == Errc::key_not_found);
    CHECK((*keys)->destroy_key_pair(*id));  // again: fine
}

TEST_CASE("libp11 turns a token key into an EVP_PKEY that OpenSSL signs with", "[hsm][keypairs][libp11]")
{
    testing::TempToken token;
    auto keys = token.open();
    REQUIRE(keys);
    TokenEvp evp(**keys);
    for (const KeyType type : {KeyType::ec_p256, KeyType::rsa_2048}) {
        INFO(to_string(type));
        auto id = (*keys)->create_key_pair(type, "libp11", KeyUsage{.sign = true});
        REQUIRE(id);
        auto der = (*keys)->public_key_der(*id);
        REQUIRE(der);
        auto pub = parse_spki(*der);
        const std::string data = "signed through libp11";
        Bytes sig;
        auto r = evp.with_private_key(*id, [&](EVP_PKEY* pkey) -> Result<void> {
            EVP_MD_CTX* ctx = EVP_MD_CTX_new();
            std::size_t len = 0;
            bool ok = EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, pkey) == 1 &&
                      EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(data.data()),
                                     data.size()) == 1;
            sig.resize(len);
            ok = ok && EVP_DigestSign(ctx, sig.data(), &len, reinterpret_cast<const unsigned char*>(data.data()),
                                      data.size()) == 1;
            sig.resize(len);
            EVP_MD_CTX_free(ctx);
            if (!ok)
                return fail(Errc::device_error, "EVP_DigestSign failed");
            return {};
        });
        REQUIRE(r);
        CHECK(verifies(pub.get(), EVP_sha256(), data, sig, false));
    }
    auto missing = evp.with_private_key(KeyId{"00112233445566778899aabbccddeeff"}, [](EVP_PKEY*) -> Result<void> {
        return {};
    });
    REQUIRE_FALSE(missing);
    CHECK(missing.error().code == Errc::key_not_found);
}

}  // namespace
}  // namespace vaultfs::hsm
