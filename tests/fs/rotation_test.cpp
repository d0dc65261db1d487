// Consumers learning that a secret changed: poll() on a reader of S, and
// the inotify events of a write through the mount.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <cstdint>
#include <string>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

// poll() for POLLPRI on fd; the events it reported (0 on timeout).
short poll_pri(int fd, int timeout_ms)
{
    pollfd p{fd, POLLPRI, 0};
    const int n = ::poll(&p, 1, timeout_ms);
    return n > 0 ? p.revents : 0;
}

std::string read_fd(int fd)
{
    std::string out;
    char buf[256];
    ::lseek(fd, 0, SEEK_SET);
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
        out.append(buf, static_cast<std::size_t>(n));
    return out;
}

}  // namespace

TEST_CASE("poll on a reader of S wakes within 100 ms of a newer version; S@N never does", "[fs][poll]")
{
    Mount m;
    REQUIRE(make_dir(m.path("rot")).err == 0);
    REQUIRE(write_file(m.path("rot/s"), "one").err == 0);
    const int reader = ::open(m.path("rot/s").c_str(), O_RDONLY);
    REQUIRE(reader >= 0);
    const int pinned = ::open(m.path("rot/s@1").c_str(), O_RDONLY);
    REQUIRE(pinned >= 0);
    // Nothing newer yet: no event, and readable, as any regular file.
    CHECK(poll_pri(reader, 0) == 0);
    pollfd in{reader, POLLIN, 0};
    CHECK(::poll(&in, 1, 0) == 1);
    CHECK(in.revents == POLLIN);

    // A waiter blocks until a commit; it wakes within 100 ms of the writer's close().
    std::chrono::steady_clock::time_point woke;
    short events = 0;
    std::thread waiter([&] {
        events = poll_pri(reader, 10000);
        woke = std::chrono::steady_clock::now();
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const Outcome w = write_file(m.path("rot/s"), "two");
    const auto committed = std::chrono::steady_clock::now();
    waiter.join();
    REQUIRE(w.err == 0);
    CHECK((events & (POLLPRI | POLLERR)) == (POLLPRI | POLLERR));
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(woke - committed).count();
    INFO("woke " << ms << " ms after the commit");
    CHECK(ms < 100);

    // The event stays until the reader reopens; what it reads is still the
    // version it opened. S@1 has nothing newer to report.
    CHECK((poll_pri(reader, 0) & POLLPRI) != 0);
    CHECK(read_fd(reader) == "one");
    CHECK(poll_pri(pinned, 0) == 0);
    const int reopened = ::open(m.path("rot/s").c_str(), O_RDONLY);
    REQUIRE(reopened >= 0);
    CHECK(read_fd(reopened) == "two");
    CHECK(poll_pri(reopened, 0) == 0);

    // Disabling the version a reader has (S stands for the one before) and
    // deleting S wake waiters too.
    std::thread disable_waiter([&] { events = poll_pri(reopened, 10000); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(set_xattr(m.path("rot/s@2"), "user.vault.enabled", "false").err == 0);
    disable_waiter.join();
    CHECK((events & POLLPRI) != 0);
    const int third = ::open(m.path("rot/s").c_str(), O_RDONLY);
    REQUIRE(third >= 0);
    std::thread delete_waiter([&] { events = poll_pri(third, 10000); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(remove_file(m.path("rot/s")).err == 0);
    delete_waiter.join();
    CHECK((events & POLLPRI) != 0);
    for (const int fd : {reader, pinned, reopened, third})
        ::close(fd);
}

namespace {

// Waits (up to 10 s) on inotify fd `in` for `event` on the name "s"; then
// reads `path` at once, as a watcher that reacts would. Records whether
// IN_MODIFY came first.
std::string read_on_event(int in, std::uint32_t event, const std::string& path, bool* modified_before)
{
    alignas(inotify_event) char buf[4096];
    for (;;) {
        pollfd ready{in, POLLIN, 0};
        if (::poll(&ready, 1, 10000) <= 0)
            return "(no event)";
        const ssize_t n = ::read(in, buf, sizeof buf);
        if (n <= 0)
            return "(no event)";
        for (ssize_t at = 0; at < n;) {
            const auto* e = reinterpret_cast<const inotify_event*>(buf + at);
            at += static_cast<ssize_t>(sizeof(inotify_event) + e->len);
            if (e->len == 0 || std::string(e->name) != "s")
                continue;
            if ((e->mask & IN_MODIFY) && modified_before != nullptr)
                *modified_before = true;
            if (e->mask & event)
                return read_file(path).data;
        }
    }
}

}  // namespace

TEST_CASE("inotify: IN_CLOSE_WRITE and IN_MOVED_TO on a vault come after the commit is visible", "[fs][inotify]")
{
    Mount m;
    REQUIRE(make_dir(m.path("watched")).err == 0);
    const std::string s = m.path("watched/s");
    REQUIRE(write_file(s, "old value").err == 0);
    REQUIRE(read_file(s).data == "old value");  // the kernel caches S's entry
    const int in = ::inotify_init1(IN_CLOEXEC);
    REQUIRE(in >= 0);
    REQUIRE(::inotify_add_watch(in, m.path("watched").c_str(), IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_TO) >= 0);

    // A writer's close: IN_MODIFY came with its write(), before anything
    // was committed; IN_CLOSE_WRITE after the commit.
    bool modified_before = false;
    std::string at_close;
    std::thread watcher([&] { at_close = read_on_event(in, IN_CLOSE_WRITE, s, &modified_before); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    REQUIRE(write_file(s, "new value").err == 0);
    watcher.join();
    CHECK(modified_before);
    CHECK(at_close == "new value");

    // sed -i writes a file beside S and renames it onto S: IN_MOVED_TO
    // names S once the rename committed the new version.
    std::string at_move;
    std::thread mover([&] { at_move = read_on_event(in, IN_MOVED_TO, s, nullptr); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const Outcome sed = shell("sed -i s/new/newer/ " + s + " 2>&1");
    mover.join();
    INFO(sed.data);
    CHECK(sed.err == 0);
    CHECK(at_move == "newer value");
    ::close(in);
}

namespace {

// S's mtime and ctime (µs), checked equal; -1 when stat fails.
std::int64_t content_time(const std::string& path)
{
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0)
        return -1;
    const auto us = [](const timespec& t) { return std::int64_t{t.tv_sec} * 1000000 + t.tv_nsec / 1000; };
    CHECK(us(st.st_mtim) == us(st.st_ctim));
    return us(st.st_mtim);
}

std::string rfc3339(std::chrono::system_clock::time_point t)
{
    const std::time_t secs = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

}  // namespace

TEST_CASE("mtime: S's changes exactly when what it serves does, and never goes back", "[fs][mtime]")
{
    using namespace std::chrono_literals;
    Mount m;
    REQUIRE(make_dir(m.path("mtime")).err == 0);
    const std::string s = m.path("mtime/s");
    // (The kernel keeps S's attributes for 1 s: each check waits that out.)
    const auto settled = [&] {
        std::this_thread::sleep_for(1100ms);
        return content_time(s);
    };
    REQUIRE(write_file(s, "one").err == 0);
    const auto v1 = settled();
    REQUIRE(v1 > 0);
    REQUIRE(write_file(s, "two").err == 0);
    const auto v2 = settled();
    CHECK(v2 > v1);
    // S@1 keeps its own version's time.
    struct stat at1{};
    REQUIRE(::stat(m.path("mtime/s@1").c_str(), &at1) == 0);
    CHECK(std::int64_t{at1.st_mtim.tv_sec} * 1000000 + at1.st_mtim.tv_nsec / 1000 == v1);

    // A tag or a content type serves nothing new: no change.
    REQUIRE(set_xattr(s, "user.vault.tag.owner", "payments").err == 0);
    REQUIRE(set_xattr(s, "user.vault.content_type", "text/plain").err == 0);
    CHECK(settled() == v2);

    // A disable makes S serve version 1 again: its mtime moves on, not back to v1's.
    REQUIRE(set_xattr(m.path("mtime/s@2"), "user.vault.enabled", "false").err == 0);
    const auto disabled = settled();
    CHECK(ok(read_file(s)) == "one");
    CHECK(disabled > v2);
    // Disabling a version S does not stand for changes nothing.
    REQUIRE(write_file(m.path("mtime/other"), "x").err == 0);
    REQUIRE(set_xattr(m.path("mtime/s@2"), "user.vault.tag.note", "still off").err == 0);
    CHECK(settled() == disabled);
    // Enabling version 2 again: forward once more.
    REQUIRE(set_xattr(m.path("mtime/s@2"), "user.vault.enabled", "true").err == 0);
    const auto enabled = settled();
    CHECK(ok(read_file(s)) == "two");
    CHECK(enabled > disabled);

    // An expiry set ahead changes nothing until it passes; then S's mtime
    // is the expiry time.
    const auto expiry = std::chrono::system_clock::now() + 3s;
    REQUIRE(set_xattr(s, "user.vault.expires", rfc3339(expiry)).err == 0);
    CHECK(settled() == enabled);
    while (std::chrono::system_clock::now() < expiry + 200ms)
        std::this_thread::sleep_for(100ms);
    const auto expired = settled();
    CHECK(read_file(s).err == EKEYEXPIRED);
    const auto expiry_us =
        std::chrono::duration_cast<std::chrono::seconds>(expiry.time_since_epoch()).count() * std::int64_t{1000000};
    CHECK(expired == expiry_us);
    CHECK(expired > enabled);

    // Deleted and recovered: the same content as before, the same mtime.
    REQUIRE(remove_file(s).err == 0);
    CHECK(content_time(s) == -1);
    REQUIRE(rename_path(m.path("mtime/.deleted/s"), s).err == 0);
    CHECK(settled() == expired);
    // A new version after all that: later than every time before.
    REQUIRE(write_file(s, "three").err == 0);
    CHECK(settled() > expired);
}

TEST_CASE("on_change hooks: exec as a user, a failing hook, systemd-reload; audited, never blocking the commit",
          "[fs][hooks]")
{
    TestUser user("hk");
    // Where the hook writes: made before the mount, whose config names it.
    std::string out_dir = (std::filesystem::temp_directory_path() / "vaultfs-hooks-XXXXXX").string();
    REQUIRE(::mkdtemp(out_dir.data()) != nullptr);
    ::chmod(out_dir.c_str(), 0777);
    struct Cleanup {
        std::string path;
        ~Cleanup()
        {
            std::error_code ec;
            std::filesystem::remove_all(path, ec);
        }
    } cleanup{out_dir};
    const std::string out = out_dir + "/fired";
    MountOptions o;
    o.config_lines = {
        "on_change = hooked/db-* exec " + user.name + " echo \"$(id -u) $VAULTFS_VAULT $VAULTFS_NAME $VAULTFS_KIND\" >> " +
            out,
        "on_change = hooked/db-password exec root exit 3",
        "on_change = */db-password systemd-reload nginx.service",
    };
    Mount m(o);
    const auto hooks = [&] {
        std::vector<nlohmann::json> r;
        for (const auto& rec : m.audit())
            if (rec["op"] == "hook")
                r.push_back(rec);
        return r;
    };
    REQUIRE(make_dir(m.path("hooked")).err == 0);
    REQUIRE(write_file(m.path("hooked/db-password"), "one").err == 0);  // close() returned 0: committed
    CHECK(ok(read_file(m.path("hooked/db-password"))) == "one");
    REQUIRE(eventually(10, [&] { return hooks().size() == 3; }));
    CHECK(slurp(out) == std::to_string(user.uid) + " hooked db-password secret\n");
    for (const auto& h : hooks()) {
        INFO(h.dump());
        CHECK(h["vault"] == "hooked");
        CHECK(h["secret"] == "db-password");
        CHECK(h["uid"] == 0);  // the daemon's own record
        if (h["rule"] == "hooked/db-password exec root exit 3") {
            CHECK(h["result"] == "EIO");
            CHECK(h["reason"] == "exit status 3");
        } else if (h["rule"] == "*/db-password systemd-reload nginx.service") {
            // No systemd here: the failure is audited, and nothing else changes.
            CHECK(h["result"] == "EIO");
        } else {
            CHECK(h["result"] == "ok");
            CHECK(h["reason"] == "exit status 0");
        }
    }
    // A name no hook matches fires nothing; a graceful restart fires nothing
    // again; the next change fires each matching hook once.
    REQUIRE(write_file(m.path("hooked/api-key"), "k").err == 0);
    REQUIRE(shell(m.binary + " restart --state " + m.state).err == 0);
    REQUIRE(write_file(m.path("hooked/db-user"), "app").err == 0);
    REQUIRE(eventually(10, [&] { return hooks().size() == 4; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    CHECK(hooks().size() == 4);
    CHECK(slurp(out) == std::to_string(user.uid) + " hooked db-password secret\n" + std::to_string(user.uid) +
                            " hooked db-user secret\n");
    const auto verified = m.verify();
    INFO(verified.data);
    CHECK(verified.err == 0);
}

TEST_CASE("a signal hook is no confused deputy: only the named user's process, through a pidfile that user or root "
          "owns, never init or vaultfs; each refusal audited",
          "[fs][hooks][attack]")
{
    TestUser alice("sig");
    // Alice's own directory, where her service would keep its pidfile.
    std::string dir = (std::filesystem::temp_directory_path() / "vaultfs-sig-XXXXXX").string();
    REQUIRE(::mkdtemp(dir.data()) != nullptr);
    REQUIRE(::chown(dir.c_str(), alice.uid, alice.gid) == 0);
    ::chmod(dir.c_str(), 0755);
    struct Cleanup {
        std::string path;
        std::vector<pid_t> pids;
        ~Cleanup()
        {
            for (pid_t p : pids) {
                ::kill(p, SIGKILL);
                ::waitpid(p, nullptr, 0);
            }
            std::error_code ec;
            std::filesystem::remove_all(path, ec);
        }
    } cleanup{dir, {}};
    const std::string pidfile = dir + "/app.pid";
    const std::string rootfile = dir + "/root.pid";  // alice's too, but its hook names root
    MountOptions o;
    o.config_lines = {"on_change = team/pub-* signal " + alice.name + " " + pidfile + " SIGTERM",
                      "on_change = team/root-* signal root " + rootfile + " SIGTERM"};
    Mount m(o);
    REQUIRE(make_dir(m.path("team")).err == 0);

    // A process of root's, and one of alice's.
    const auto spawn = [&](const TestUser* as_user) {
        const pid_t pid = ::fork();
        if (pid == 0) {
            if (as_user != nullptr && (::setgid(as_user->gid) != 0 || ::setuid(as_user->uid) != 0))
                ::_exit(1);
            ::execl("/bin/sleep", "sleep", "300", static_cast<char*>(nullptr));
            ::_exit(127);
        }
        cleanup.pids.push_back(pid);
        return pid;
    };
    const auto alive = [](pid_t pid) {
        int status = 0;
        return ::waitpid(pid, &status, WNOHANG) == 0;
    };
    const pid_t root_sleep = spawn(nullptr);
    const pid_t alice_sleep = spawn(&alice);
    REQUIRE(eventually(5, [&] { return slurp("/proc/" + std::to_string(alice_sleep) + "/comm") == "sleep\n"; }));

    // Alice writes a pid into a pidfile of hers, then a secret a hook
    // matches; each firing is audited: the last `hook` record says how.
    std::size_t fired = 0;
    const auto fire = [&](const std::string& file, const std::string& pid, const std::string& secret,
                          mode_t mode = 0644) {
        const Outcome w = as(alice, [&] {
            ::unlink(file.c_str());
            const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, mode);
            if (fd < 0 || ::write(fd, pid.data(), pid.size()) != static_cast<ssize_t>(pid.size()) || ::close(fd) != 0)
                return Outcome{errno, {}};
            ::chmod(file.c_str(), mode);
            return Outcome{};
        });
        REQUIRE(w.err == 0);
        REQUIRE(write_file(m.path("team/" + secret), pid).err == 0);
        ++fired;
        REQUIRE(eventually(10, [&] {
            std::size_t n = 0;
            for (const auto& rec : m.audit())
                n += rec["op"] == "hook";
            return n == fired;
        }));
        return m.last_audit("hook");
    };
    const auto refused = [&](const nlohmann::json& rec, const std::string& reason) {
        INFO(rec.dump());
        CHECK(rec["result"] == "EIO");
        CHECK(rec.value("reason", "") == reason);
    };

    refused(fire(pidfile, std::to_string(root_sleep) + "\n", "pub-a"),
            "pid " + std::to_string(root_sleep) + " runs as uid 0, not " + alice.name);
    CHECK(alive(root_sleep));
    refused(fire(pidfile, "1\n", "pub-b"), "pid 1 is init: never signalled");
    refused(fire(pidfile, std::to_string(m.daemon_pid()), "pub-c"),
            "pid " + std::to_string(m.daemon_pid()) + " is vaultfs itself: never signalled");
    refused(fire(pidfile, std::to_string(alice_sleep), "pub-d", 0666),
            pidfile + " is writable by others than its owner: not trusted");
    CHECK(alive(alice_sleep));
    // A hook for root's processes does not trust a pidfile alice owns.
    refused(fire(rootfile, std::to_string(root_sleep), "root-a"),
            rootfile + " belongs to uid " + std::to_string(alice.uid) + ", neither root nor root: not trusted");
    CHECK(alive(root_sleep));
    // Her own process, through her own pidfile: signalled.
    const auto sent = fire(pidfile, std::to_string(alice_sleep) + "\n", "pub-e");
    INFO(sent.dump());
    CHECK(sent["result"] == "ok");
    CHECK(sent["reason"] == "sent SIGTERM to " + std::to_string(alice_sleep) + " (" + alice.name + ")");
    int status = 0;
    REQUIRE(::waitpid(alice_sleep, &status, 0) == alice_sleep);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGTERM);
    cleanup.pids.erase(std::find(cleanup.pids.begin(), cleanup.pids.end(), alice_sleep));
    CHECK(m.verify().err == 0);

    // The form without a USER is refused at start, showing the new one.
    m.stop();
    REQUIRE(shell("sed -i 's|^on_change = team/pub-\\* signal " + alice.name + " |on_change = team/pub-* signal |' " +
                  m.state_file("vaultfs.conf"))
                .err == 0);
    const auto old = m.start_expecting_failure();
    INFO(old.data);
    CHECK(old.err != 0);
    CHECK(old.data.find("signal names the user whose process it signals: signal USER PIDFILE SIGNAL (e.g. "
                        "'team/pub-* signal www-data " + pidfile + " SIGTERM')") != std::string::npos);
}
