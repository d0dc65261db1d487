// Unit tests for hsm::SecureBuffer: sizes and capacity, wiping, copies,
// comparison, moves — and that every byte really lives in OpenSSL's locked
// heap (CRYPTO_secure_allocated), never in ordinary memory.
#include "hsm/secure_buffer.hpp"

#include <catch2/catch.hpp>

#include <openssl/crypto.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "tests/hsm/hsm_support.hpp"

namespace vaultfs::hsm {
namespace {

bool is_locked(const void* p) { return p != nullptr && CRYPTO_secure_allocated(p) == 1; }

SecureBuffer copy(const std::vector<std::uint8_t>& v)
{
    auto b = SecureBuffer::copy_of(v);
    REQUIRE(b);
    return std::move(*b);
}

// Every test must give back what it took from the locked heap.
struct HeapBalance {
    std::size_t before = secure_heap_used();
    ~HeapBalance() { CHECK(secure_heap_used() == before); }
};

TEST_CASE("the locked heap is set up by the test main and re-initialising is a no-op", "[secure_buffer]")
{
    const std::size_t size = secure_heap_size();
    REQUIRE(size >= (8u << 20));
    CHECK(std::has_single_bit(size));
    REQUIRE(init_secure_heap(1 << 16));
    CHECK(secure_heap_size() == size);
}

TEST_CASE("allocate gives zero-filled locked memory of the requested size", "[secure_buffer]")
{
    HeapBalance balance;
    {
        auto b = SecureBuffer::allocate(100);
        REQUIRE(b);
        CHECK(b->size() == 100);
        CHECK(b->capacity() == 100);
        CHECK_FALSE(b->empty());
        CHECK(is_locked(b->data()));
        CHECK(std::all_of(b->bytes().begin(), b->bytes().end(), [](std::uint8_t c) { return c == 0; }));
        CHECK(secure_heap_used() >= balance.before + 100);

        auto roomy = SecureBuffer::allocate(4, 64);
        REQUIRE(roomy);
        CHECK(roomy->size() == 4);
        CHECK(roomy->capacity() == 64);
        CHECK(is_locked(roomy->data()));

        // A capacity below the size is raised to the size.
        auto tight = SecureBuffer::allocate(32, 8);
        REQUIRE(tight);
        CHECK(tight->capacity() == 32);

        auto none = SecureBuffer::allocate(0);
        REQUIRE(none);
        CHECK(none->empty());
        CHECK(none->size() == 0);
    }
}

TEST_CASE("an allocation the locked heap cannot hold fails instead of using ordinary memory", "[secure_buffer]")
{
    HeapBalance balance;
    auto huge = SecureBuffer::allocate(secure_heap_size() * 2);
    REQUIRE_FALSE(huge);
    CHECK(huge.error().code == Errc::out_of_secure_memory);
    CHECK_THAT(huge.error().message, Catch::Contains("exhausted"));

    auto small = SecureBuffer::allocate(16);
    REQUIRE(small);
    auto grow = small->resize(secure_heap_size() * 2);
    REQUIRE_FALSE(grow);
    CHECK(grow.error().code == Errc::out_of_secure_memory);
    // A failed resize leaves the buffer as it was.
    CHECK(small->size() == 16);
    CHECK(is_locked(small->data()));
}

TEST_CASE("resize within capacity keeps the block, zero-fills growth and wipes what it cuts off", "[secure_buffer]")
{
    HeapBalance balance;
    auto b = SecureBuffer::allocate(8, 32);
    REQUIRE(b);
    std::fill(b->data(), b->data() + 8, std::uint8_t{0xAA});
    const std::uint8_t* block = b->data();

    REQUIRE(b->resize(3));
    CHECK(b->size() == 3);
    CHECK(b->data() == block);
    CHECK(std::all_of(b->data(), b->data() + 3, [](std::uint8_t c) { return c == 0xAA; }));
    // The bytes cut off are wiped in place (still inside the allocation).
    CHECK(std::all_of(b->data() + 3, b->data() + 8, [](std::uint8_t c) { return c == 0; }));

    std::fill(b->data() + 3, b->data() + 32, std::uint8_t{0x55});  // junk beyond size
    REQUIRE(b->resize(20));
    CHECK(b->size() == 20);
    CHECK(b->data() == block);
    CHECK(std::all_of(b->data(), b->data() + 3, [](std::uint8_t c) { return c == 0xAA; }));
    CHECK(std::all_of(b->data() + 3, b->data() + 20, [](std::uint8_t c) { return c == 0; }));
}

TEST_CASE("resize beyond capacity moves the bytes to a larger locked block", "[secure_buffer]")
{
    HeapBalance balance;
    auto b = SecureBuffer::allocate(0, 4);
    REQUIRE(b);
    const std::string text = "abcd";
    REQUIRE(b->resize(4));
    std::copy(text.begin(), text.end(), b->data());

    REQUIRE(b->resize(1000));
    CHECK(b->size() == 1000);
    CHECK(b->capacity() >= 1000);
    CHECK(is_locked(b->data()));
    CHECK(std::equal(text.begin(), text.end(), b->data()));
    CHECK(std::all_of(b->data() + 4, b->data() + 1000, [](std::uint8_t c) { return c == 0; }));

    // Growing a byte at a time (as a write buffer does) stays in locked memory.
    auto grown = SecureBuffer::allocate(0);
    REQUIRE(grown);
    for (std::size_t i = 1; i <= 3000; ++i) {
        REQUIRE(grown->resize(i));
        grown->data()[i - 1] = static_cast<std::uint8_t>(i);
    }
    CHECK(is_locked(grown->data()));
    for (std::size_t i = 1; i <= 3000; ++i)
        REQUIRE(grown->data()[i - 1] == static_cast<std::uint8_t>(i));
}

TEST_CASE("clear releases the memory and leaves an empty buffer", "[secure_buffer]")
{
    HeapBalance balance;
    auto b = SecureBuffer::allocate(256);
    REQUIRE(b);
    CHECK(secure_heap_used() > balance.before);
    b->clear();
    CHECK(b->empty());
    CHECK(b->data() == nullptr);
    CHECK(b->capacity() == 0);
    CHECK(secure_heap_used() == balance.before);
    b->clear();  // twice is harmless
    CHECK(b->empty());
    // A cleared buffer can grow again.
    REQUIRE(b->resize(10));
    CHECK(is_locked(b->data()));
}

TEST_CASE("copy_of copies into locked memory", "[secure_buffer]")
{
    HeapBalance balance;
    std::vector<std::uint8_t> all(256);
    std::iota(all.begin(), all.end(), 0);
    auto b = SecureBuffer::copy_of(all);
    REQUIRE(b);
    CHECK(b->size() == 256);
    CHECK(is_locked(b->data()));
    CHECK(b->data() != all.data());
    CHECK(std::equal(all.begin(), all.end(), b->data()));
    // The copy is independent of its source.
    all[0] = 0xff;
    CHECK(b->data()[0] == 0);

    auto empty = SecureBuffer::copy_of({});
    REQUIRE(empty);
    CHECK(empty->empty());
}

TEST_CASE("equals compares content and length", "[secure_buffer]")
{
    HeapBalance balance;
    const auto b = copy(bytes_of("correct horse"));
    CHECK(b.equals(bytes_of("correct horse")));
    CHECK_FALSE(b.equals(bytes_of("correct horsE")));
    CHECK_FALSE(b.equals(bytes_of("Correct horse")));
    CHECK_FALSE(b.equals(bytes_of("correct hors")));
    CHECK_FALSE(b.equals(bytes_of("correct horse!")));
    CHECK_FALSE(b.equals({}));

    const SecureBuffer none;
    CHECK(none.equals({}));
    CHECK_FALSE(none.equals(bytes_of("x")));
}

TEST_CASE("redacted never shows the content", "[secure_buffer]")
{
    HeapBalance balance;
    const auto b = copy(bytes_of("hunter2"));
    CHECK(b.redacted() == "<secret: 7 bytes>");
    CHECK(b.redacted().find("hunter2") == std::string::npos);
}

TEST_CASE("moves transfer ownership of the locked block", "[secure_buffer]")
{
    HeapBalance balance;
    auto a = copy(bytes_of("first value"));
    const std::uint8_t* block = a.data();

    SecureBuffer b(std::move(a));
    CHECK(b.data() == block);
    CHECK(b.equals(bytes_of("first value")));
    CHECK(a.data() == nullptr);  // NOLINT(bugprone-use-after-move): the moved-from state is the contract
    CHECK(a.empty());
    CHECK(a.capacity() == 0);

    // Move assignment releases what the target held.
    auto c = copy(bytes_of("second, longer value to be released"));
    const std::size_t with_c = secure_heap_used();
    c = std::move(b);
    CHECK(secure_heap_used() < with_c);
    CHECK(c.data() == block);
    CHECK(c.equals(bytes_of("first value")));
    CHECK(b.empty());  // NOLINT(bugprone-use-after-move)

    // Self-move leaves the buffer intact.
    SecureBuffer& alias = c;
    c = std::move(alias);
    CHECK(c.data() == block);
    CHECK(c.equals(bytes_of("first value")));

    // A moved-from buffer is usable again.
    REQUIRE(a.resize(3));
    CHECK(is_locked(a.data()));
}

}  // namespace
}  // namespace vaultfs::hsm
