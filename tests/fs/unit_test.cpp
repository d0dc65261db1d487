// fs unit tests: inode numbering, the errno mapping, control requests, the
// caller cache, per-uid quotas, the INIT replay of a restart.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <linux/fuse.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "fs/fuse/caller_cache.hpp"
#include "fs/control/protocol.hpp"
#include "fs/fuse/errno_map.hpp"
#include "fs/fuse/inode.hpp"
#include "fs/daemon/restart/device_io.hpp"
#include "fs/fuse/uid_quota.hpp"
#include "vault/model/error.hpp"

using namespace vaultfs;

TEST_CASE("inode numbers round-trip and never collide across kinds", "[fs]")
{
    using fs::NodeKind;
    for (const auto kind : {NodeKind::vault, NodeKind::policy_file, NodeKind::versions_dir, NodeKind::deleted_dir,
                            NodeKind::secret, NodeKind::version, NodeKind::deleted_secret, NodeKind::current,
                            NodeKind::staging, NodeKind::keys_dir, NodeKind::key, NodeKind::key_version,
                            NodeKind::key_file, NodeKind::certs_dir, NodeKind::cert, NodeKind::cert_version,
                            NodeKind::cert_file}) {
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
    CHECK(fs::to_ino({NodeKind::current, 7}) != fs::to_ino({NodeKind::version, 7}));
    CHECK_FALSE(fs::from_ino(std::uint64_t{18} << 56 | 1));  // unknown kind
}

TEST_CASE("audit result names agree with the errno the fs layer returns", "[fs]")
{
    using vault::Errc;
    for (const auto code : {Errc::not_found, Errc::already_exists, Errc::invalid_argument, Errc::too_large,
                            Errc::access_denied, Errc::disabled, Errc::not_valid_now, Errc::not_permitted,
                            Errc::read_only, Errc::not_empty, Errc::integrity, Errc::key_unavailable, Errc::storage,
                            Errc::no_space, Errc::audit_unavailable, Errc::out_of_memory, Errc::busy, Errc::too_many_open, Errc::stale,
                            Errc::no_attribute, Errc::not_fresh, Errc::in_doubt}) {
        const int e = fs::to_errno(code);
        INFO(static_cast<int>(code));
        CHECK(std::string(vault::result_name(code)) == strerrorname_np(e));
    }
}

TEST_CASE("control requests: an empty name or document is refused, not taken as absent", "[fs]")
{
    // Found by the control fuzzer: "vault":"" parsed, then rendered without
    // the vault, a different request.
    for (const auto& [text, error] : std::vector<std::pair<std::string, std::string>>{
             {R"({"cmd":"backup","vault":""})", "\"vault\" must not be empty"},
             {R"({"cmd":"backup","vault":"payments","secret":""})", "\"secret\" must not be empty"},
             {R"({"cmd":"restore","backup":""})", "\"backup\" must not be empty"},
             {R"({"cmd":"restore","backup":"{}","into":""})", "\"into\" must not be empty"}}) {
        INFO(text);
        const auto r = fs::parse_request(text);
        REQUIRE_FALSE(r);
        CHECK(r.error() == error);
    }
    const auto r = fs::parse_request(R"({"cmd":"backup","vault":"payments","secret":"db-password"})");
    REQUIRE(r);
    CHECK(fs::parse_request(fs::render_request(*r))->secret == "db-password");
}

TEST_CASE("the caller cache refetches when the same pid comes back with another uid or gid", "[fs]")
{
    fs::CallerCache cache;
    int fetches = 0;
    const auto fetch = [&](std::vector<gid_t> groups) {
        return [&fetches, groups]() -> std::optional<std::vector<gid_t>> {
            ++fetches;
            return groups;
        };
    };
    CHECK(cache.groups(42, 1000, 1000, fetch({7, 8})) == std::vector<gid_t>{7, 8});
    CHECK(fetches == 1);
    // Same pid, uid and gid within the second: from the cache.
    CHECK(cache.groups(42, 1000, 1000, fetch({9})) == std::vector<gid_t>{7, 8});
    CHECK(fetches == 1);
    // The same pid now another uid (setuid, or a recycled pid): fetched again.
    CHECK(cache.groups(42, 1001, 1000, fetch({9})) == std::vector<gid_t>{9});
    CHECK(fetches == 2);
    // ... or another gid.
    CHECK(cache.groups(42, 1001, 1002, fetch({10})) == std::vector<gid_t>{10});
    CHECK(fetches == 3);
    // Back to the first identity: the entry was replaced, so fetched again.
    CHECK(cache.groups(42, 1000, 1000, fetch({7})) == std::vector<gid_t>{7});
    CHECK(fetches == 4);
    // A fetch that fails is not cached: the next call asks again.
    CHECK_FALSE(cache.groups(43, 5, 5, [&]() -> std::optional<std::vector<gid_t>> {
        ++fetches;
        return std::nullopt;
    }));
    CHECK(cache.groups(43, 5, 5, fetch({11})) == std::vector<gid_t>{11});
    CHECK(fetches == 6);
}

TEST_CASE("per-uid quotas: handles and bytes per uid, bytes in total; charges come back with their handles", "[fs]")
{
    fs::UidQuota quota(2, 100, 150);
    auto a1 = quota.open(1001);
    auto a2 = quota.open(1001);
    REQUIRE(a1);
    REQUIRE(a2);
    CHECK_FALSE(quota.open(1001));  // at its handle limit
    auto b1 = quota.open(1002);     // another uid is not
    REQUIRE(b1);

    CHECK(a1->grow(60));
    CHECK_FALSE(a2->grow(41));  // 101 > the uid's 100
    CHECK(a2->grow(40));
    CHECK(quota.usage(1001).bytes == 100);
    CHECK(b1->grow(50));
    CHECK_FALSE(b1->grow(1));  // 151 > the total's 150, although uid 1002 holds only 50
    CHECK(quota.usage(1002).bytes == 50);

    a1.reset();  // its 60 bytes and its handle come back
    CHECK(quota.usage(1001).bytes == 40);
    CHECK(quota.usage(1001).handles == 1);
    CHECK(b1->grow(50));
    auto a3 = quota.open(1001);
    REQUIRE(a3);
    a2.reset();
    a3.reset();
    b1.reset();
    CHECK(quota.usage(1001).handles == 0);
    CHECK(quota.usage(1002).bytes == 0);
    auto c = quota.open(1003);
    auto d = quota.open(1004);
    CHECK(c->grow(100));  // everything was given back
    CHECK(d->grow(50));
}

namespace {

// FUSE_INIT as a 6.1 kernel sends it (protocol 7.38).
std::vector<std::uint8_t> init_request()
{
    fuse_in_header h{};
    fuse_init_in in{};
    h.len = sizeof h + sizeof in;
    h.opcode = FUSE_INIT;
    h.unique = 2;
    in.major = 7;
    in.minor = 38;
    in.max_readahead = 131072;
    in.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ATOMIC_O_TRUNC | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES;
    std::vector<std::uint8_t> bytes(h.len);
    std::memcpy(bytes.data(), &h, sizeof h);
    std::memcpy(bytes.data() + sizeof h, &in, sizeof in);
    return bytes;
}

// The reply a session whose init callback is `init` makes to `request`,
// replayed through DeviceIo (sent nowhere).
std::vector<std::uint8_t> replayed(void (*init)(void*, fuse_conn_info*), const std::vector<std::uint8_t>& request)
{
    fuse_lowlevel_ops ops{};
    ops.init = init;
    char name[] = "vaultfs-test";
    char* argv[] = {name};
    fuse_args args = FUSE_ARGS_INIT(1, argv);
    fuse_session* se = fuse_session_new(&args, &ops, sizeof ops, nullptr);
    fuse_opt_free_args(&args);  // the session keeps what it needs
    REQUIRE(se != nullptr);
    fs::restart::DeviceIo io;
    REQUIRE(io.install(se, ::open("/dev/null", O_RDWR | O_CLOEXEC)));
    auto reply = io.replay_init(fs::restart::InitExchange{request, {}});
    fuse_session_destroy(se);
    return reply;
}

void plain_init(void*, fuse_conn_info*) {}
void small_writes(void*, fuse_conn_info* conn) { conn->max_write = 4096; }

}  // namespace

TEST_CASE("a restart's INIT replay: the same code makes the same reply, other options another", "[fs][restart]")
{
    const auto request = init_request();
    const auto a = replayed(plain_init, request);
    REQUIRE(a.size() >= sizeof(fuse_out_header) + 24);
    fuse_out_header h{};
    std::memcpy(&h, a.data(), sizeof h);
    CHECK(h.unique == 2);
    CHECK(h.error == 0);
    CHECK(h.len == a.size());
    // Byte for byte: what a restart's new process compares with the saved reply.
    CHECK(replayed(plain_init, request) == a);
    const auto b = replayed(small_writes, request);
    CHECK(b != a);
    CHECK(fs::restart::init_difference(a, b).find("max_write ") != std::string::npos);
    CHECK(fs::restart::init_difference(a, b).find(" -> 4096") != std::string::npos);
}
