// Integration: the attacks of issue 13 (continued from attack_test.cpp) --
// mmap, callers' groups, revocation of open handles, and smaller holes
// (control slots, unmanageable policies, the state lock, staging files).
#include "attack_support.hpp"

using namespace vaultfs::testing;
using json = nlohmann::json;

namespace vaultfs::testing::attack {

// ---- 5. mmap never serves a superseded or disabled version -------------------------------------

TEST_CASE("attack: pages a reader's mmap keeps alive are never served to a new opener", "[fs][attack][mmap]")
{
    Mount m;
    REQUIRE(make_dir(m.path("mapped")).err == 0);
    REQUIRE(write_file(m.path("mapped/s"), "OLD-VALUE-1111").err == 0);
    const std::string path = m.path("mapped/s");
    std::vector<pid_t> holders;
    struct Reap {
        std::vector<pid_t>& pids;
        ~Reap()
        {
            for (const pid_t p : pids) {
                ::kill(p, SIGKILL);
                ::waitpid(p, nullptr, 0);
            }
        }
    } reap{holders};
    // A holder maps what S stands for now and keeps touching it, so that its
    // pages stay in (and come back to) the page cache. It says '1' once it
    // holds the mapping, '0' if it could not map it.
    const auto hold = [&] {
        int ready[2];
        REQUIRE(::pipe(ready) == 0);
        const pid_t pid = ::fork();
        if (pid == 0) {
            ::close(ready[0]);
            const int fd = ::open(path.c_str(), O_RDONLY);
            auto* p = fd < 0 ? MAP_FAILED : ::mmap(nullptr, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
            char c = p == MAP_FAILED ? '0' : '1';
            (void)!::write(ready[1], &c, 1);
            if (p == MAP_FAILED)
                ::_exit(1);
            const auto* page = static_cast<volatile const char*>(p);
            const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
            while (std::chrono::steady_clock::now() < end)
                c = page[0];
            ::_exit(0);
        }
        ::close(ready[1]);
        if (pid > 0)
            holders.push_back(pid);
        char c = 0;
        const bool said = ::read(ready[0], &c, 1) == 1;  // 0 bytes: the child died first
        ::close(ready[0]);
        REQUIRE(pid > 0);
        REQUIRE(said);
        REQUIRE(c == '1');
    };
    const auto map_and_read = [&] {
        return as_root([&] {
            const int fd = ::open(path.c_str(), O_RDONLY);
            const auto* p = static_cast<const char*>(::mmap(nullptr, 4096, PROT_READ, MAP_PRIVATE, fd, 0));
            if (fd < 0 || p == MAP_FAILED)
                return Outcome{errno, "map"};
            std::string seen(p, 14);
            ::munmap(const_cast<char*>(p), 4096);
            ::close(fd);
            return Outcome{0, seen};
        });
    };
    hold();
    hold();
    // A new version written without O_TRUNC (dd conv=notrunc), the old one disabled.
    REQUIRE(shell("printf NEW-VALUE-2222 | dd of=" + path + " conv=notrunc status=none").err == 0);
    REQUIRE(set_xattr(m.path("mapped/s@1"), "user.vault.enabled", "false").err == 0);
    int stale = 0;
    for (int i = 0; i < 50; ++i)
        stale += ok(map_and_read()) == "OLD-VALUE-1111" ? 1 : 0;
    CHECK(stale == 0);
    // A disable alone: version 2 mapped and held, version 1 enabled again,
    // version 2 disabled. S stands for version 1 now, whatever is cached.
    hold();
    REQUIRE(set_xattr(m.path("mapped/s@1"), "user.vault.enabled", "true").err == 0);
    REQUIRE(set_xattr(m.path("mapped/s@2"), "user.vault.enabled", "false").err == 0);
    stale = 0;
    for (int i = 0; i < 50; ++i)
        stale += ok(map_and_read()) == "NEW-VALUE-2222" ? 1 : 0;
    CHECK(stale == 0);
    REQUIRE(set_xattr(m.path("mapped/s@2"), "user.vault.enabled", "true").err == 0);
    for (int i = 0; i < 20; ++i)
        CHECK(ok(map_and_read()) == "NEW-VALUE-2222");
}

// ---- 6. group rules do not fail open when the groups cannot be read ------------------------------

TEST_CASE("attack: a daemon in its own pid namespace cannot read callers' groups, and denies what they decide",
          "[fs][attack][groups]")
{
    TestGroup banned("b");
    TestUser member("gm", {&banned});
    TestUser named("gn");
    Mount m(MountOptions{{}, 8, true, {"unshare", "--pid", "--fork", "--kill-child=SIGTERM"}});
    REQUIRE(make_dir(m.path("grouped")).err == 0);
    REQUIRE(write_file(m.path("grouped/s"), "value").err == 0);
    REQUIRE(write_file(m.path("grouped/.policy"), "allow uid:0 *\nallow any get\ndeny group:" + banned.name +
                                                      " get\nallow uid:" + std::to_string(named.uid) + " list\n")
                .err == 0);
    // The member of the denied group: allowed today by `allow any`, because
    // its groups read as none. Now: EACCES, audited with the reason.
    const auto denied = m.records_of([&] { CHECK(as(member, [&] { return read_file(m.path("grouped/s")); }).err == EACCES); });
    REQUIRE(count(denied, "get", member.uid) == 1);
    for (auto r : denied)
        if (r.value("op", "") == "get") {
            CHECK(r["decision"] == "deny");
            CHECK(r["pid"] == 0);
            CHECK(r.value("reason", "").find("groups could not be read") != std::string::npos);
        }
    // Any caller's `get` depends on the group rule here: denied too.
    CHECK(as(named, [&] { return read_file(m.path("grouped/s")); }).err == EACCES);
    // So is root's, decided by the same rules.
    CHECK(read_file(m.path("grouped/s")).err == EACCES);
    // What no group rule can change is decided as usual.
    CHECK(ok(as(named, [&] { return list_dir(m.path("grouped")); })) == ".certs\n.deleted\n.keys\n.policy\n.versions\ns");
    CHECK(ok(read_file(m.path("grouped/.policy"))).find("deny gid:") != std::string::npos);
}

// ---- 7. revocation reaches open handles ----------------------------------------------------

TEST_CASE("attack: a writer removed from the policy commits nothing through an fd it kept; an old directory fd "
          "stops listing",
          "[fs][attack][revoke]")
{
    TestUser writer("w");
    Mount m;
    REQUIRE(make_dir(m.path("revoke")).err == 0);
    REQUIRE(write_file(m.path("revoke/s"), "v1").err == 0);
    REQUIRE(write_file(m.path("revoke/.policy"),
                       "allow uid:0 *\nallow uid:" + std::to_string(writer.uid) + " get,set,list\n").err == 0);
    int fd = -1;
    DIR* dir = nullptr;
    Paused held(
        &writer,
        [&] {
            fd = ::open(m.path("revoke/s").c_str(), O_WRONLY | O_TRUNC);
            dir = ::opendir(m.path("revoke").c_str());
            if (fd < 0 || dir == nullptr)
                return Outcome{errno, "open"};
            // A flush after written bytes commits: close a duplicate.
            if (::write(fd, "v2", 2) != 2 || ::close(::dup(fd)) != 0)
                return Outcome{errno, "first"};
            return Outcome{};
        },
        [&] {
            const ssize_t w = ::pwrite(fd, "v3", 2, 0);
            const int close_err = ::close(fd) == 0 ? 0 : errno;
            errno = 0;
            while (::readdir(dir) != nullptr) {
            }
            const int list_err = errno;
            ::closedir(dir);
            return Outcome{0, std::to_string(w) + " " + std::to_string(close_err) + " " + std::to_string(list_err)};
        });
    REQUIRE(held.first().err == 0);
    // Revoked while both are open: the next write fails (so does the close).
    REQUIRE(write_file(m.path("revoke/.policy"), "allow uid:0 *\n").err == 0);
    CHECK(ok(held.finish()) == "-1 " + std::to_string(EACCES) + " " + std::to_string(EACCES));
    CHECK(ok(list_dir(m.path("revoke/.versions"))) == "s@1\ns@2");
    auto commit = m.last_audit("commit", writer.uid);
    CHECK(commit["decision"] == "deny");
    CHECK(commit["reason"] == "revoked since open");
    auto list = m.last_audit("list", writer.uid);
    CHECK(list["decision"] == "deny");
    CHECK(list["reason"] == "revoked since the directory was opened");
}

// ---- 8. smaller holes ------------------------------------------------------------------------

namespace {

// Opens `n` connections to the control socket that never send a request,
// kept in `fds`. The outcome is the daemon's reply to the last one if it
// came within 2 s ("" while the daemon waits for the request).
Outcome idle_connections(const std::string& socket, int n, std::vector<int>& fds)
{
    for (int i = 0; i < n; ++i) {
        const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket.c_str());
        if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
            return Outcome{errno, "connect"};
        fds.push_back(fd);
    }
    if (fds.empty())
        return Outcome{EBADF, "no connection"};
    char buf[512] = {};
    pollfd p{fds.back(), POLLIN, 0};
    ::poll(&p, 1, 2000);
    const ssize_t got = ::recv(fds.back(), buf, sizeof buf - 1, MSG_DONTWAIT);
    return Outcome{0, got > 0 ? std::string(buf, static_cast<std::size_t>(got)) : std::string()};
}

Outcome close_all(std::vector<int>& fds)
{
    for (const int fd : fds)
        ::close(fd);
    fds.clear();
    return Outcome{};
}

// `vaultfs status` by root, which must be answered at once (not after the
// idle clients' 10 s deadline).
void root_is_served(const Mount& m, const std::string& socket)
{
    const auto t0 = std::chrono::steady_clock::now();
    const auto status = shell(m.binary + " status --socket " + socket);
    const auto took = std::chrono::steady_clock::now() - t0;
    INFO(status.data);
    CHECK(status.err == 0);
    CHECK(took < std::chrono::seconds(3));
}

}  // namespace

TEST_CASE("attack: a slow control client holds up no one; one uid cannot take every slot", "[fs][attack][control]")
{
    TestUser squatter("sq");
    Mount m(MountOptions{{"control_socket = ../control.sock"}});
    const std::string socket = m.root + "/control.sock";
    // Idle connections that never send a request: one root's, five of a uid
    // that may not use the socket at all. The fifth is told at once that the
    // socket is busy for this uid.
    std::vector<int> fds;
    const int slow = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    {
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket.c_str());
        REQUIRE(::connect(slow, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    }
    Paused squat(&squatter, [&] { return idle_connections(socket, 5, fds); }, [&] { return close_all(fds); });
    CHECK(squat.first().data.find("EBUSY") != std::string::npos);
    root_is_served(m, socket);
    squat.finish();
    ::close(slow);
}

TEST_CASE("attack: outsiders of several uids together cannot take the slots admins need", "[fs][attack][control]")
{
    TestUser a("oa"), b("ob"), c("oc");
    Mount m(MountOptions{{"control_socket = ../control.sock"}});
    const std::string socket = m.root + "/control.sock";
    std::vector<int> fds;
    // Two uids at four each hold every outsider slot (8); a third is turned away at once.
    Paused first(&a, [&] { return idle_connections(socket, 4, fds); }, [&] { return close_all(fds); });
    Paused second(&b, [&] { return idle_connections(socket, 4, fds); }, [&] { return close_all(fds); });
    CHECK(first.first().data.empty());
    CHECK(second.first().data.empty());
    Paused third(&c, [&] { return idle_connections(socket, 1, fds); }, [&] { return close_all(fds); });
    CHECK(third.first().data.find("EBUSY") != std::string::npos);
    root_is_served(m, socket);
    third.finish();
    second.finish();
    first.finish();
}

TEST_CASE("attack: a policy no one can manage is refused; admins have an audited way back", "[fs][attack][manage]")
{
    TestGroup empty("e");
    TestUser alice("al");
    Mount m;
    REQUIRE(make_dir(m.path("orphan")).err == 0);
    REQUIRE(write_file(m.path("orphan/s"), "kept").err == 0);
    // Groups without members, and uids without users, manage nothing.
    for (const std::string& text :
         std::vector<std::string>{"allow gid:99999 *\n", "allow group:" + empty.name + " *\n", "allow uid:99999 *\n"}) {
        INFO(text);
        CHECK(write_file(m.path("orphan/.policy"), text).err == EINVAL);
        CHECK(m.last_audit("policy_set", 0)["reason"].get<std::string>().find("could never be managed") !=
              std::string::npos);
    }
    CHECK(ok(read_file(m.path("orphan/.policy"))) == "allow uid:0 *\n");
    // A policy that gives manage to alice alone: root is locked out of the data plane.
    REQUIRE(write_file(m.path("orphan/.policy"), "allow uid:" + std::to_string(alice.uid) + " *\n").err == 0);
    CHECK(read_file(m.path("orphan/s")).err == EACCES);
    // Break glass.
    const auto reset = shell(m.binary + " policy reset orphan --state " + m.state + " 2>&1");
    INFO(reset.data);
    CHECK(reset.err == 0);
    CHECK(ok(read_file(m.path("orphan/s"))) == "kept");
    auto r = m.last_audit("policy_reset", 0);
    CHECK(r["decision"] == "allow");
    CHECK(r["vault"] == "orphan");
    // Only admins may.
    const auto refused = as(alice, [&] { return shell(m.binary + " policy reset orphan --state " + m.state + " 2>&1"); });
    CHECK(refused.err != 0);
}

TEST_CASE("attack: a second daemon on the same state fails at once, naming the first", "[fs][attack][lock]")
{
    Mount m;
    REQUIRE(make_dir(m.path("single")).err == 0);
    const std::string other = m.root + "/mnt2";
    std::filesystem::create_directory(other);
    const auto t0 = std::chrono::steady_clock::now();
    const auto second = shell(m.binary + " mount -f --state " + m.state + " " + other + " 2>&1 </dev/null");
    const auto took = std::chrono::steady_clock::now() - t0;
    INFO(second.data);
    CHECK(second.err == 1);
    CHECK(second.data.find("in use by process " + std::to_string(m.daemon_pid())) != std::string::npos);
    CHECK(took < std::chrono::seconds(5));
    CHECK(ok(list_dir(m.path())) == "single");
}

TEST_CASE("attack: another uid's freshly made secret, written to while its maker holds it open, is not that uid's "
          "to rename away",
          "[fs][attack][rename]")
{
    TestUser alice("fa");
    TestUser mallory("fm");
    Mount m;
    REQUIRE(make_dir(m.path("team")).err == 0);
    // Both may write pub-*; neither may delete.
    REQUIRE(write_file(m.path("team/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(alice.uid) +
                                                   " get,set pub-*\nallow uid:" + std::to_string(alice.uid) + " list\nallow uid:" +
                                                   std::to_string(mallory.uid) + " get,set pub-*\nallow uid:" +
                                                   std::to_string(mallory.uid) + " list\n")
                .err == 0);
    // Alice makes pub-x and holds it open, nothing written yet.
    int fd = -1;
    Paused making(
        &alice,
        [&] {
            fd = ::open(m.path("team/pub-x").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            return fd < 0 ? Outcome{errno, "open"} : Outcome{};
        },
        [&] {
            const bool wrote = ::write(fd, "alice", 5) == 5;
            const int close_err = ::close(fd) == 0 ? 0 : errno;
            return Outcome{wrote ? close_err : EIO, {}};
        });
    REQUIRE(making.first().err == 0);
    // Mallory writes a first version into it, then renames it away: the
    // name is not hers, so it is not her fresh file to move (EPERM).
    REQUIRE(as(mallory, [&] { return write_file(m.path("team/pub-x"), "mallory"); }).err == 0);
    CHECK(as(mallory, [&] { return rename_path(m.path("team/pub-x"), m.path("team/pub-y")); }).err == EPERM);
    const auto rec = m.last_audit("rename", mallory.uid);
    CHECK(rec["decision"] == "allow");  // set allows the target; the rule of fresh files refuses
    CHECK(rec["result"] == "EPERM");
    CHECK(as(mallory, [&] { return stat_path(m.path("team/pub-y")); }).err == ENOENT);
    // Alice's write still lands, as a version of her name.
    CHECK(making.finish().err == 0);
    CHECK(ok(read_file(m.path("team/pub-x"))) == "alice");
    CHECK(ok(read_file(m.path("team/pub-x@1"))) == "mallory");
    // Her own fresh file she still moves (as editors do).
    REQUIRE(as(alice, [&] { return write_file(m.path("team/pub-new"), "n"); }).err == 0);
    CHECK(as(alice, [&] { return rename_path(m.path("team/pub-new"), m.path("team/pub-renamed")); }).err == 0);
    CHECK(ok(read_file(m.path("team/pub-renamed"))) == "n");
}

TEST_CASE("attack: staging files grown by ftruncate alone are charged to their uid's limit", "[fs][attack][heap]")
{
    TestUser user("ft");
    Mount m(MountOptions{{"max_buffered_kib_per_uid = 26"}});
    REQUIRE(make_dir(m.path("grow")).err == 0);
    REQUIRE(write_file(m.path("grow/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(user.uid) +
                                                   " get,set,list\n")
                .err == 0);
    const auto o = as(user, [&] {
        // Two staging files (an editor's swap files), each made 20 KiB by
        // ftruncate alone, not a byte written: the second passes the limit.
        const int a = ::open(m.path("grow/.a.swp").c_str(), O_RDWR | O_CREAT, 0600);
        const int b = ::open(m.path("grow/.b.swp").c_str(), O_RDWR | O_CREAT, 0600);
        if (a < 0 || b < 0)
            return Outcome{errno, "open"};
        const int first = ::ftruncate(a, 20 * 1024) == 0 ? 0 : errno;
        const int second = ::ftruncate(b, 20 * 1024) == 0 ? 0 : errno;
        // The first one gone (closed and removed), its bytes are given back.
        ::close(a);
        const int removed = ::unlink(m.path("grow/.a.swp").c_str()) == 0 ? 0 : errno;
        const int again = ::ftruncate(b, 20 * 1024) == 0 ? 0 : errno;
        ::close(b);
        return Outcome{0, std::to_string(first) + " " + std::to_string(second) + " " + std::to_string(removed) + " " +
                              std::to_string(again)};
    });
    CHECK(ok(o) == "0 " + std::to_string(ENOMEM) + " 0 0");
}

TEST_CASE("attack: renaming a staging file onto a secret needs set: never had, or lost since the file was made",
          "[fs][attack][staging]")
{
    TestUser reader("sr");
    TestUser writer("sw");
    Mount m;
    REQUIRE(make_dir(m.path("conf")).err == 0);
    REQUIRE(write_file(m.path("conf/app"), "v1").err == 0);
    const auto policy = [&](const std::string& writer_perms) {
        REQUIRE(write_file(m.path("conf/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(reader.uid) +
                                                       " get,list\nallow uid:" + std::to_string(writer.uid) + " " +
                                                       writer_perms + "\n")
                    .err == 0);
    };
    policy("get,list,set");
    const auto stage = [&](const TestUser& u, const std::string& name, const std::string& value) {
        return as(u, [&] { return write_file(m.path("conf/" + name), value); });
    };
    const auto commits_denied = [&](const TestUser& u) {
        std::size_t n = 0;
        for (const auto& r : m.audit())
            if (r.value("op", "") == "commit" && r.value("uid", -1) == static_cast<std::int64_t>(u.uid) &&
                r.value("decision", "") == "deny" && r.value("result", "") == "EACCES" &&
                r.value("secret", "") == "app")
                ++n;
        return n;
    };
    // Never had set: a staging file is its own to make, but not to put in place.
    REQUIRE(stage(reader, ".app.swp", "reader's").err == 0);
    CHECK(as(reader, [&] { return rename_path(m.path("conf/.app.swp"), m.path("conf/app")); }).err == EACCES);
    CHECK(commits_denied(reader) == 1);
    // Had it when the file was made, lost it before the rename.
    REQUIRE(stage(writer, ".app.tmp", "writer's").err == 0);
    policy("get,list");
    CHECK(as(writer, [&] { return rename_path(m.path("conf/.app.tmp"), m.path("conf/app")); }).err == EACCES);
    CHECK(commits_denied(writer) == 1);
    // No version was made either way.
    CHECK(ok(list_dir(m.path("conf/.versions"))) == "app@1");
    CHECK(ok(read_file(m.path("conf/app"))) == "v1");
}

}  // namespace vaultfs::testing::attack
