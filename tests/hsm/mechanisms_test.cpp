// Unit tests for mechanism negotiation (hsm/pkcs11/mechanisms.hpp): the choice made
// from what a token says it offers, and the fallback constructions —
// AES-CBC-PAD + HMAC-SHA256 sealing and RSA-PSS audit signing — run for real
// on SoftHSM2 (which offers both), with every tampering case.
#include "hsm/pkcs11/mechanisms.hpp"

#include <catch2/catch.hpp>

#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"
#include "tests/hsm/hsm_support.hpp"
#include "tests/support/temp_token.hpp"

namespace vaultfs::hsm {
namespace {

using testing::TempToken;
using Bytes = std::vector<std::uint8_t>;

// What openCryptoki 3.8's soft token reports (pkcsconf -m, measured): no
// GCM, no EC, RSA with PSS, AES-CBC-PAD and HMAC.
TokenProfile soft_tok_like()
{
    TokenProfile t;
    t.label = "ock";
    t.manufacturer = "IBM Corp.";
    t.model = "IBM SoftTok";
    t.mechanisms[CKM_RSA_PKCS_KEY_PAIR_GEN] = {512, 4096, CKF_GENERATE_KEY_PAIR};
    t.mechanisms[CKM_RSA_PKCS] = {512, 4096, CKF_ENCRYPT | CKF_DECRYPT | CKF_SIGN | CKF_VERIFY};
    t.mechanisms[CKM_RSA_PKCS_PSS] = {1024, 4096, CKF_SIGN | CKF_VERIFY};
    t.mechanisms[CKM_RSA_PKCS_OAEP] = {1024, 4096, CKF_ENCRYPT | CKF_DECRYPT};
    t.mechanisms[CKM_RSA_X_509] = {512, 4096, CKF_ENCRYPT | CKF_DECRYPT};
    t.mechanisms[CKM_AES_KEY_GEN] = {16, 32, CKF_GENERATE};
    t.mechanisms[CKM_AES_CBC_PAD] = {16, 32, CKF_ENCRYPT | CKF_DECRYPT};
    t.mechanisms[CKM_GENERIC_SECRET_KEY_GEN] = {80, 2048, CKF_GENERATE};
    t.mechanisms[CKM_SHA256_HMAC] = {0, 0, CKF_SIGN | CKF_VERIFY};
    return t;
}

TokenProfile with_gcm_and_ec(TokenProfile t)
{
    t.mechanisms[CKM_AES_GCM] = {16, 32, CKF_ENCRYPT | CKF_DECRYPT};
    t.mechanisms[CKM_EC_KEY_PAIR_GEN] = {256, 521, CKF_GENERATE_KEY_PAIR};
    t.mechanisms[CKM_ECDSA] = {256, 521, CKF_SIGN | CKF_VERIFY};
    return t;
}

const Schemes fallbacks{SealScheme::aes_cbc_hmac, SignatureScheme::rsa_pss_sha256};

std::unique_ptr<Pkcs11KeyService> open_with(const TempToken& token, std::optional<Schemes> schemes)
{
    auto keys = token.open(TempToken::pin, schemes);
    if (!keys)
        FAIL("cannot open the test token: " << keys.error().message);
    return std::move(*keys);
}

bool pss_verifies(const Bytes& spki, const std::array<std::uint8_t, 32>& digest, const Bytes& sig)
{
    const unsigned char* p = spki.data();
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())),
                                                            EVP_PKEY_free);
    REQUIRE(key);
    REQUIRE(EVP_PKEY_is_a(key.get(), "RSA"));
    std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(EVP_PKEY_CTX_new(key.get(), nullptr),
                                                                   EVP_PKEY_CTX_free);
    return EVP_PKEY_verify_init(ctx.get()) == 1 && EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) == 1 &&
           EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) == 1 &&
           EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), 32) == 1 &&
           EVP_PKEY_verify(ctx.get(), sig.data(), sig.size(), digest.data(), digest.size()) == 1;
}

}  // namespace

TEST_CASE("negotiation prefers AES-GCM and ECDSA P-256 and says which fallback it took", "[mechanisms]")
{
    auto best = negotiate(with_gcm_and_ec(soft_tok_like()));
    REQUIRE(best);
    CHECK(best->schemes == Schemes{SealScheme::aes_gcm, SignatureScheme::ecdsa_p256});
    CHECK(best->notes.empty());

    auto soft = negotiate(soft_tok_like());
    REQUIRE(soft);
    CHECK(soft->schemes == fallbacks);
    REQUIRE(soft->notes.size() == 2);
    CHECK(soft->notes[0] == "token 'ock' (IBM Corp. IBM SoftTok) lacks CKM_AES_GCM; vaultfs will seal DEKs with "
                            "AES-256-CBC-PAD + HMAC-SHA256 (encrypt-then-MAC, two keys)");
    CHECK(soft->notes[1] == "token 'ock' (IBM Corp. IBM SoftTok) lacks CKM_EC_KEY_PAIR_GEN and CKM_ECDSA for P-256; "
                            "vaultfs will sign the audit trail with RSA-PSS (RSA-3072, SHA-256)");

    // A GCM that cannot decrypt is no GCM.
    auto half = with_gcm_and_ec(soft_tok_like());
    half.mechanisms[CKM_AES_GCM].flags = CKF_ENCRYPT;
    CHECK(negotiate(half)->schemes.seal == SealScheme::aes_cbc_hmac);
    // EC sizes in bytes (some tokens) count too.
    auto bytes = with_gcm_and_ec(soft_tok_like());
    bytes.mechanisms[CKM_EC_KEY_PAIR_GEN] = {32, 66, CKF_GENERATE_KEY_PAIR};
    bytes.mechanisms[CKM_ECDSA] = {32, 66, CKF_SIGN};
    CHECK(negotiate(bytes)->schemes.signature == SignatureScheme::ecdsa_p256);
}

TEST_CASE("a token with no usable construction is refused, naming what it lacks", "[mechanisms]")
{
    auto no_hmac = soft_tok_like();
    no_hmac.mechanisms.erase(CKM_SHA256_HMAC);
    auto r = negotiate(no_hmac);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::mechanism_unsupported);
    CHECK(r.error().message == "token 'ock' (IBM Corp. IBM SoftTok) cannot seal keys for vaultfs: it lacks "
                               "CKM_AES_GCM (for AES-GCM) and CKM_SHA256_HMAC (for AES-CBC-PAD + HMAC-SHA256)");

    auto small_rsa = soft_tok_like();
    small_rsa.mechanisms[CKM_RSA_PKCS_PSS] = {1024, 2048, CKF_SIGN};
    auto s = negotiate(small_rsa);
    REQUIRE_FALSE(s);
    CHECK(s.error().message == "token 'ock' (IBM Corp. IBM SoftTok) cannot sign the audit trail: it lacks "
                               "CKM_EC_KEY_PAIR_GEN and CKM_ECDSA (for ECDSA P-256) and CKM_RSA_PKCS_PSS (for RSA-PSS "
                               "with 3072-bit keys)");
}

TEST_CASE("a recorded choice the token no longer offers is named", "[mechanisms]")
{
    auto r = check_schemes(soft_tok_like(), Schemes{});
    REQUIRE_FALSE(r);
    CHECK(r.error().message ==
          "token 'ock' (IBM Corp. IBM SoftTok) lacks CKM_AES_GCM, which this state's token_seal = aes-gcm needs");
    CHECK(check_schemes(soft_tok_like(), fallbacks));
    auto r2 = check_schemes(soft_tok_like(), Schemes{SealScheme::aes_cbc_hmac, SignatureScheme::ecdsa_p256});
    REQUIRE_FALSE(r2);
    CHECK(r2.error().message == "token 'ock' (IBM Corp. IBM SoftTok) lacks CKM_EC_KEY_PAIR_GEN and CKM_ECDSA, which "
                                "this state's token_signature = ecdsa-p256 needs");
}

TEST_CASE("key types and operations the token cannot do are refused before anything is made", "[mechanisms]")
{
    const auto soft = soft_tok_like();
    auto ec = check_key_pair(soft, KeyType::ec_p256, KeyUsage{.sign = true});
    REQUIRE_FALSE(ec);
    CHECK(ec.error().message ==
          "token 'ock' (IBM Corp. IBM SoftTok) cannot make ec-p256 keys that sign: it lacks CKM_EC_KEY_PAIR_GEN and "
          "CKM_ECDSA");
    CHECK(check_key_pair(soft, KeyType::rsa_2048, KeyUsage{.sign = true, .decrypt = true}));
    CHECK(check_key_pair(soft, KeyType::rsa_4096, KeyUsage{.sign = true}));

    auto small = soft;
    small.mechanisms[CKM_RSA_PKCS_KEY_PAIR_GEN] = {512, 2048, CKF_GENERATE_KEY_PAIR};
    auto big = check_key_pair(small, KeyType::rsa_4096, KeyUsage{.decrypt = true});
    REQUIRE_FALSE(big);
    CHECK(big.error().message == "token 'ock' (IBM Corp. IBM SoftTok) cannot make rsa-4096 keys that decrypt: it "
                                 "lacks CKM_RSA_PKCS_KEY_PAIR_GEN");
    CHECK(check_key_pair(with_gcm_and_ec(soft), KeyType::ec_p384, KeyUsage{.sign = true}));
}

TEST_CASE("SoftHSM2 negotiates AES-GCM and ECDSA P-256", "[mechanisms][pkcs11]")
{
    TempToken token;
    auto keys = open_with(token, std::nullopt);
    CHECK(keys->schemes() == Schemes{});
    CHECK(keys->negotiation_notes().empty());
    CHECK(keys->profile().manufacturer == "SoftHSM project");
    CHECK(keys->profile().offers(CKM_AES_CBC_PAD, CKF_ENCRYPT | CKF_DECRYPT));
}

TEST_CASE("AES-CBC-PAD + HMAC-SHA256 sealing round trips and refuses every change", "[mechanisms][pkcs11]")
{
    TempToken token;
    auto keys = open_with(token, fallbacks);
    auto kek_r = keys->create_kek("cbc-kek", KekReach::trusted_tokens);  // asked to move, and still never can
    REQUIRE(kek_r);
    const KeyId kek = *kek_r;
    const KeyId mac{kek.hex + "6d"};

    // Two keys, each with one job; neither leaves the token.
    for (const auto& [id, encrypt] : {std::pair{kek, true}, std::pair{mac, false}}) {
        INFO(id.hex);
        CHECK(*keys->read_bool_attribute(id, CKA_ENCRYPT) == encrypt);
        CHECK(*keys->read_bool_attribute(id, CKA_DECRYPT) == encrypt);
        CHECK(*keys->read_bool_attribute(id, CKA_SIGN) == !encrypt);
        CHECK(*keys->read_bool_attribute(id, CKA_VERIFY) == !encrypt);
        CHECK(*keys->read_bool_attribute(id, CKA_EXTRACTABLE) == false);
        CHECK(*keys->read_bool_attribute(id, CKA_WRAP) == false);
        CHECK(keys->read_attribute_rv(id, CKA_VALUE) == CKR_ATTRIBUTE_SENSITIVE);
    }
    REQUIRE(keys->find_key(kek));

    const SecureBuffer dek = random_dek();
    const Bytes aad = bytes_of("vault 1 / api-key / version 1 / kek");
    auto sealed_r = keys->seal(kek, dek, aad);
    REQUIRE(sealed_r);
    const Bytes sealed = *sealed_r;
    REQUIRE(sealed.size() == 16 + 48 + 32);
    const Bytes raw(dek.bytes().begin(), dek.bytes().end());
    CHECK(std::search(sealed.begin(), sealed.end(), raw.begin(), raw.end()) == sealed.end());

    auto back = keys->unseal(kek, sealed, aad);
    REQUIRE(back);
    CHECK(back->equals(dek.bytes()));
    CHECK(CRYPTO_secure_allocated(back->data()) == 1);
    auto again = keys->seal(kek, dek, aad);
    REQUIRE(again);
    CHECK(!std::equal(again->begin(), again->begin() + 16, sealed.begin()));  // a fresh IV

    const auto refused = [&](const KeyId& key, const Bytes& blob, const Bytes& with_aad) {
        auto r = keys->unseal(key, blob, with_aad);
        REQUIRE_FALSE(r);
        CHECK(r.error().code == Errc::authentication_failed);
    };
    SECTION("a flipped bit anywhere: IV, ciphertext, MAC")
    {
        for (std::size_t i : {0u, 15u, 16u, 40u, 63u, 64u, 80u, 95u}) {
            INFO("byte " << i);
            Bytes b = sealed;
            b[i] ^= 0x01;
            refused(kek, b, aad);
        }
    }
    SECTION("other AAD, and AAD bytes moved into the IV")
    {
        refused(kek, sealed, bytes_of("vault 1 / api-key / version 2 / kek"));
        refused(kek, sealed, {});
        // The length prefix keeps the boundary: one AAD byte shorter with the
        // same bytes following is another message.
        Bytes shorter(aad.begin(), aad.end() - 1);
        refused(kek, sealed, shorter);
    }
    SECTION("another KEK, and a blob of the wrong length")
    {
        auto other = keys->create_kek("other", KekReach::this_token);
        REQUIRE(other);
        refused(*other, sealed, aad);
        refused(kek, Bytes(sealed.begin(), sealed.end() - 1), aad);
        refused(kek, {}, aad);
        // An AES-GCM blob is not a CBC blob.
        refused(kek, Bytes(60, 0x42), aad);
    }
    SECTION("the MAC key is no KEK")
    {
        auto r = keys->unseal(mac, sealed, aad);  // no MAC key beside the MAC key
        REQUIRE_FALSE(r);
        CHECK(r.error().code == Errc::key_not_found);
    }
    // The failures left the sessions usable.
    auto fine = keys->unseal(kek, sealed, aad);
    REQUIRE(fine);
    CHECK(fine->equals(dek.bytes()));
}

TEST_CASE("an RSA-PSS audit signing key signs digests that OpenSSL verifies", "[mechanisms][pkcs11]")
{
    TempToken token;
    auto keys = open_with(token, fallbacks);
    auto key = keys->create_signing_key("audit-rsa");
    REQUIRE(key);
    auto spki = keys->public_key_der(*key);
    REQUIRE(spki);
    std::array<std::uint8_t, 32> digest{};
    digest.fill(0x5a);
    auto sig = keys->sign_digest(*key, digest);
    REQUIRE(sig);
    CHECK(sig->size() == 384);  // RSA-3072
    CHECK(pss_verifies(*spki, digest, *sig));
    // PSS is randomised: a second signature differs and verifies too.
    auto sig2 = keys->sign_digest(*key, digest);
    REQUIRE(sig2);
    CHECK(*sig2 != *sig);
    CHECK(pss_verifies(*spki, digest, *sig2));
    // And the check can fail.
    Bytes bent = *sig;
    bent[100] ^= 0x01;
    CHECK_FALSE(pss_verifies(*spki, digest, bent));
    auto other = digest;
    other[0] ^= 1;
    CHECK_FALSE(pss_verifies(*spki, other, *sig));
    // The private half signs only.
    auto priv_sign = keys->decrypt(*key, Mechanism{Mechanism::Kind::rsa_pkcs1_decrypt}, *sig);
    REQUIRE_FALSE(priv_sign);
    CHECK(priv_sign.error().code == Errc::not_permitted);
}

}  // namespace vaultfs::hsm
