// Unit tests for hsm::Pkcs11KeyService against a real SoftHSM2 token in a
// temporary directory: how KEKs are made (attributes read back from the
// token), sealing and its failure modes, signing, login errors, and
// concurrent use.
//
// The PKCS#11 module is process-wide and reads SOFTHSM2_CONF when it is
// initialised, so only one TempToken / key service is alive at a time: each
// test makes its own and lets it go before the next.
#include "hsm/pkcs11/key_service.hpp"

#include <catch2/catch.hpp>

#include <dlfcn.h>

// Constants for the attribute checks (tests only; production code keeps
// PKCS#11 inside hsm/).
#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "hsm/security_officer.hpp"
#include "tests/hsm/hsm_support.hpp"
#include "tests/support/temp_token.hpp"
#include "tests/support/token_attack.hpp"

namespace vaultfs::hsm {
namespace {

using testing::TempToken;
using Bytes = std::vector<std::uint8_t>;

std::unique_ptr<Pkcs11KeyService> open_service(const TempToken& token)
{
    auto keys = token.open();
    if (!keys)
        FAIL("cannot log in to the test token: " << keys.error().message);
    return std::move(*keys);
}

KeyId new_kek(KeyService& keys, const std::string& label = "test-kek", KekReach reach = KekReach::this_token)
{
    auto kek = keys.create_kek(label, reach);
    if (!kek)
        FAIL("create_kek failed: " << kek.error().message);
    return *kek;
}

// Verifies an r|s P-256 signature over `digest` with OpenSSL alone, from
// the SubjectPublicKeyInfo the token exported.
bool openssl_verifies(const Bytes& spki, const std::array<std::uint8_t, 32>& digest, const Bytes& sig)
{
    const unsigned char* p = spki.data();
    EVP_PKEY* key = d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size()));
    REQUIRE(key != nullptr);
    REQUIRE(EVP_PKEY_is_a(key, "EC"));

    ECDSA_SIG* es = ECDSA_SIG_new();
    ECDSA_SIG_set0(es, BN_bin2bn(sig.data(), 32, nullptr), BN_bin2bn(sig.data() + 32, 32, nullptr));
    unsigned char* der = nullptr;
    const int der_len = i2d_ECDSA_SIG(es, &der);
    ECDSA_SIG_free(es);
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key, nullptr);
    const bool ok = der_len > 0 && ctx != nullptr && EVP_PKEY_verify_init(ctx) == 1 &&
                    EVP_PKEY_verify(ctx, der, static_cast<std::size_t>(der_len), digest.data(), digest.size()) == 1;
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(der);
    EVP_PKEY_free(key);
    return ok;
}

std::array<std::uint8_t, 32> sha256_of(const std::string& text)
{
    std::array<std::uint8_t, 32> d{};
    unsigned int len = 0;
    REQUIRE(EVP_Digest(text.data(), text.size(), d.data(), &len, EVP_sha256(), nullptr) == 1);
    return d;
}

testing::TokenAccess access(const TempToken& token, const std::string& label = TempToken::label)
{
    return testing::TokenAccess{VAULTFS_SOFTHSM_MODULE, label, TempToken::pin, token.environment()};
}

// What the attacker of token_attack.hpp did to the key with this id.
testing::KeyUnderAttack attacked(const std::vector<testing::KeyUnderAttack>& all, const KeyId& id)
{
    for (const auto& k : all)
        if (k.id == id.hex)
            return k;
    FAIL("the attacker did not find key " << id.hex);
    return {};
}

void check_bools(Pkcs11KeyService& keys, const KeyId& id,
                 const std::vector<std::tuple<unsigned long, const char*, bool>>& expected)
{
    for (const auto& [type, name, value] : expected) {
        INFO(name);
        auto v = keys.read_bool_attribute(id, type);
        REQUIRE(v);
        CHECK(*v == value);
    }
}

TEST_CASE("a one-host KEK never leaves the token: whoever holds the PIN cannot wrap it out, nor any other key",
          "[pkcs11][attack]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    CHECK(kek.hex.size() == 32);  // a 16-byte CKA_ID in lowercase hex
    CHECK(kek.hex.find_first_not_of("0123456789abcdef") == std::string::npos);
    // SoftHSM defaults every usage flag to true: a false here was set on purpose.
    check_bools(*keys, kek,
                {{CKA_SENSITIVE, "CKA_SENSITIVE", true},         {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false},
                 {CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true},
                 {CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true}, {CKA_ENCRYPT, "CKA_ENCRYPT", true},
                 {CKA_DECRYPT, "CKA_DECRYPT", true},             {CKA_WRAP, "CKA_WRAP", false},
                 {CKA_UNWRAP, "CKA_UNWRAP", false},               {CKA_SIGN, "CKA_SIGN", false},
                 {CKA_VERIFY, "CKA_VERIFY", false},               {CKA_DERIVE, "CKA_DERIVE", false},
                 {CKA_TOKEN, "CKA_TOKEN", true},                  {CKA_PRIVATE, "CKA_PRIVATE", true}});
    CHECK(keys->read_attribute_rv(kek, CKA_VALUE) == CKR_ATTRIBUTE_SENSITIVE);
    CHECK(keys->read_attribute_rv(kek, CKA_LABEL) == CKR_OK);  // the seam reports success when it can
    CHECK(*keys->kek_exposure(kek) == Pkcs11KeyService::KekExposure::none);
    // It is never wrapped for another host either.
    auto transport = keys->create_transport_key("transport");
    REQUIRE(transport);
    auto transport_public = keys->public_key_der(*transport);
    REQUIRE(transport_public);
    auto wrapped = keys->wrap_kek(kek, *transport_public);
    REQUIRE_FALSE(wrapped);
    CHECK(wrapped.error().code == Errc::not_permitted);

    // Every other key vaultfs makes: the audit signing key, application keys.
    auto signing = keys->create_signing_key("audit");
    REQUIRE(signing);
    auto app_rsa = keys->create_key_pair(KeyType::rsa_2048, "app-rsa", KeyUsage{.sign = true, .decrypt = true});
    REQUIRE(app_rsa);
    auto app_ec = keys->create_key_pair(KeyType::ec_p384, "app-ec", KeyUsage{.sign = true});
    REQUIRE(app_ec);

    // The attack of issue 33: a session key of the attacker's own
    // (CKA_SENSITIVE false, CKA_WRAP true) wraps the key out, then opens
    // the blob offline; and an RSA key of theirs, imported to wrap with.
    const auto all = testing::attack_every_key(access(token));
    for (const KeyId& id : {kek, *signing, *app_rsa, *app_ec, *transport}) {
        const auto k = attacked(all, id);
        INFO(k.label << " " << k.id);
        CHECK(k.wrap_aes_rv == CKR_KEY_UNEXTRACTABLE);
        CHECK(k.recovered_bytes == 0);
        CHECK(k.value_rv == CKR_ATTRIBUTE_SENSITIVE);
        if (k.cls == CKO_SECRET_KEY)
            CHECK(k.wrap_rsa_rv == CKR_KEY_UNEXTRACTABLE);
    }
    // Every key the token holds was tried, and none came out.
    CHECK(all.size() == 5);
    for (const auto& k : all)
        CHECK(k.recovered_bytes == 0);
}

TEST_CASE("a shared store's KEK leaves only under a key the Security Officer trusted", "[pkcs11][attack]")
{
    TempToken token;
    auto keys = open_service(token);
    REQUIRE(keys->check_trusted_wrapping());  // SoftHSM2 2.6.1 enforces CKA_WRAP_WITH_TRUSTED
    const KeyId kek = new_kek(*keys, "movable", KekReach::trusted_tokens);
    check_bools(*keys, kek,
                {{CKA_SENSITIVE, "CKA_SENSITIVE", true},       {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", true},
                 {CKA_WRAP_WITH_TRUSTED, "CKA_WRAP_WITH_TRUSTED", true},
                 {CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", false},
                 {CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE", true}, {CKA_WRAP, "CKA_WRAP", false},
                 {CKA_UNWRAP, "CKA_UNWRAP", false},             {CKA_DERIVE, "CKA_DERIVE", false}});
    CHECK(*keys->kek_exposure(kek) == Pkcs11KeyService::KekExposure::trusted_only);
    const auto k = attacked(testing::attack_every_key(access(token)), kek);
    CHECK(k.wrap_aes_rv == CKR_KEY_NOT_WRAPPABLE);
    CHECK(k.wrap_rsa_rv == CKR_KEY_NOT_WRAPPABLE);
    CHECK(k.recovered_bytes == 0);
    // Nor can the PIN make a key of its own trusted.
    CHECK(testing::attack_trust(access(token)).own_key_rv == CKR_ATTRIBUTE_READ_ONLY);
}

TEST_CASE("a KEK moves to another token only under the transport key its SO trusted, and seals the same there",
          "[pkcs11][transfer]")
{
    // Three tokens of one SoftHSM2 (one SOFTHSM2_CONF per process): A (the
    // test token) grants, B receives, C is another host.
    TempToken token;
    REQUIRE(initialise_token(VAULTFS_SOFTHSM_MODULE, token.environment(), "vaultfs-host-b",
                             testing::secure(TempToken::so_pin), testing::secure(TempToken::pin)));
    REQUIRE(initialise_token(VAULTFS_SOFTHSM_MODULE, token.environment(), "vaultfs-host-c",
                             testing::secure(TempToken::so_pin), testing::secure(TempToken::pin)));
    const auto open_label = [&](const char* label) {
        auto k = Pkcs11KeyService::open(
            Pkcs11Config{VAULTFS_SOFTHSM_MODULE, label, testing::secure(TempToken::pin), token.environment(), std::nullopt});
        REQUIRE(k);
        return std::move(*k);
    };
    auto b = open_label("vaultfs-host-b");
    auto c = open_label("vaultfs-host-c");
    auto transport = b->create_transport_key("vaultfs-transport");
    REQUIRE(transport);
    // Its private half only unwraps, and never leaves the token.
    check_bools(*b, *transport,
                {{CKA_UNWRAP, "CKA_UNWRAP", true}, {CKA_DECRYPT, "CKA_DECRYPT", false}, {CKA_SIGN, "CKA_SIGN", false},
                 {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false}, {CKA_SENSITIVE, "CKA_SENSITIVE", true},
                 {CKA_MODIFIABLE, "CKA_MODIFIABLE", false}});
    auto b_public = b->public_key_der(*transport);
    REQUIRE(b_public);

    // A's Security Officer takes B's key in; A's user could not (above).
    {
        auto wrong = SecurityOfficer::login(VAULTFS_SOFTHSM_MODULE, token.environment(), TempToken::label,
                                            testing::secure("not-the-so-pin"));
        REQUIRE_FALSE(wrong);
        CHECK(wrong.error().code == Errc::pin_incorrect);
        auto so = SecurityOfficer::login(VAULTFS_SOFTHSM_MODULE, token.environment(), TempToken::label,
                                         testing::secure(TempToken::so_pin));
        INFO((so ? std::string() : so.error().message));
        REQUIRE(so);
        auto made = (*so)->trust(*b_public, "vaultfs-trusted host-b");
        INFO((made ? std::string() : made.error().message));
        REQUIRE(made);
        CHECK(*made);
        auto again = (*so)->trust(*b_public, "vaultfs-trusted host-b");
        REQUIRE(again);
        CHECK_FALSE(*again);
    }
    auto a = open_service(token);
    // While A's user is logged in, its SO cannot log in from this process.
    auto busy = SecurityOfficer::login(VAULTFS_SOFTHSM_MODULE, token.environment(), TempToken::label,
                                       testing::secure(TempToken::so_pin));
    CHECK_FALSE(busy);

    const KeyId kek = new_kek(*a, "movable", KekReach::trusted_tokens);
    const auto dek = testing::secure(std::string(32, 'd'));
    const std::vector<std::uint8_t> aad{1, 2, 3};
    auto sealed = a->seal(kek, dek, aad);
    REQUIRE(sealed);
    CHECK(*a->trusts(*b_public));
    auto listed = a->trusted_keys();
    REQUIRE(listed);
    REQUIRE(listed->size() == 1);
    CHECK((*listed)[0].spki == *b_public);
    CHECK((*listed)[0].id == Pkcs11KeyService::trusted_key_id(*b_public));
    // The trusted key cannot be copied with another modulus (it is not modifiable).
    const auto copies = testing::attack_trust(access(token)).copy_rvs;
    REQUIRE(copies.size() == 1);
    CHECK(copies[0] == CKR_ATTRIBUTE_READ_ONLY);

    auto wrapped = a->wrap_kek(kek, *b_public);
    INFO((wrapped ? std::string() : wrapped.error().message));
    REQUIRE(wrapped);
    CHECK(wrapped->size() == 384);  // RSA-3072 OAEP around the 32-byte key
    // A one-host KEK stays, even for a trusted key.
    auto fixed = a->wrap_kek(new_kek(*a), *b_public);
    REQUIRE_FALSE(fixed);
    CHECK(fixed.error().code == Errc::not_permitted);
    // C's transport key was never trusted on A: nothing is wrapped for it.
    auto c_transport = c->create_transport_key("vaultfs-transport");
    REQUIRE(c_transport);
    auto c_public = c->public_key_der(*c_transport);
    REQUIRE(c_public);
    CHECK_FALSE(*a->trusts(*c_public));
    auto for_c = a->wrap_kek(kek, *c_public);
    REQUIRE_FALSE(for_c);
    CHECK(for_c.error().code == Errc::not_permitted);

    // Only the transport key's holder opens it.
    auto wrong = c->unwrap_kek(*c_transport, *wrapped, kek, "vaultfs-kek");
    REQUIRE_FALSE(wrong);
    CHECK(wrong.error().code == Errc::authentication_failed);
    CHECK_FALSE(c->find_key(kek));
    auto altered = *wrapped;
    altered[5] ^= 1;
    auto bad = b->unwrap_kek(*transport, altered, kek, "vaultfs-kek");
    REQUIRE_FALSE(bad);
    CHECK(bad.error().code == Errc::authentication_failed);
    // B's PIN holder unwraps the grant into a key they could read: the
    // transport key's unwrap template refuses.
    const auto attack = testing::attack_unwrap(access(token, "vaultfs-host-b"), transport->hex, *wrapped);
    CHECK(attack.unwrap_rv == CKR_TEMPLATE_INCONSISTENT);

    auto moved = b->unwrap_kek(*transport, *wrapped, kek, "vaultfs-kek");
    INFO((moved ? std::string() : moved.error().message));
    REQUIRE(moved);
    auto opened = b->unseal(kek, *sealed, aad);
    REQUIRE(opened);
    CHECK(opened->equals(dek.bytes()));
    // There it is what it was on A: sensitive, leaving only under trusted keys.
    check_bools(*b, kek,
                {{CKA_SENSITIVE, "CKA_SENSITIVE", true}, {CKA_EXTRACTABLE, "CKA_EXTRACTABLE", true},
                 {CKA_WRAP_WITH_TRUSTED, "CKA_WRAP_WITH_TRUSTED", true}, {CKA_WRAP, "CKA_WRAP", false},
                 {CKA_DERIVE, "CKA_DERIVE", false}});
    const auto on_b = attacked(testing::attack_every_key(access(token, "vaultfs-host-b")), kek);
    CHECK(on_b.wrap_aes_rv == CKR_KEY_NOT_WRAPPABLE);
    CHECK(on_b.wrap_rsa_rv == CKR_KEY_NOT_WRAPPABLE);
    CHECK(on_b.value_rv == CKR_ATTRIBUTE_SENSITIVE);
    // Once there, it is not unwrapped twice.
    auto twice = b->unwrap_kek(*transport, *wrapped, kek, "vaultfs-kek");
    REQUIRE_FALSE(twice);
    CHECK(twice.error().code == Errc::invalid_argument);
    // A transport key is RSA of 3072 bits at least.
    auto signing = a->create_signing_key("ec");
    REQUIRE(signing);
    auto ec_public = a->public_key_der(*signing);
    REQUIRE(ec_public);
    auto not_rsa = a->wrap_kek(kek, *ec_public);
    REQUIRE_FALSE(not_rsa);
    CHECK(not_rsa.error().code == Errc::invalid_argument);
    // Trust taken back: nothing more is wrapped for B.
    REQUIRE(a->forget_trusted_key(*b_public));
    CHECK_FALSE(*a->trusts(*b_public));
    CHECK_FALSE(a->wrap_kek(kek, *b_public));
}

TEST_CASE("every KEK gets its own id", "[pkcs11]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId a = new_kek(*keys, "a");
    const KeyId b = new_kek(*keys, "b");
    CHECK(a.hex != b.hex);
    CHECK(keys->find_key(a));
    CHECK(keys->find_key(b));
}

TEST_CASE("seal and unseal round trip a DEK under a KEK", "[pkcs11]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    const SecureBuffer dek = random_dek();
    const Bytes aad = bytes_of("vault 1 / db-password / version 3");

    auto sealed = keys->seal(kek, dek, aad);
    REQUIRE(sealed);
    REQUIRE(sealed->size() == 12 + 32 + 16);
    // The DEK does not appear in the blob.
    const Bytes raw(dek.bytes().begin(), dek.bytes().end());
    CHECK(std::search(sealed->begin(), sealed->end(), raw.begin(), raw.end()) == sealed->end());

    auto unsealed = keys->unseal(kek, *sealed, aad);
    REQUIRE(unsealed);
    CHECK(unsealed->size() == dek_size);
    CHECK(unsealed->equals(dek.bytes()));
    CHECK(CRYPTO_secure_allocated(unsealed->data()) == 1);

    // A fresh IV every time: sealing the same DEK twice gives different blobs.
    auto again = keys->seal(kek, dek, aad);
    REQUIRE(again);
    CHECK(*again != *sealed);
    CHECK(!std::equal(again->begin(), again->begin() + 12, sealed->begin()));
    auto unsealed_again = keys->unseal(kek, *again, aad);
    REQUIRE(unsealed_again);
    CHECK(unsealed_again->equals(dek.bytes()));

    // Empty AAD is allowed (and is not the same as some AAD).
    auto no_aad = keys->seal(kek, dek, {});
    REQUIRE(no_aad);
    auto back = keys->unseal(kek, *no_aad, {});
    REQUIRE(back);
    CHECK(back->equals(dek.bytes()));
    auto with_aad = keys->unseal(kek, *no_aad, aad);
    REQUIRE_FALSE(with_aad);
    CHECK(with_aad.error().code == Errc::authentication_failed);
}

TEST_CASE("keys outlive the session that made them", "[pkcs11]")
{
    TempToken token;
    KeyId kek;
    Bytes sealed;
    const SecureBuffer dek = random_dek();
    const Bytes aad = bytes_of("binding");
    {
        auto keys = open_service(token);
        kek = new_kek(*keys);
        auto s = keys->seal(kek, dek, aad);
        REQUIRE(s);
        sealed = *s;
    }
    auto keys = open_service(token);
    REQUIRE(keys->find_key(kek));
    auto unsealed = keys->unseal(kek, sealed, aad);
    REQUIRE(unsealed);
    CHECK(unsealed->equals(dek.bytes()));
}

TEST_CASE("unseal fails authentication for any change, never yielding a wrong key", "[pkcs11]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    const KeyId other = new_kek(*keys, "other");
    const SecureBuffer dek = random_dek();
    const Bytes aad = bytes_of("vault 1 / api-key / version 1");
    auto sealed_r = keys->seal(kek, dek, aad);
    REQUIRE(sealed_r);
    const Bytes sealed = *sealed_r;

    const auto expect_auth_failure = [&](const KeyId& key, const Bytes& blob, const Bytes& with_aad) {
        auto r = keys->unseal(key, blob, with_aad);
        REQUIRE_FALSE(r);
        CHECK(r.error().code == Errc::authentication_failed);
        CHECK_FALSE(r.error().message.empty());
    };

    SECTION("different AAD")
    {
        expect_auth_failure(kek, sealed, bytes_of("vault 1 / api-key / version 2"));
        expect_auth_failure(kek, sealed, bytes_of("vault 2 / api-key / version 1"));
    }
    SECTION("a flipped bit in the IV")
    {
        for (std::size_t i : {0u, 5u, 11u}) {
            Bytes b = sealed;
            b[i] ^= 0x01;
            expect_auth_failure(kek, b, aad);
        }
    }
    SECTION("a flipped bit in the ciphertext")
    {
        for (std::size_t i : {12u, 30u, 43u}) {
            Bytes b = sealed;
            b[i] ^= 0x80;
            expect_auth_failure(kek, b, aad);
        }
    }
    SECTION("a flipped bit in the tag")
    {
        for (std::size_t i : {44u, 52u, 59u}) {
            Bytes b = sealed;
            b[i] ^= 0x10;
            expect_auth_failure(kek, b, aad);
        }
    }
    SECTION("another KEK") { expect_auth_failure(other, sealed, aad); }
    SECTION("a blob of the wrong length")
    {
        expect_auth_failure(kek, Bytes(sealed.begin(), sealed.end() - 1), aad);
        Bytes longer = sealed;
        longer.push_back(0);
        expect_auth_failure(kek, longer, aad);
        expect_auth_failure(kek, {}, aad);
    }

    // The failures left the pooled sessions usable.
    auto fine = keys->unseal(kek, sealed, aad);
    REQUIRE(fine);
    CHECK(fine->equals(dek.bytes()));
}

TEST_CASE("seal refuses a DEK that is not 32 bytes", "[pkcs11]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    auto short_dek = SecureBuffer::allocate(16);
    REQUIRE(short_dek);
    auto r = keys->seal(kek, *short_dek, {});
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::invalid_argument);
}

TEST_CASE("a key id the token does not hold is key_not_found", "[pkcs11]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    REQUIRE(keys->find_key(kek));

    const KeyId missing{"00112233445566778899aabbccddeeff"};
    auto r = keys->find_key(missing);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::key_not_found);
    CHECK_THAT(r.error().message, Catch::Contains(missing.hex));

    auto sealed = keys->seal(missing, random_dek(), {});
    REQUIRE_FALSE(sealed);
    CHECK(sealed.error().code == Errc::key_not_found);

    auto malformed = keys->find_key(KeyId{"not-hex"});
    REQUIRE_FALSE(malformed);
    CHECK(malformed.error().code == Errc::invalid_argument);
}

TEST_CASE("a wrong PIN is refused once, and no service is created", "[pkcs11]")
{
    TempToken token;
    // One attempt only: SoftHSM never locks, a real HSM would.
    auto r = token.open("not-the-pin");
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::pin_incorrect);
    CHECK_THAT(r.error().message, Catch::Contains("CKR_PIN_INCORRECT"));
    CHECK_THAT(r.error().message, Catch::Contains(TempToken::label));
    CHECK_THAT(r.error().message, !Catch::Contains("not-the-pin"));
}

TEST_CASE("a module that cannot be loaded is module_unavailable", "[pkcs11]")
{
    const std::string path = "/nonexistent/vaultfs/libno-such-module.so";
    auto r = Pkcs11KeyService::open(Pkcs11Config{path, "vaultfs", testing::secure("1234"), {}});
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::module_unavailable);
    CHECK_THAT(r.error().message, Catch::Contains(path));
}

TEST_CASE("a token label no slot holds is token_not_found", "[pkcs11]")
{
    TempToken token;
    auto r = Pkcs11KeyService::open(
        Pkcs11Config{VAULTFS_SOFTHSM_MODULE, "no-such-token", testing::secure(TempToken::pin), token.environment()});
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::token_not_found);
    CHECK_THAT(r.error().message, Catch::Contains("no-such-token"));

    // The right label still works afterwards.
    auto keys = open_service(token);
    CHECK(keys->ping());
}

TEST_CASE("the signing key exports its public key and signs digests that verify", "[pkcs11]")
{
    TempToken token;
    auto keys = open_service(token);
    auto key = keys->create_signing_key("audit");
    REQUIRE(key);
    REQUIRE(keys->find_key(*key));

    auto point = keys->public_key_der(*key);
    REQUIRE(point);
    CHECK(point->size() == 91);  // SPKI of a P-256 point

    const auto digest = sha256_of("chain head 1234");
    auto sig = keys->sign_digest(*key, digest);
    REQUIRE(sig);
    REQUIRE(sig->size() == 64);
    CHECK(openssl_verifies(*point, digest, *sig));

    // The check can fail: another digest or a changed signature does not verify.
    CHECK_FALSE(openssl_verifies(*point, sha256_of("chain head 1235"), *sig));
    Bytes bent = *sig;
    bent[10] ^= 0x01;
    CHECK_FALSE(openssl_verifies(*point, digest, bent));

    // A second key has a different point, and the first key's signature
    // does not verify under it.
    auto key2 = keys->create_signing_key("audit-2");
    REQUIRE(key2);
    auto point2 = keys->public_key_der(*key2);
    REQUIRE(point2);
    CHECK(*point2 != *point);
    CHECK_FALSE(openssl_verifies(*point2, digest, *sig));
}

TEST_CASE("several threads seal and unseal at once", "[pkcs11][concurrency]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    constexpr int threads = 8;
    constexpr int rounds = 40;
    std::atomic<int> ok{0};
    std::atomic<int> failed{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            for (int i = 0; i < rounds; ++i) {
                auto dek = SecureBuffer::allocate(dek_size);
                if (!dek || RAND_bytes(dek->data(), static_cast<int>(dek_size)) != 1) {
                    ++failed;
                    continue;
                }
                const Bytes aad = bytes_of("thread " + std::to_string(t) + " round " + std::to_string(i));
                auto sealed = keys->seal(kek, *dek, aad);
                if (!sealed) {
                    ++failed;
                    continue;
                }
                auto back = keys->unseal(kek, *sealed, aad);
                if (back && back->equals(dek->bytes()))
                    ++ok;
                else
                    ++failed;
            }
        });
    }
    for (auto& w : workers)
        w.join();
    CHECK(failed.load() == 0);
    CHECK(ok.load() == threads * rounds);
}

TEST_CASE("sessions closed under the service (C_CloseAllSessions) are replaced, however many were idle",
          "[pkcs11][concurrency]")
{
    TempToken token;
    auto keys = open_service(token);
    const KeyId kek = new_kek(*keys);
    const SecureBuffer dek = random_dek();
    // Grow the pool: several threads at once leave several idle sessions.
    std::vector<std::thread> workers;
    std::atomic<int> failed{0};
    for (int t = 0; t < 8; ++t)
        workers.emplace_back([&] {
            for (int i = 0; i < 20; ++i)
                if (!keys->seal(kek, dek, {}))
                    ++failed;
        });
    for (auto& w : workers)
        w.join();
    REQUIRE(failed.load() == 0);

    // Another user of the same module closes every session of the slot, as
    // libp11 does when it opens its own (it shares the one loaded module).
    void* handle = ::dlopen(VAULTFS_SOFTHSM_MODULE, RTLD_NOW | RTLD_NOLOAD);
    REQUIRE(handle != nullptr);
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle, "C_GetFunctionList"));
    REQUIRE(get_list != nullptr);
    ck_function_list* fn = nullptr;
    REQUIRE(get_list(&fn) == CKR_OK);
    unsigned long count = 0;
    REQUIRE(fn->C_GetSlotList(1, nullptr, &count) == CKR_OK);
    std::vector<ck_slot_id_t> slots(count);
    REQUIRE(fn->C_GetSlotList(1, slots.data(), &count) == CKR_OK);
    int closed = 0;
    for (const auto slot : slots) {
        ck_token_info info{};
        if (fn->C_GetTokenInfo(slot, &info) == CKR_OK &&
            std::string(reinterpret_cast<const char*>(info.label), 32).rfind(TempToken::label, 0) == 0) {
            REQUIRE(fn->C_CloseAllSessions(slot) == CKR_OK);
            ++closed;
        }
    }
    REQUIRE(closed == 1);
    ::dlclose(handle);

    // The next calls find every pooled session gone, and still work.
    auto sealed = keys->seal(kek, dek, bytes_of("after"));
    REQUIRE(sealed);
    auto back = keys->unseal(kek, *sealed, bytes_of("after"));
    REQUIRE(back);
    CHECK(back->equals(dek.bytes()));
    CHECK(keys->find_key(kek));
}

}  // namespace
}  // namespace vaultfs::hsm
