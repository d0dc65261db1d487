// The command line speaks clearly: every error names the thing and what to
// do, $VAULTFS_STATE stands in for --state, status is for people, backup
// writes to stdout, restore makes its vault, a state directory moves, a
// mount does not hide files, and a daemon's log is never lost.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "../support/small_tmpfs.hpp"
#include "fs_support.hpp"

using namespace vaultfs::testing;

TEST_CASE("errors name the thing and what to do; none is empty", "[fs][cli]")
{
    Mount m;
    REQUIRE(make_dir(m.path("app")).err == 0);
    const std::string cli = m.binary + " --state " + m.state;
    auto r = shell(m.binary + " vault show nosuch --state " + m.state + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data == "vaultfs: vault nosuch does not exist, or you cannot see it (`vaultfs vault list` shows the "
                    "vaults) (ENOENT)\n");
    for (const std::string& args : {std::string("vault create ab"), std::string("vault create app"),
                                    std::string("backup nosuch -o ") + m.root + "/b.json",
                                    std::string("backup app/nosuch -o ") + m.root + "/b.json",
                                    std::string("policy reset nosuch")}) {
        INFO(args);
        r = shell(m.binary + " " + args + " --state " + m.state + " 2>&1");
        INFO(r.data);
        CHECK(r.err == 1);
        CHECK(r.data.rfind("vaultfs: ", 0) == 0);
        CHECK(r.data.find(":  (") == std::string::npos);  // an empty message
        CHECK(r.data.size() > 30);
    }
    CHECK(shell(m.binary + " vault create app --state " + m.state + " 2>&1").data ==
          "vaultfs: vault app already exists (EEXIST)\n");
}

TEST_CASE("$VAULTFS_STATE stands in for --state in every command", "[fs][cli]")
{
    Mount m;
    REQUIRE(make_dir(m.path("app")).err == 0);
    const std::string env = "VAULTFS_STATE=" + m.state + " ";
    auto r = shell(env + m.binary + " vault list 2>&1");
    CHECK(r.err == 0);
    CHECK(r.data == "app\n");
    r = shell(env + m.binary + " status 2>&1");
    CHECK(r.err == 0);
    r = shell(env + m.binary + " audit verify 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    CHECK(r.data.find("reaches the signed database anchor") != std::string::npos);
    // init and mount too.
    const std::string other = m.root + "/other-state";
    r = shell("VAULTFS_STATE=" + other + " " + m.binary + " init 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    CHECK(std::filesystem::exists(other + "/vaultfs.conf"));
    const std::string mnt = m.root + "/other-mnt";
    std::filesystem::create_directory(mnt);
    r = shell("VAULTFS_STATE=" + other + " " + m.binary + " mount " + mnt + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    BackgroundDaemon daemon{mnt, other};
    CHECK(make_dir(mnt + "/elsewhere").err == 0);
    CHECK(shell("VAULTFS_STATE=" + other + " " + m.binary + " vault list").data == "elsewhere\n");
}

TEST_CASE("status is for people (--json for machines), says what is unhealthy, and exits with the verdict", "[fs][cli]")
{
    TestUser outsider("x");
    Mount m(MountOptions{{}, 8, false});
    REQUIRE(shell(m.binary + " init --state " + m.state + " >/dev/null").err == 0);
    SmallTmpfs tmpfs(m.root + "/auditfs", "size=512k,mode=0700");
    move_audit_to(m, tmpfs.path(), "audit_reserve_mib = 0\n");
    m.start();
    auto r = shell(m.binary + " status --state " + m.state + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    CHECK(r.data.find("vaultfs OK: token ok, audit ok, store ok, 0 expiring within 30 days\nvaultfs: serving " + m.state +
                      " at " + m.mountpoint + "\n") == 0);
    CHECK(r.data.find("\ntoken:   ok\n") != std::string::npos);
    CHECK(r.data.find("\naudit:   ok (") != std::string::npos);
    r = shell(m.binary + " status --json --state " + m.state);
    CHECK(r.err == 0);
    auto j = nlohmann::json::parse(r.data, nullptr, false);
    REQUIRE(j.is_object());
    CHECK(j["audit"] == "ok");
    CHECK(j["mountpoint"] == m.mountpoint);
    // The audit's disk full: status still answers, and says so (critical: 2).
    REQUIRE(shell("dd if=/dev/zero of=" + tmpfs.path() + "/filler bs=4k 2>/dev/null; true").err == 0);
    r = shell(m.binary + " status --state " + m.state + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 2);
    CHECK(r.data.find("\naudit:   failing: the disk of the audit log") != std::string::npos);
    std::filesystem::remove(tmpfs.path() + "/filler");
    // Someone who cannot reach the socket is told so, not that no daemon answers.
    const std::string copy = m.root + "/vaultfs";
    r = as(outsider, [&] { return shell(copy + " status --state " + m.state + " 2>&1"); });
    CHECK(r.err == 3);  // no verdict: unknown
    CHECK(r.data.find("permission denied reaching the control socket " + m.state + "/control.sock") !=
          std::string::npos);
    // No daemon at all: said as such.
    m.stop();
    r = shell(m.binary + " status --state " + m.state + " 2>&1");
    CHECK(r.err == 3);  // unknown, as a monitoring check reads it
    CHECK(r.data.find("no vaultfs daemon answers on") != std::string::npos);
}

TEST_CASE("backup -o - writes to stdout; restore --into makes the vault it names", "[fs][cli]")
{
    Mount m;
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/db-pass"), "hunter2").err == 0);
    const std::string file = m.root + "/app.backup";
    auto r = shell(m.binary + " backup app -o - --state " + m.state + " > " + file);
    CHECK(r.err == 0);
    CHECK(slurp(file).rfind("{", 0) == 0);
    CHECK(slurp(file).find("hunter2") == std::string::npos);
    r = shell(m.binary + " restore " + file + " --into app-copy --state " + m.state + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    CHECK(r.data == "created vault app-copy\nrestored db-pass\n");
    CHECK(ok(read_file(m.path("app-copy/db-pass"))) == "hunter2");
    // A restore that fails changes nothing: the vault it made goes again.
    std::ofstream(m.root + "/broken.backup") << slurp(file).substr(0, 200);
    r = shell(m.binary + " restore " + m.root + "/broken.backup --into app-third --state " + m.state + " 2>&1");
    CHECK(r.err == 1);
    CHECK(stat_path(m.path("app-third")).err == ENOENT);
}

TEST_CASE("a state directory moves or is copied whole: init writes no absolute path", "[fs][cli]")
{
    Mount m;
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/s"), "kept").err == 0);
    m.stop();
    for (const char* file : {"vaultfs.conf"})
        CHECK(slurp(m.state_file(file)).find(m.state) == std::string::npos);
    // Moved, and copied.
    const std::string moved = m.root + "/moved-state";
    std::filesystem::rename(m.state, moved);
    const std::string copied = m.root + "/copied-state";
    REQUIRE(shell("cp -a " + moved + " " + copied).err == 0);
    for (const auto& state : {moved, copied}) {
        INFO(state);
        const std::string mnt = state + "-mnt";
        std::filesystem::create_directory(mnt);
        auto r = shell(m.binary + " mount --state " + state + " " + mnt + " 2>&1");
        INFO(r.data);
        REQUIRE(r.err == 0);
        CHECK(ok(read_file(mnt + "/app/s")) == "kept");
        shell("fusermount3 -u " + mnt);
        for (int i = 0; i < 100 && shell(m.binary + " status --state " + state + " >/dev/null 2>&1").err == 0; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        r = shell(m.binary + " audit verify --state " + state + " 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        // The embedded token's configuration follows the directory.
        CHECK(slurp(state + "/softhsm2.conf").find("directories.tokendir = " + state + "/tokens\n") !=
              std::string::npos);
    }
    std::filesystem::rename(moved, m.state);  // for the Mount's own clean-up
}

TEST_CASE("mount refuses a directory that is not empty, unless --nonempty", "[fs][cli]")
{
    Mount m;
    m.stop();
    std::ofstream(m.mountpoint + "/keep-me") << "x";
    auto r = shell(m.binary + " mount -f --state " + m.state + " " + m.mountpoint + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data.find(m.mountpoint + " is not empty: mounting there would hide what it holds; choose an empty "
                                     "directory, or pass --nonempty") != std::string::npos);
    r = shell(m.binary + " mount --nonempty --state " + m.state + " " + m.mountpoint + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    CHECK(stat_path(m.path("keep-me")).err == ENOENT);  // hidden while mounted
    shell("fusermount3 -u " + m.mountpoint);
    for (int i = 0; i < 100 && std::filesystem::exists(m.mountpoint + "/keep-me") == false; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(std::filesystem::exists(m.mountpoint + "/keep-me"));
    std::filesystem::remove(m.mountpoint + "/keep-me");
}

TEST_CASE("a daemon with no syslog to take its log writes STATE/vaultfs.log", "[fs][cli]")
{
    Mount m;
    m.stop();
    if (shell("test -S /dev/log").err == 0) {
        WARN("this machine has a syslog socket (/dev/log): the daemon logs there, not to a file");
        return;
    }
    auto r = shell(m.binary + " mount --state " + m.state + " " + m.mountpoint + " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    BackgroundDaemon daemon{m.mountpoint, m.state};
    REQUIRE(make_dir(m.path("logged")).err == 0);
    // A policy refused at close: its reason is in the log.
    CHECK(shell("/usr/bin/printf 'allow uid:0 get\\n' 2>/dev/null > " + m.path("logged/.policy")).err != 0);
    const std::string log = slurp(m.state_file("vaultfs.log"));
    CHECK(log.find("serving " + m.state) != std::string::npos);
    CHECK(log.find("could never be managed again") != std::string::npos);
    struct stat st{};
    REQUIRE(::stat(m.state_file("vaultfs.log").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
}
