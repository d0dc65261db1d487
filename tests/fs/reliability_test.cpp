// Integration: crashes, faults and hostile input (SECURITY.md has the
// threat model these come from).
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "fs_support.hpp"
#include "../support/small_tmpfs.hpp"

using namespace vaultfs::testing;

namespace {


// A crash-test value: its writer, its sequence number, and a fill whose
// length and byte depend on both — a torn or mixed value cannot pass.
std::string crash_value(int writer, long seq)
{
    return "w" + std::to_string(writer) + "-" + std::to_string(seq) + ":" +
           std::string(static_cast<std::size_t>(50 + (seq * 7 + writer * 13) % 900), static_cast<char>('a' + writer));
}

bool well_formed(const std::string& v)
{
    const auto dash = v.find('-');
    const auto colon = v.find(':');
    if (v.size() < 4 || v[0] != 'w' || dash == std::string::npos || colon == std::string::npos || colon < dash)
        return false;
    try {
        const int writer = std::stoi(v.substr(1, dash - 1));
        const long seq = std::stol(v.substr(dash + 1, colon - dash - 1));
        return v == crash_value(writer, seq);
    } catch (...) {
        return false;
    }
}

}  // namespace

TEST_CASE("crash consistency: SIGKILL during concurrent writes loses no committed version", "[fs][crash][token]")
{
    const char* long_mode = std::getenv("VAULTFS_LONG");
    const int kills = long_mode != nullptr && std::string(long_mode) == "1" ? 500 : 20;
    Mount m;
    REQUIRE(make_dir(m.path("crash")).err == 0);
    std::mutex mutex;
    std::vector<std::pair<int, std::string>> committed;  // (secret, value) whose close() returned 0
    std::mt19937 rng(std::random_device{}());
    long seq = 0;

    for (int k = 0; k < kills; ++k) {
        std::atomic<bool> stop{false};
        std::vector<std::thread> writers;
        for (int w = 0; w < 4; ++w) {
            writers.emplace_back([&, w, base = seq + 100000L * w] {
                for (long i = 0; !stop; ++i) {
                    const std::string value = crash_value(w, base + i);
                    const int secret = w % 2;  // two writers per secret
                    if (write_file(m.path("crash/s" + std::to_string(secret)), value).err == 0) {
                        std::lock_guard lock(mutex);
                        committed.emplace_back(secret, value);
                    } else if (stop) {
                        break;
                    }
                }
            });
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(15, 90)(rng)));
        m.kill_daemon();  // mid-write, mid-commit, mid-audit
        stop = true;
        for (auto& t : writers)
            t.join();
        seq += 1000000;
        m.start();  // cleans the stale mount
    }
    m.stop();
    m.start();

    std::set<std::string> found[2];
    for (int s = 0; s < 2; ++s) {
        const auto versions = ok(list_dir(m.path("crash/.versions")));
        std::istringstream names(versions);
        for (std::string name; std::getline(names, name);) {
            if (name.rfind("s" + std::to_string(s) + "@", 0) != 0)
                continue;
            const auto v = read_file(m.path("crash/" + name));
            INFO(name);
            REQUIRE(v.err == 0);
            CHECK(well_formed(v.data));  // never partial, never a mix of two writes
            found[s].insert(v.data);
        }
    }
    std::size_t missing = 0;
    for (const auto& [s, value] : committed)
        missing += found[s].count(value) == 0 ? 1 : 0;
    INFO(committed.size() << " committed versions over " << kills << " kills");
    CHECK(committed.size() > static_cast<std::size_t>(kills));
    CHECK(missing == 0);
    // What each kill left after the last signature and anchor is unproven
    // (anyone who can write the file could have chained it) until an admin
    // acknowledges it; then the trail verifies.
    const auto unproven = shell(m.binary + " audit verify --state " + m.state);
    INFO(unproven.data);
    const std::uint64_t through = unproven_through(unproven.data);
    if (through != 0) {
        CHECK(unproven.err == 1);
        CHECK(unproven.data.find("no signature vouches for them") != std::string::npos);
        const auto ack = shell(m.binary + " audit acknowledge --through " + std::to_string(through) + " --state " +
                               m.state + " 2>&1");
        INFO(ack.data);
        CHECK(ack.err == 0);
        CHECK(m.last_audit("acknowledge")["through"] == through);
    }
    m.stop();
    CHECK(shell("sqlite3 " + m.state_file("vault.db") + " 'PRAGMA integrity_check'").data == "ok\n");
    const auto verify = shell(m.binary + " audit verify --state " + m.state);
    INFO(verify.data);
    CHECK(verify.err == 0);
    std::printf("crash test: %d kills, %zu committed versions, all read back; audit: %s", kills, committed.size(),
                verify.data.c_str());
}

TEST_CASE("the token going away: uncached reads and writes fail with EIO, cached DEKs serve, service returns",
          "[fs][faults]")
{
    Mount m;
    REQUIRE(make_dir(m.path("tok")).err == 0);
    REQUIRE(write_file(m.path("tok/cached"), "in the cache").err == 0);
    REQUIRE(write_file(m.path("tok/cold"), "needs the token").err == 0);
    REQUIRE(ok(read_file(m.path("tok/cached"))) == "in the cache");  // its DEK is now cached

    std::filesystem::rename(m.state_file("tokens"), m.state_file("tokens.away"));
    CHECK(read_file(m.path("tok/cold")).err == EIO);
    auto r = m.last_audit("get");
    CHECK(r["result"] == "EIO");
    CHECK(r["reason"] == "key service unavailable");
    CHECK(ok(read_file(m.path("tok/cached"))) == "in the cache");
    // Known before the commit: the write itself fails, not only the close.
    const auto w = write_file(m.path("tok/cold"), "new value");
    CHECK(w.err == EIO);
    CHECK(w.data == "write");

    std::filesystem::rename(m.state_file("tokens.away"), m.state_file("tokens"));
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // reconnects are at most once a second
    CHECK(ok(read_file(m.path("tok/cold"))) == "needs the token");
    CHECK(write_file(m.path("tok/cold"), "new value").err == 0);
    CHECK(ok(read_file(m.path("tok/cold"))) == "new value");
}

TEST_CASE("start-up faults: wrong PIN, corrupt database, too little locked memory", "[fs][faults]")
{
    Mount m;
    REQUIRE(make_dir(m.path("faults")).err == 0);
    for (int i = 0; i < 200; ++i)
        REQUIRE(write_file(m.path("faults/s" + std::to_string(i)), std::string(500, 'x')).err == 0);
    m.stop();

    SECTION("a wrong PIN refuses the mount, once, with a message")
    {
        const std::string pin = slurp(m.state_file("pin"));
        std::ofstream(m.state_file("pin"), std::ios::trunc) << "not-the-pin";
        const auto o = m.start_expecting_failure();
        CHECK(o.err == 1);
        CHECK(o.data.find("rejected the PIN") != std::string::npos);
        CHECK(o.data.find("not retrying") != std::string::npos);
        CHECK_FALSE(m.mounted());
        std::ofstream(m.state_file("pin"), std::ios::trunc) << pin;
        m.start();
        CHECK(ok(read_file(m.path("faults/s1"))) == std::string(500, 'x'));
    }
    SECTION("a corrupt database file refuses the mount, naming the file")
    {
        {
            std::fstream db(m.state_file("vault.db"), std::ios::in | std::ios::out | std::ios::binary);
            db.seekp(4096 * 3);
            const std::string garbage(4096, '\xa5');
            db.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
        }
        const auto o = m.start_expecting_failure();
        CHECK(o.err == 1);
        CHECK(o.data.find(m.state_file("vault.db")) != std::string::npos);
        CHECK_FALSE(m.mounted());
    }
    SECTION("an mlock limit too low for the locked heap is a clear start-up error")
    {
        const auto o = shell("setpriv --bounding-set -ipc_lock prlimit --memlock=65536 " + m.binary +
                             " mount -f --state " + m.state + " " + m.mountpoint + " 2>&1");
        CHECK(o.err == 1);
        CHECK(o.data.find("RLIMIT_MEMLOCK") != std::string::npos);
        CHECK_FALSE(m.mounted());
    }
}

TEST_CASE("start-up reads the whole database only when it is not as a clean close left it", "[fs][faults]")
{
    Mount m;
    REQUIRE(make_dir(m.path("stamp")).err == 0);
    REQUIRE(write_file(m.path("stamp/s"), "kept").err == 0);
    // How many starts so far found the file as a clean close left it (the
    // daemon's log accumulates over the starts).
    const auto skipped = [&] {
        const std::string log = m.daemon_stderr();
        const std::string line = "its pages were not read again";
        std::size_t n = 0;
        for (auto at = log.find(line); at != std::string::npos; at = log.find(line, at + 1))
            ++n;
        return n;
    };
    // `init` closed the new file cleanly: the first start found it so.
    CHECK(skipped() == 1);
    const auto stamp = m.state_file("vault.db.checked");
    // While it serves, the file is changing: no stamp.
    CHECK_FALSE(std::filesystem::exists(stamp));
    m.stop();
    CHECK(std::filesystem::exists(stamp));
    m.start();
    CHECK(skipped() == 2);
    CHECK(ok(read_file(m.path("stamp/s"))) == "kept");

    // A crash leaves no stamp: the next start checks every page.
    m.kill_daemon();
    CHECK_FALSE(std::filesystem::exists(stamp));
    m.start();
    CHECK(skipped() == 2);
    CHECK(ok(read_file(m.path("stamp/s"))) == "kept");

    // A file changed after the clean close (here: a copy put back over it)
    // is checked again, whatever its content.
    m.stop();
    REQUIRE(std::filesystem::exists(stamp));
    const auto db = m.state_file("vault.db");
    std::filesystem::copy_file(db, db + ".copy");
    std::filesystem::rename(db + ".copy", db);
    m.start();
    CHECK(skipped() == 2);
    CHECK(ok(read_file(m.path("stamp/s"))) == "kept");
}

TEST_CASE("one corrupted version row: EIO for that version only, audited", "[fs][faults][token]")
{
    Mount m;
    REQUIRE(make_dir(m.path("rows")).err == 0);
    REQUIRE(write_file(m.path("rows/s"), "version one").err == 0);
    REQUIRE(write_file(m.path("rows/s"), "version two").err == 0);
    REQUIRE(write_file(m.path("rows/other"), "untouched").err == 0);
    m.stop();
    REQUIRE(shell("sqlite3 " + m.state_file("vault.db") +
                  " \"UPDATE versions SET ciphertext = zeroblob(length(ciphertext)) WHERE version = 1 AND "
                  "secret_id = (SELECT id FROM secrets WHERE name = 's')\"")
                .err == 0);
    m.start();
    CHECK(read_file(m.path("rows/s@1")).err == EIO);
    auto r = m.last_audit("get");
    CHECK(r["result"] == "EIO");
    CHECK(r["reason"] == "integrity check failed");
    CHECK(r["version"] == 1);
    CHECK(ok(read_file(m.path("rows/s"))) == "version two");
    CHECK(ok(read_file(m.path("rows/other"))) == "untouched");
}

TEST_CASE("the database's disk full: close() gives ENOSPC, the previous version stays", "[fs][faults]")
{
    Mount m(MountOptions{{}, 8, false});
    REQUIRE(shell(m.binary + " init --state " + m.state + " >/dev/null").err == 0);
    SmallTmpfs tmpfs(m.root + "/dbfs", "size=1m,mode=0700");
    std::filesystem::copy_file(m.state_file("vault.db"), tmpfs.path() + "/vault.db");
    std::filesystem::remove(m.state_file("vault.db"));
    std::ofstream(m.state_file("vaultfs.conf"), std::ios::app) << "database = " << tmpfs.path() << "/vault.db\n";
    m.start();
    REQUIRE(make_dir(m.path("full")).err == 0);
    REQUIRE(write_file(m.path("full/s"), "the last good value").err == 0);
    REQUIRE(shell("dd if=/dev/zero of=" + tmpfs.path() + "/filler bs=4k 2>/dev/null; true").err == 0);
    Outcome w;
    for (int i = 0; i < 200; ++i) {
        w = write_file(m.path("full/s"), std::string(20000, static_cast<char>('a' + i % 26)));
        if (w.err != 0)
            break;
    }
    CHECK(w.err == ENOSPC);
    CHECK(w.data == "close");
    const auto last = read_file(m.path("full/s"));
    REQUIRE(last.err == 0);
    CHECK((last.data == "the last good value" || last.data.size() == 20000));
    std::filesystem::remove(tmpfs.path() + "/filler");
    CHECK(write_file(m.path("full/s"), "room again").err == 0);
    CHECK(ok(read_file(m.path("full/s"))) == "room again");
}

TEST_CASE("restart with open files: new opens ENOTCONN while down, served again after", "[fs][faults]")
{
    Mount m;
    REQUIRE(make_dir(m.path("restart")).err == 0);
    REQUIRE(write_file(m.path("restart/s"), "value").err == 0);
    const int fd = ::open(m.path("restart/s").c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    m.kill_daemon();
    // The open put the value in the page cache, which the kernel keeps while
    // the reader holds it open: this reader reads on. Any new open fails.
    char buf[16];
    CHECK(::read(fd, buf, sizeof buf) == 5);
    CHECK(std::string(buf, 5) == "value");
    CHECK(read_file(m.path("restart/s")).err == ENOTCONN);
    ::close(fd);
    m.start();
    CHECK(m.daemon_stderr().find("stale mount") != std::string::npos);
    CHECK(ok(read_file(m.path("restart/s"))) == "value");
}

TEST_CASE("hostile callers: descriptors, namespaces, setuid, /proc, core dumps", "[fs][hostile]")
{
    TestUser user("h");
    Mount m;
    REQUIRE(make_dir(m.path("hostile")).err == 0);
    REQUIRE(write_file(m.path("hostile/.policy"),
                       "allow uid:0 *\nallow uid:" + std::to_string(user.uid) + " get,set,list\n").err == 0);
    REQUIRE(write_file(m.path("hostile/s"), "shared value").err == 0);

    SECTION("10,000 descriptors open on one secret: the uid's limit is EMFILE, for that uid only")
    {
        const auto o = as_root([&] {
            const rlimit lim{20000, 20000};
            if (::setrlimit(RLIMIT_NOFILE, &lim) != 0)
                return Outcome{errno, "setrlimit"};
            std::vector<int> fds;
            int err = 0;
            for (int i = 0; i < 10000; ++i) {
                const int fd = ::open(m.path("hostile/s").c_str(), O_RDONLY);
                if (fd < 0) {
                    err = errno;
                    break;
                }
                fds.push_back(fd);
            }
            if (fds.empty())
                return Outcome{err, "no descriptor opened"};
            // Another uid is not held back by this one's descriptors.
            const auto other = as(user, [&] { return read_file(m.path("hostile/s")); });
            char buf[32];
            const ssize_t n = ::pread(fds.back(), buf, sizeof buf, 0);
            for (const int fd : fds)
                ::close(fd);
            return Outcome{err, std::to_string(fds.size()) + " " + std::string(buf, static_cast<std::size_t>(std::max<ssize_t>(n, 0))) +
                                    " " + std::to_string(other.err) + " " + other.data};
        });
        CHECK(o.err == EMFILE);
        CHECK(o.data == "1024 shared value 0 shared value");
        auto refused = m.last_audit("get", 0);
        CHECK(refused["result"] == "EMFILE");
        CHECK(refused["rule"] == "per-uid-limit");
        // And once closed, the uid opens again.
        CHECK(ok(read_file(m.path("hostile/s"))) == "shared value");
    }
    SECTION("a write while the same uid holds a read handle")
    {
        const auto o = as(user, [&] {
            const int fd = ::open(m.path("hostile/s").c_str(), O_RDONLY);
            if (fd < 0)
                return Outcome{errno, "open"};
            const auto w = write_file(m.path("hostile/s"), "written meanwhile");
            char buf[64];
            const ssize_t n = ::read(fd, buf, sizeof buf);
            ::close(fd);
            return Outcome{w.err, std::string(buf, static_cast<std::size_t>(std::max<ssize_t>(n, 0)))};
        });
        CHECK(o.err == 0);
        CHECK(o.data == "shared value");
        CHECK(ok(read_file(m.path("hostile/s"))) == "written meanwhile");
    }
    SECTION("a caller in a user namespace is seen as its real uid")
    {
        // Root inside `unshare -U -r` is the user outside: the policy sees that uid.
        const auto o = as(user, [&] { return shell("unshare -U -r cat " + m.path("hostile/s")); });
        CHECK(o.err == 0);
        CHECK(o.data == "shared value");
        CHECK(m.last_audit("get")["uid"] == user.uid);
        const auto w = as(user, [&] { return shell("unshare -U -r sh -c 'cat " + m.path("hostile/.policy") + "' 2>&1"); });
        CHECK(w.err != 0);  // namespace root is not real root: no manage
    }
    SECTION("a setuid program acts with its effective uid")
    {
        // A setuid-root copy of cat, run by the user: the kernel reports uid 0.
        const std::string suid = m.root + "/suid-cat";
        REQUIRE(shell("cp /bin/cat " + suid + " && chmod 4755 " + suid).err == 0);
        TestUser stranger("t");
        const auto o = as(stranger, [&] { return shell(suid + " " + m.path("hostile/s")); });
        CHECK(o.err == 0);
        auto r = m.last_audit("get");
        CHECK(r["uid"] == 0);
        CHECK(r["exe"] == suid);
        CHECK(as(stranger, [&] { return read_file(m.path("hostile/s")); }).err == ENOENT);
    }
    SECTION("the daemon's memory is closed to a root process without CAP_SYS_PTRACE")
    {
        const std::string mem = "/proc/" + std::to_string(m.daemon_pid()) + "/mem";
        const auto o = shell("setpriv --bounding-set -sys_ptrace,-dac_override,-dac_read_search dd if=" + mem +
                             " bs=1 count=1 2>&1 >/dev/null");
        CHECK(o.err != 0);
        CHECK(o.data.find("Permission denied") != std::string::npos);
        // A root process that keeps CAP_SYS_PTRACE can still read it: see SECURITY.md.
    }
    SECTION("SIGABRT leaves no core file")
    {
        const std::string limits = slurp("/proc/" + std::to_string(m.daemon_pid()) + "/limits");
        CHECK(limits.find("Max core file size        0                    0") != std::string::npos);
        const std::string cwd = std::filesystem::read_symlink("/proc/" + std::to_string(m.daemon_pid()) + "/cwd");
        ::kill(m.daemon_pid(), SIGABRT);
        m.stop();
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        bool core = false;
        for (const auto& e : std::filesystem::directory_iterator(cwd))
            core = core || e.path().filename().string().rfind("core", 0) == 0;
        CHECK_FALSE(core);
    }
}

TEST_CASE("a canary value appears nowhere but in the reader's hands", "[fs][hostile]")
{
    Mount m;
    const std::string canary = "CANARY-" + random_hex(16);
    REQUIRE(make_dir(m.path("canary")).err == 0);
    REQUIRE(write_file(m.path("canary/s"), canary).err == 0);
    REQUIRE(write_file(m.path("canary/s"), canary + "-2").err == 0);
    REQUIRE(ok(read_file(m.path("canary/s@1"))) == canary);
    REQUIRE(shell(m.binary + " backup canary -o " + m.root + "/canary.backup --state " + m.state).err == 0);
    m.stop();  // checkpoints the WAL into vault.db
    const std::string daemon_log = m.daemon_stderr();
    for (const auto& entry : std::filesystem::recursive_directory_iterator(m.root)) {
        if (!entry.is_regular_file())
            continue;
        INFO(entry.path());
        CHECK(slurp(entry.path()).find(canary) == std::string::npos);
    }
    CHECK(daemon_log.find(canary) == std::string::npos);
}
