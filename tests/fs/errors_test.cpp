// Every failure reaches whoever caused it: what can be known at write()
// fails that write -- a shell's `printf > file` never sees close()'s error
// (bash closes with dup2) -- and what only the close can know fails the
// close and is said in the daemon's log.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "../support/small_tmpfs.hpp"
#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

// Runs `script` with bash (its builtin printf, as an admin types it);
// the outcome is its exit status and what it printed on stderr.
Outcome bash(const std::string& script)
{
    return shell("bash -c \"" + script + "\" 2>&1");
}

}  // namespace

TEST_CASE("the bar: bash's builtin printf of a policy naming a group that does not exist fails, and says why",
          "[fs][errors]")
{
    Mount m;
    REQUIRE(make_dir(m.path("vlt")).err == 0);
    const auto r = bash("printf 'allow uid:0 *\\nallow group:no-such-group get\\n' > " + m.path("vlt/.policy"));
    INFO(r.data);
    CHECK(r.err != 0);
    CHECK(r.data.find("write error: Invalid argument") != std::string::npos);
    CHECK(ok(read_file(m.path("vlt/.policy"))) == "allow uid:0 *\n");
    auto rec = m.last_audit("policy_set", 0);
    CHECK(rec["result"] == "EINVAL");
    CHECK(rec["reason"] == "line 2: unknown group 'no-such-group'");
    // The daemon's log says it too (the audit file is root's alone).
    CHECK(m.daemon_stderr().find("unknown group 'no-such-group'") != std::string::npos);
}

TEST_CASE("policy lines are checked as they arrive: each kind of bad line fails its write", "[fs][errors]")
{
    Mount m;
    REQUIRE(make_dir(m.path("vlt")).err == 0);
    struct Case {
        std::string text;
        std::string reason;
    };
    for (const auto& c : std::vector<Case>{
             {"allow uid:0 *\\nallow user:no-such-user get\\n", "line 2: unknown user 'no-such-user'"},
             {"allow uid:0 *\\nallow any fly\\n", "line 2: unknown permission 'fly'"},
             {"allow uid:0 *\\nallow any get db_*\\n", "line 2: invalid character '_' in glob 'db_*'"},
             // README's example of old: list can never take effect on db-*.
             {"allow uid:0 *\\nallow uid:0 set,list db-*\\n", "line 2: 'allow uid:0 list,set db-*' can never take effect"},
         }) {
        INFO(c.text);
        const auto r = bash("printf '" + c.text + "' > " + m.path("vlt/.policy"));
        INFO(r.data);
        CHECK(r.err != 0);
        CHECK(r.data.find("Invalid argument") != std::string::npos);
        CHECK(m.last_audit("policy_set", 0)["reason"].get<std::string>().rfind(c.reason, 0) == 0);
        CHECK(ok(read_file(m.path("vlt/.policy"))) == "allow uid:0 *\n");
    }
    // A line written in pieces is checked once it is whole.
    const auto pieces = as_root([&] {
        const int fd = ::open(m.path("vlt/.policy").c_str(), O_WRONLY | O_TRUNC);
        const std::string a = "allow uid:0 *\nallow group:no-", b = "such get\n";
        const bool first = ::write(fd, a.data(), a.size()) == static_cast<ssize_t>(a.size());
        const ssize_t second = ::write(fd, b.data(), b.size());
        const int err = errno;
        ::close(fd);
        return Outcome{first && second == -1 ? err : -1, {}};
    });
    CHECK(pieces.err == EINVAL);
}

TEST_CASE("what only the close can know fails the close, and goes to the daemon's log", "[fs][errors]")
{
    Mount m;
    REQUIRE(make_dir(m.path("vlt")).err == 0);
    // No one could manage the vault again: known only once the text is whole.
    // coreutils' printf checks its close (bash's builtin cannot).
    const auto r = shell("/usr/bin/printf 'allow uid:0 get,list,set\\n' 2>&1 > " + m.path("vlt/.policy"));
    INFO(r.data);
    CHECK(r.err != 0);
    CHECK(r.data.find("Invalid argument") != std::string::npos);
    CHECK(ok(read_file(m.path("vlt/.policy"))) == "allow uid:0 *\n");
    CHECK(m.daemon_stderr().find("could never be managed again") != std::string::npos);
    // `vaultfs policy check` and `policy set` say the same before anything is written.
    std::ofstream(m.root + "/p.txt") << "allow uid:0 get,list,set\n";
    const auto check = shell(m.binary + " policy check " + m.root + "/p.txt 2>&1");
    CHECK(check.err == 1);
    CHECK(check.data == "vaultfs: " + m.root + "/p.txt: no rule grants manage to anyone who exists: the vault could "
                                                "never be managed again\n");
    const auto set = shell(m.binary + " policy set vlt " + m.root + "/p.txt --state " + m.state + " 2>&1");
    CHECK(set.err == 1);
    CHECK(set.data.find("the policy of vlt: no rule grants manage to anyone who exists") != std::string::npos);
    std::ofstream(m.root + "/good.txt") << "allow uid:0 *\nallow any list\n";
    const auto good = shell(m.binary + " policy set vlt " + m.root + "/good.txt --state " + m.state + " 2>&1");
    INFO(good.data);
    CHECK(good.err == 0);
    CHECK(ok(read_file(m.path("vlt/.policy"))) == "allow uid:0 *\nallow any list\n");
    std::ofstream(m.root + "/bad.txt") << "allow uid:0 *\nallow group:no-such-group get\n";
    const auto bad = shell(m.binary + " policy check " + m.root + "/bad.txt 2>&1");
    CHECK(bad.err == 1);
    CHECK(bad.data == "vaultfs: " + m.root + "/bad.txt: line 2: unknown group 'no-such-group'\n");
}

TEST_CASE("secrets: size, permission, a deleted secret, the audit's disk -- each fails the shell's write",
          "[fs][errors]")
{
    TestUser reader("r");
    Mount m(MountOptions{{}, 8, false});
    REQUIRE(shell(m.binary + " init --state " + m.state + " >/dev/null").err == 0);
    SmallTmpfs tmpfs(m.root + "/auditfs", "size=512k,mode=0700");
    move_audit_to(m, tmpfs.path(), "audit_reserve_mib = 0\n");
    m.start();
    REQUIRE(make_dir(m.path("vlt")).err == 0);
    REQUIRE(write_file(m.path("vlt/s"), "one").err == 0);
    REQUIRE(write_file(m.path("vlt/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(reader.uid) + " get\n").err ==
            0);

    // Past 25 KiB.
    auto r = bash("printf '%26000s' x > " + m.path("vlt/s"));
    CHECK(r.err != 0);
    CHECK(r.data.find("File too large") != std::string::npos);
    // Without set (refused at the open, which bash reports).
    r = as(reader, [&] { return bash("printf x > " + m.path("vlt/s")); });
    CHECK(r.err != 0);
    CHECK(r.data.find("Permission denied") != std::string::npos);
    CHECK(ok(list_dir(m.path("vlt/.versions"))) == "s@1");

    // The audit's disk full: the write fails before anything is committed.
    REQUIRE(shell("dd if=/dev/zero of=" + tmpfs.path() + "/filler bs=4k 2>/dev/null; true").err == 0);
    r = bash("printf two > " + m.path("vlt/s"));
    INFO(r.data);
    CHECK(r.err != 0);
    CHECK(r.data.find("Input/output error") != std::string::npos);
    std::filesystem::remove(tmpfs.path() + "/filler");
    CHECK(ok(read_file(m.path("vlt/s"))) == "one");
    CHECK(m.daemon_stderr().find("audit") != std::string::npos);

    // Deleted while a writer holds it: its next write says so.
    int fd = -1;
    Paused writer(
        nullptr,
        [&] {
            fd = ::open(m.path("vlt/s").c_str(), O_WRONLY | O_TRUNC);
            return Outcome{fd < 0 ? errno : 0, {}};
        },
        [&] {
            const ssize_t n = ::write(fd, "late", 4);
            const int err = n < 0 ? errno : 0;
            ::close(fd);
            return Outcome{err, {}};
        });
    REQUIRE(writer.first().err == 0);
    REQUIRE(remove_file(m.path("vlt/s")).err == 0);
    CHECK(writer.finish().err == ENOENT);
    CHECK(ok(list_dir(m.path("vlt/.deleted"))) == "s");
}
