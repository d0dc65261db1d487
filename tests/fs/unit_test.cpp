// fs unit tests: inode numbering and the errno mapping.
#include <catch2/catch.hpp>

#include <cstring>
#include <string>

#include "fs/errno_map.hpp"
#include "fs/inode.hpp"
#include "vault/error.hpp"

using namespace vaultfs;

TEST_CASE("inode numbers round-trip and never collide across kinds", "[fs]")
{
    using fs::NodeKind;
    for (const auto kind : {NodeKind::vault, NodeKind::policy_file, NodeKind::versions_dir, NodeKind::deleted_dir,
                            NodeKind::secret, NodeKind::version, NodeKind::deleted_secret}) {
        for (const std::int64_t id : {std::int64_t{1}, std::int64_t{2}, std::int64_t{1} << 40}) {
            const auto ino = fs::to_ino({kind, id});
            CHECK(ino != fs::root_ino);
            const auto back = fs::from_ino(ino);
            REQUIRE(back);
            CHECK(back->kind == kind);
            CHECK(back->id == id);
        }
    }
    CHECK(fs::to_ino({NodeKind::secret, 7}) != fs::to_ino({NodeKind::version, 7}));
    CHECK(fs::from_ino(fs::root_ino)->kind == NodeKind::root);
    CHECK_FALSE(fs::from_ino(0));
    CHECK_FALSE(fs::from_ino(2));                          // kind 0 but not the root
    CHECK_FALSE(fs::from_ino(std::uint64_t{8} << 56 | 1));  // unknown kind
}

TEST_CASE("audit result names agree with the errno the fs layer returns", "[fs]")
{
    using vault::Errc;
    for (const auto code : {Errc::not_found, Errc::already_exists, Errc::invalid_argument, Errc::too_large,
                            Errc::access_denied, Errc::disabled, Errc::not_valid_now, Errc::not_permitted,
                            Errc::read_only, Errc::not_empty, Errc::integrity, Errc::key_unavailable, Errc::storage,
                            Errc::no_space, Errc::audit_unavailable, Errc::out_of_memory, Errc::busy,
                            Errc::no_attribute}) {
        const int e = fs::to_errno(code);
        INFO(static_cast<int>(code));
        CHECK(std::string(vault::result_name(code)) == strerrorname_np(e));
    }
}
