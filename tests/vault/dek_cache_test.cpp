// Unit tests for vault::DekCache: hits and misses, LRU eviction, TTL
// expiry, the disabled cache, and that an evicted DEK stays valid for a
// reader that still holds it.
#include "vault/crypto/dek_cache.hpp"

#include <catch2/catch.hpp>

#include <openssl/crypto.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

namespace vaultfs::vault {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::uint8_t>;

// A sealed blob as the cache sees it: only its bytes matter.
Bytes sealed(char tag) { return Bytes(60, static_cast<std::uint8_t>(tag)); }

DekCache::Dek dek_of(char fill)
{
    auto b = hsm::SecureBuffer::copy_of(Bytes(32, static_cast<std::uint8_t>(fill)));
    REQUIRE(b);
    return std::make_shared<const hsm::SecureBuffer>(std::move(*b));
}

const std::string kek = "kek-1";

// A clock the test steps: expiry is decided by it, not by how fast the
// machine happens to run.
struct SteppedClock {
    std::shared_ptr<DekCache::Clock::time_point> now =
        std::make_shared<DekCache::Clock::time_point>(DekCache::Clock::time_point{} + 1000h);
    std::function<DekCache::Clock::time_point()> fn() const
    {
        return [n = now] { return *n; };
    }
    void advance(std::chrono::milliseconds d) { *now += d; }
};

TEST_CASE("a miss, an insert, then hits; stats count both", "[dek_cache]")
{
    DekCache cache(16, 60s);
    CHECK(cache.enabled());
    CHECK(cache.find(kek, sealed('a')) == nullptr);
    CHECK(cache.stats().misses == 1);
    CHECK(cache.stats().hits == 0);

    const auto dek = dek_of('A');
    cache.insert(kek, sealed('a'), dek);
    CHECK(cache.stats().entries == 1);
    for (int i = 0; i < 3; ++i) {
        const auto hit = cache.find(kek, sealed('a'));
        REQUIRE(hit != nullptr);
        CHECK(hit == dek);
    }
    CHECK(cache.stats().hits == 3);
    CHECK(cache.stats().misses == 1);

    // The key is the KEK id and the whole sealed blob.
    CHECK(cache.find("kek-2", sealed('a')) == nullptr);
    Bytes one_bit_off = sealed('a');
    one_bit_off[59] ^= 0x01;
    CHECK(cache.find(kek, one_bit_off) == nullptr);
    Bytes shorter = sealed('a');
    shorter.pop_back();
    CHECK(cache.find(kek, shorter) == nullptr);
    CHECK(cache.stats().misses == 4);
    CHECK(cache.stats().hits == 3);
}

TEST_CASE("inserting an existing key replaces its DEK", "[dek_cache]")
{
    DekCache cache(4, 60s);
    cache.insert(kek, sealed('a'), dek_of('1'));
    const auto second = dek_of('2');
    cache.insert(kek, sealed('a'), second);
    CHECK(cache.stats().entries == 1);
    CHECK(cache.find(kek, sealed('a')) == second);
}

TEST_CASE("at capacity the least recently used entry is evicted", "[dek_cache]")
{
    DekCache cache(3, 60s);
    cache.insert(kek, sealed('a'), dek_of('A'));
    cache.insert(kek, sealed('b'), dek_of('B'));
    cache.insert(kek, sealed('c'), dek_of('C'));
    CHECK(cache.stats().entries == 3);

    // Touch a: b is now the least recently used.
    REQUIRE(cache.find(kek, sealed('a')) != nullptr);
    cache.insert(kek, sealed('d'), dek_of('D'));
    CHECK(cache.stats().entries == 3);
    CHECK(cache.find(kek, sealed('b')) == nullptr);
    CHECK(cache.find(kek, sealed('a')) != nullptr);
    CHECK(cache.find(kek, sealed('c')) != nullptr);
    CHECK(cache.find(kek, sealed('d')) != nullptr);

    // Order now (most recent first): d, c, a. Inserting e evicts a.
    cache.insert(kek, sealed('e'), dek_of('E'));
    CHECK(cache.find(kek, sealed('a')) == nullptr);
    CHECK(cache.find(kek, sealed('c')) != nullptr);
    CHECK(cache.stats().entries == 3);
}

TEST_CASE("entries expire after the TTL", "[dek_cache]")
{
    SteppedClock clock;
    DekCache cache(16, 50ms, clock.fn());
    cache.insert(kek, sealed('a'), dek_of('A'));
    REQUIRE(cache.find(kek, sealed('a')) != nullptr);
    clock.advance(49ms);
    REQUIRE(cache.find(kek, sealed('a')) != nullptr);
    clock.advance(1ms);  // the TTL, to the millisecond
    CHECK(cache.find(kek, sealed('a')) == nullptr);
    CHECK(cache.stats().entries == 0);  // the expired entry was dropped by the lookup
    CHECK(cache.stats().hits == 2);
    CHECK(cache.stats().misses == 1);

    // A hit does not extend an entry's life.
    DekCache slower(16, 200ms, clock.fn());
    slower.insert(kek, sealed('b'), dek_of('B'));
    clock.advance(150ms);
    REQUIRE(slower.find(kek, sealed('b')) != nullptr);
    clock.advance(50ms);
    CHECK(slower.find(kek, sealed('b')) == nullptr);
}

TEST_CASE("sweep drops expired entries without a lookup", "[dek_cache]")
{
    SteppedClock clock;
    DekCache cache(16, 100ms, clock.fn());
    const auto held = dek_of('A');
    cache.insert(kek, sealed('a'), held);
    cache.insert(kek, sealed('b'), dek_of('B'));
    CHECK(held.use_count() == 2);
    clock.advance(100ms);
    cache.insert(kek, sealed('c'), dek_of('C'));  // fresh
    cache.sweep();
    CHECK(cache.stats().entries == 1);
    CHECK(held.use_count() == 1);  // the cache let go of it
    CHECK(cache.find(kek, sealed('c')) != nullptr);
}

TEST_CASE("capacity 0 or TTL 0 turns the cache off", "[dek_cache]")
{
    const auto check_disabled = [](DekCache& cache) {
        CHECK_FALSE(cache.enabled());
        const auto dek = dek_of('A');
        cache.insert(kek, sealed('a'), dek);
        CHECK(dek.use_count() == 1);
        CHECK(cache.find(kek, sealed('a')) == nullptr);
        CHECK(cache.find(kek, sealed('a')) == nullptr);
        CHECK(cache.stats().entries == 0);
        CHECK(cache.stats().hits == 0);
        CHECK(cache.stats().misses == 2);
    };
    SECTION("capacity 0")
    {
        DekCache cache(0, 60s);
        check_disabled(cache);
    }
    SECTION("ttl 0")
    {
        DekCache cache(16, 0ms);
        check_disabled(cache);
    }
}

TEST_CASE("an evicted DEK stays valid for the reader holding it", "[dek_cache]")
{
    DekCache cache(1, 60s);
    cache.insert(kek, sealed('a'), dek_of('A'));
    const DekCache::Dek reader = cache.find(kek, sealed('a'));
    REQUIRE(reader != nullptr);

    cache.insert(kek, sealed('b'), dek_of('B'));  // evicts a
    CHECK(cache.find(kek, sealed('a')) == nullptr);
    CHECK(reader.use_count() == 1);  // only the reader holds it now
    CHECK(reader->size() == 32);
    CHECK(CRYPTO_secure_allocated(reader->data()) == 1);
    CHECK(reader->equals(Bytes(32, 'A')));

    cache.clear();
    CHECK(cache.stats().entries == 0);
    CHECK(reader->equals(Bytes(32, 'A')));
}

TEST_CASE("clear empties the cache and releases every DEK", "[dek_cache]")
{
    const std::size_t before = hsm::secure_heap_used();
    {
        DekCache cache(8, 60s);
        for (char c = 'a'; c < 'f'; ++c)
            cache.insert(kek, sealed(c), dek_of(c));
        CHECK(hsm::secure_heap_used() > before);
        cache.clear();
        CHECK(cache.stats().entries == 0);
        CHECK(cache.find(kek, sealed('a')) == nullptr);
        CHECK(hsm::secure_heap_used() == before);
    }
}

TEST_CASE("concurrent lookups and inserts keep the cache consistent", "[dek_cache][concurrency]")
{
    DekCache cache(8, 60s);
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 6; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 500; ++i) {
                const char tag = static_cast<char>('a' + (i + t) % 16);
                if (auto hit = cache.find(kek, sealed(tag))) {
                    if (!hit->equals(Bytes(32, static_cast<std::uint8_t>(tag))))
                        ++wrong;
                } else {
                    // No Catch2 assertions off the main thread.
                    auto b = hsm::SecureBuffer::copy_of(Bytes(32, static_cast<std::uint8_t>(tag)));
                    if (!b) {
                        ++wrong;
                        continue;
                    }
                    cache.insert(kek, sealed(tag), std::make_shared<const hsm::SecureBuffer>(std::move(*b)));
                }
            }
        });
    }
    for (auto& t : threads)
        t.join();
    CHECK(wrong.load() == 0);
    const auto s = cache.stats();
    CHECK(s.entries <= 8);
    CHECK(s.hits + s.misses == 6 * 500);
}

}  // namespace
}  // namespace vaultfs::vault
