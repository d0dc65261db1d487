// Unit tests for vault/audit/coalescer: the bound on what refusals of
// callers who hold nothing can write.
#include "vault/audit/coalescer.hpp"

#include <catch2/catch.hpp>

namespace vaultfs::vault::audit {
namespace {

constexpr Micros s = 1000000;
using Key = RefusalCoalescer::Key;

TEST_CASE("the first refusal of a group is written, repeats in its window only counted", "[audit][coalescer]")
{
    RefusalCoalescer c(10 * s);
    const Key mkdir{1001, "vault_create", "EACCES"};
    auto v = c.admit(mkdir, 100, 0);
    CHECK(v.write);
    CHECK_FALSE(v.flush);
    for (int i = 1; i <= 5000; ++i) {
        v = c.admit(mkdir, 100, i * 1000);  // 5000 in 5 s
        CHECK_FALSE(v.write);
        CHECK_FALSE(v.flush);
    }
    // Another op, result or uid is another group.
    CHECK(c.admit(Key{1001, "lookup", "ENOENT"}, 100, 1 * s).write);
    CHECK(c.admit(Key{1001, "vault_create", "EINVAL"}, 100, 1 * s).write);
    CHECK(c.admit(Key{1002, "vault_create", "EACCES"}, 100, 1 * s).write);
    CHECK(c.groups() == 4);

    // Nothing ends before the window does.
    CHECK(c.drain(9 * s).empty());
    const auto done = c.drain(11 * s);
    REQUIRE(done.size() == 1);  // only the group with repeats has something to say
    CHECK(done[0].key == mkdir);
    CHECK(done[0].count == 5000);
    CHECK(done[0].first == 1000);
    CHECK(done[0].last == 5000 * 1000);
    CHECK(done[0].gid == 100);
    CHECK(c.groups() == 0);

    // After the window the next refusal is written at once again.
    CHECK(c.admit(mkdir, 100, 12 * s).write);
}

TEST_CASE("a refusal after the window flushes the old group's count first", "[audit][coalescer]")
{
    RefusalCoalescer c(10 * s);
    const Key k{7, "lookup", "ENOENT"};
    REQUIRE(c.admit(k, 7, 0).write);
    REQUIRE_FALSE(c.admit(k, 7, 1 * s).write);
    REQUIRE_FALSE(c.admit(k, 7, 2 * s).write);
    const auto v = c.admit(k, 7, 12 * s);
    CHECK(v.write);
    REQUIRE(v.flush);
    CHECK(v.flush->count == 2);
    CHECK(v.flush->last == 2 * s);
}

TEST_CASE("past its capacity, new groups are counted together", "[audit][coalescer]")
{
    RefusalCoalescer c(10 * s, 3);
    for (int uid = 0; uid < 3; ++uid)
        CHECK(c.admit(Key{uid, "lookup", "ENOENT"}, 0, 0).write);
    for (int uid = 3; uid < 100; ++uid)
        CHECK_FALSE(c.admit(Key{uid, "lookup", "ENOENT"}, 0, 1).write);
    const auto all = c.drain(0, true);
    REQUIRE(all.size() == 1);
    CHECK(all[0].key == Key{-1, "*", "*"});
    CHECK(all[0].count == 97);
}

}  // namespace
}  // namespace vaultfs::vault::audit
