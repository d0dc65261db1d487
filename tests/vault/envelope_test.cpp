// Unit tests for vault/envelope: value sealing with AES-256-GCM under a DEK,
// what makes it fail (Errc::integrity), and the associated data that binds
// a stored version to its vault, name, version and KEK.
#include "vault/crypto/envelope.hpp"

#include <catch2/catch.hpp>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace vaultfs::vault {
namespace {

using Bytes = std::vector<std::uint8_t>;

hsm::SecureBuffer fresh_dek()
{
    auto dek = new_dek();
    REQUIRE(dek);
    return std::move(*dek);
}

Bytes sample_aad() { return value_aad(Binding{VaultId{7}, "db-password", 3, "00ff00ff00ff00ff00ff00ff00ff00ff"}); }

TEST_CASE("new_dek gives 32 random bytes in locked memory", "[envelope]")
{
    const auto a = fresh_dek();
    const auto b = fresh_dek();
    CHECK(a.size() == hsm::dek_size);
    CHECK(CRYPTO_secure_allocated(a.data()) == 1);
    CHECK_FALSE(a.equals(b.bytes()));
    CHECK_FALSE(std::all_of(a.bytes().begin(), a.bytes().end(), [](std::uint8_t c) { return c == 0; }));
}

TEST_CASE("seal_value and open_value round trip values of every size the vault stores", "[envelope]")
{
    Bytes plaintext;
    SECTION("empty") {}
    SECTION("one byte") { plaintext = {'x'}; }
    SECTION("25 KiB")
    {
        plaintext.resize(max_value_size);
        for (std::size_t i = 0; i < plaintext.size(); ++i)
            plaintext[i] = static_cast<std::uint8_t>('A' + i % 26);
    }
    SECTION("binary: all 256 byte values")
    {
        plaintext.resize(256);
        std::iota(plaintext.begin(), plaintext.end(), 0);
    }
    INFO("plaintext size " << plaintext.size());

    const auto dek = fresh_dek();
    const Bytes aad = sample_aad();
    auto sealed = seal_value(dek, plaintext, aad);
    REQUIRE(sealed);
    CHECK(sealed->nonce.size() == value_nonce_size);
    CHECK(sealed->ciphertext.size() == plaintext.size() + value_tag_size);
    if (plaintext.size() >= 16) {
        // The plaintext does not show through.
        CHECK(std::search(sealed->ciphertext.begin(), sealed->ciphertext.end(), plaintext.begin(),
                          plaintext.begin() + 16) == sealed->ciphertext.end());
    }

    auto opened = open_value(dek, sealed->nonce, sealed->ciphertext, aad);
    REQUIRE(opened);
    CHECK(opened->size() == plaintext.size());
    CHECK(opened->equals(plaintext));
    if (!plaintext.empty())
        CHECK(CRYPTO_secure_allocated(opened->data()) == 1);
}

TEST_CASE("every seal uses a fresh nonce", "[envelope]")
{
    const auto dek = fresh_dek();
    const Bytes value = {'s', 'a', 'm', 'e'};
    auto a = seal_value(dek, value, sample_aad());
    auto b = seal_value(dek, value, sample_aad());
    REQUIRE(a);
    REQUIRE(b);
    CHECK(a->nonce != b->nonce);
    CHECK(a->ciphertext != b->ciphertext);
}

TEST_CASE("any change to what was sealed is Errc::integrity", "[envelope]")
{
    const auto dek = fresh_dek();
    Bytes plaintext(100);
    std::iota(plaintext.begin(), plaintext.end(), 1);
    const Bytes aad = sample_aad();
    auto sealed_r = seal_value(dek, plaintext, aad);
    REQUIRE(sealed_r);
    const SealedValue sealed = *sealed_r;
    Bytes nonce = sealed.nonce;
    Bytes ciphertext = sealed.ciphertext;
    Bytes with_aad = aad;
    auto copy = hsm::SecureBuffer::copy_of(dek.bytes());
    REQUIRE(copy);
    hsm::SecureBuffer key = std::move(*copy);

    SECTION("wrong AAD")
    {
        with_aad = value_aad(Binding{VaultId{7}, "db-password", 4, "00ff00ff00ff00ff00ff00ff00ff00ff"});
    }
    SECTION("AAD cut short") { with_aad.pop_back(); }
    SECTION("no AAD") { with_aad.clear(); }
    SECTION("flipped nonce bit") { nonce[3] ^= 0x01; }
    SECTION("flipped ciphertext bit") { ciphertext[50] ^= 0x20; }
    SECTION("flipped first ciphertext bit") { ciphertext[0] ^= 0x01; }
    SECTION("flipped tag bit") { ciphertext[ciphertext.size() - 1] ^= 0x80; }
    SECTION("ciphertext truncated") { ciphertext.erase(ciphertext.begin() + 10); }
    SECTION("ciphertext extended") { ciphertext.insert(ciphertext.begin() + 10, 0); }
    SECTION("another DEK") { key = fresh_dek(); }
    SECTION("a flipped DEK bit") { key.data()[31] ^= 0x01; }
    SECTION("a nonce of the wrong length") { nonce.pop_back(); }
    SECTION("a ciphertext shorter than a tag") { ciphertext.resize(value_tag_size - 1); }

    auto opened = open_value(key, nonce, ciphertext, with_aad);
    REQUIRE_FALSE(opened);
    CHECK(opened.error().code == Errc::integrity);

    // The untouched original still opens.
    auto fine = open_value(dek, sealed.nonce, sealed.ciphertext, aad);
    REQUIRE(fine);
    CHECK(fine->equals(plaintext));
}

TEST_CASE("a DEK of the wrong size is refused", "[envelope]")
{
    auto short_dek = hsm::SecureBuffer::allocate(16);
    REQUIRE(short_dek);
    const Bytes value = {'v'};
    auto sealed = seal_value(*short_dek, value, {});
    REQUIRE_FALSE(sealed);
    CHECK(sealed.error().code == Errc::invalid_argument);
}

TEST_CASE("value and DEK associated data differ for the same binding", "[envelope]")
{
    const Binding b{VaultId{1}, "api-key", 1, "0123456789abcdef0123456789abcdef"};
    CHECK(value_aad(b) != dek_aad(b));
    // Deterministic: the reader recomputes exactly what the writer used.
    CHECK(value_aad(b) == value_aad(Binding{VaultId{1}, "api-key", 1, "0123456789abcdef0123456789abcdef"}));
    CHECK(dek_aad(b) == dek_aad(Binding{VaultId{1}, "api-key", 1, "0123456789abcdef0123456789abcdef"}));

    // A value sealed with the DEK's AAD does not open with the value's.
    const auto dek = fresh_dek();
    const Bytes value = {'v'};
    auto sealed = seal_value(dek, value, dek_aad(b));
    REQUIRE(sealed);
    auto opened = open_value(dek, sealed->nonce, sealed->ciphertext, value_aad(b));
    REQUIRE_FALSE(opened);
    CHECK(opened.error().code == Errc::integrity);
}

TEST_CASE("every bound field changes the associated data", "[envelope]")
{
    const std::string kek = "0123456789abcdef0123456789abcdef";
    const Binding base{VaultId{1}, "api-key", 1, kek};
    const Binding changed[] = {
        {VaultId{2}, "api-key", 1, kek},                            // vault id
        {VaultId{1}, "api-kez", 1, kek},                            // name
        {VaultId{1}, "api-key", 2, kek},                            // version
        {VaultId{1}, "api-key", 1, "0123456789abcdef0123456789abcdee"},  // kek id
        {VaultId{1}, "API-KEY", 1, kek},                            // case matters
        {VaultId{256}, "api-key", 1, kek},                          // high byte of the id
        {VaultId{1}, "api-key", 1ull << 32, kek},                   // high bits of the version
    };
    for (const auto& c : changed) {
        INFO("vault " << c.vault.value << " secret " << c.secret << " version " << c.version << " kek " << c.kek_id);
        CHECK(value_aad(c) != value_aad(base));
        CHECK(dek_aad(c) != dek_aad(base));
    }
    // Fields are delimited: moving characters between name and KEK id, or
    // between a name and its version, does not give the same bytes.
    CHECK(value_aad(Binding{VaultId{1}, "ab", 1, "cd"}) != value_aad(Binding{VaultId{1}, "abc", 1, "d"}));
    CHECK(value_aad(Binding{VaultId{1}, "a", 12, "k"}) != value_aad(Binding{VaultId{1}, "a1", 2, "k"}));
}

}  // namespace
}  // namespace vaultfs::vault
