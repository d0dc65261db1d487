// A shared store whose server stops answering (docs/hosts.md "Several hosts",
// SECURITY.md "Bounds"): the postmaster and its children SIGSTOPped as a
// paused VM would leave them, a lock held by another session, a commit the
// server is slow to finish. No request on the mount waits past the
// staleness bound and a second; each refusal is audited; service resumes
// by itself; a commit left in doubt is looked up and audited, never made
// twice.
#include <catch2/catch.hpp>

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <dirent.h>
#include <fstream>
#include <atomic>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <spawn.h>
#include <sys/wait.h>
#include <thread>

#include "fs_support.hpp"
#include "tests/support/postgres.hpp"

extern char** environ;

namespace vaultfs::testing {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds staleness{2000};  // the default staleness bound
constexpr milliseconds bound = staleness + milliseconds(1000);  // what SECURITY.md promises

// One host of a store on `pg`, mounted.
struct StoreHost {
    explicit StoreHost(const std::string& url) : mount(MountOptions{.init = false})
    {
        const auto made = shell(mount.binary + " init --store " + url + " --host alpha --state " + mount.state +
                                " 2>&1");
        INFO(made.data);
        REQUIRE(made.err == 0);
        mount.start();
    }
    Mount mount;
};

// A host on a PostgreSQL of its own, serving app/s at version 1.
struct OneSecret {
    PgServer pg;
    std::string url = pg.new_database();
    std::string db = url.substr(url.rfind('/') + 1);
    StoreHost h{url};
    Mount& m = h.mount;
    OneSecret()
    {
        REQUIRE(make_dir(m.path("app")).err == 0);
        REQUIRE(write_file(m.path("app/s"), "v1").err == 0);
    }
};

// The server and every process it started, stopped (SIGSTOP) while this
// lives; continued at the end whatever happened.
class Frozen {
public:
    explicit Frozen(const PgServer& pg)
    {
        std::ifstream pidfile(pg.dir() + "/data/postmaster.pid");
        pid_t postmaster = 0;
        REQUIRE(pidfile >> postmaster);
        pids_.push_back(postmaster);
        if (DIR* d = ::opendir("/proc")) {
            while (dirent* e = ::readdir(d)) {
                const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
                if (pid <= 0)
                    continue;
                std::ifstream stat("/proc/" + std::string(e->d_name) + "/stat");
                std::string line;
                std::getline(stat, line);
                const auto close = line.rfind(')');
                if (close == std::string::npos)
                    continue;
                char state = 0;
                pid_t parent = 0;
                std::istringstream(line.substr(close + 2)) >> state >> parent;
                if (parent == postmaster)
                    pids_.push_back(pid);
            }
            ::closedir(d);
        }
        REQUIRE(pids_.size() > 1);
        for (const pid_t p : pids_)
            ::kill(p, SIGSTOP);
        at_ = Clock::now();
    }
    ~Frozen() { thaw(); }
    Frozen(const Frozen&) = delete;
    Frozen& operator=(const Frozen&) = delete;
    void thaw()
    {
        for (const pid_t p : pids_)
            ::kill(p, SIGCONT);
        pids_.clear();
    }
    Clock::time_point at() const { return at_; }

private:
    std::vector<pid_t> pids_;
    Clock::time_point at_;
};

// Operations run at once, each on its own thread, each timed. A request
// that hangs is not waited for past `limit`: the test reports it, then
// whoever froze the server thaws it so that the threads can end.
class Requests {
public:
    struct Done {
        std::string what;
        Outcome outcome;
        milliseconds took{};
    };
    void run(std::string what, std::function<Outcome()> op)
    {
        threads_.emplace_back([this, what = std::move(what), op = std::move(op)] {
            const auto start = Clock::now();
            Outcome o = op();
            const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
            std::lock_guard lock(mutex_);
            done_.push_back(Done{what, std::move(o), took});
            cv_.notify_all();
        });
    }
    // Waits until all have returned or `limit` passed; whether they all did.
    bool wait(milliseconds limit)
    {
        std::unique_lock lock(mutex_);
        return cv_.wait_for(lock, limit, [&] { return done_.size() == threads_.size(); });
    }
    std::vector<Done> join()
    {
        for (auto& t : threads_)
            t.join();
        threads_.clear();
        return std::move(done_);
    }
    ~Requests()
    {
        for (auto& t : threads_)
            if (t.joinable())
                t.join();
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    std::vector<std::thread> threads_;
    std::vector<Done> done_;
};

std::string describe(const std::vector<Requests::Done>& done)
{
    std::string out;
    for (const auto& d : done)
        out += d.what + ": errno " + std::to_string(d.outcome.err) + " after " + std::to_string(d.took.count()) +
               " ms\n";
    return out;
}

template <class F>
bool eventually(milliseconds limit, F&& done)
{
    const auto start = Clock::now();
    while (!done()) {
        if (Clock::now() - start > limit)
            return false;
        std::this_thread::sleep_for(milliseconds(20));
    }
    return true;
}

// The audit records from the `n`th on.
std::vector<nlohmann::json> since(const Mount& m, std::size_t n)
{
    auto all = m.audit();
    return std::vector<nlohmann::json>(all.begin() + static_cast<std::ptrdiff_t>(std::min(n, all.size())), all.end());
}

// A TCP proxy to the server that the test can stop forwarding through, as
// a network partition would: the connections stay up, nothing crosses.
class Proxy {
public:
    explicit Proxy(int to_port) : to_port_(to_port)
    {
        listen_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE(::bind(listen_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
        REQUIRE(::listen(listen_, 64) == 0);
        socklen_t len = sizeof a;
        REQUIRE(::getsockname(listen_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
        port_ = ntohs(a.sin_port);
        accepting_ = std::thread([this] { accept_loop(); });
    }
    ~Proxy()
    {
        stop_ = true;
        accepting_.join();  // no pump starts after this
        for (auto& t : threads_)
            t.join();
        for (const int fd : fds_)
            ::close(fd);
        ::close(listen_);
    }
    Proxy(const Proxy&) = delete;
    Proxy& operator=(const Proxy&) = delete;
    int port() const { return port_; }
    void cut() { forwarding_ = false; }
    void mend() { forwarding_ = true; }

private:
    void accept_loop()
    {
        while (!stop_) {
            pollfd p{listen_, POLLIN, 0};
            if (::poll(&p, 1, 50) <= 0)
                continue;
            const int client = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC);
            if (client < 0)
                continue;
            const int server = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            sockaddr_in a{};
            a.sin_family = AF_INET;
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            a.sin_port = htons(static_cast<std::uint16_t>(to_port_));
            if (::connect(server, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
                ::close(client);
                ::close(server);
                continue;
            }
            std::lock_guard lock(mutex_);
            fds_.push_back(client);
            fds_.push_back(server);
            threads_.emplace_back([this, client, server] { pump(client, server); });
        }
    }
    // Copies both ways while forwarding; holds everything while cut.
    void pump(int a, int b)
    {
        char buf[16384];
        while (!stop_) {
            if (!forwarding_) {
                std::this_thread::sleep_for(milliseconds(10));
                continue;
            }
            pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
            if (::poll(p, 2, 50) <= 0)
                continue;
            for (int i = 0; i < 2; ++i) {
                if ((p[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0)
                    continue;
                const ssize_t n = ::read(p[i].fd, buf, sizeof buf);
                if (n <= 0) {
                    ::shutdown(a, SHUT_RDWR);
                    ::shutdown(b, SHUT_RDWR);
                    return;
                }
                const int to = i == 0 ? b : a;
                for (ssize_t off = 0; off < n;) {
                    const ssize_t w = ::write(to, buf + off, static_cast<std::size_t>(n - off));
                    if (w <= 0)
                        return;
                    off += w;
                }
            }
        }
    }

    const int to_port_;
    int listen_ = -1;
    int port_ = 0;
    std::atomic<bool> stop_{false};
    std::atomic<bool> forwarding_{true};
    std::mutex mutex_;
    std::thread accepting_;
    std::vector<std::thread> threads_;
    std::vector<int> fds_;
};

// How many of `done` were refused opens and writes. (A refused `stat` or
// listing is not always a record of its own: the kernel may have answered
// the lookup from its cache and the attributes alone failed.)
std::size_t refused(const std::vector<Requests::Done>& done)
{
    std::size_t n = 0;
    for (const auto& d : done)
        n += d.outcome.err != 0 && d.what != "stat" && d.what != "ls" ? 1 : 0;
    return n;
}

// The refusals (EIO) audited since the `before`th record, counting those a
// `repeats` record counted: fail-closed refusals are coalesced per uid (the
// first of a window is written, the rest counted when it ends, which may be
// a window an earlier outage opened). Waits for `expected` of them, or for
// the longest a window can take to end.
std::size_t refusals_audited(const Mount& m, std::size_t before, std::size_t expected)
{
    std::size_t n = 0;
    eventually(milliseconds(25000), [&] {
        n = 0;
        for (const auto& r : since(m, before)) {
            if (r.value("op", "") == "repeats")
                n += r.value("count", 0);
            else if (r.value("result", "") == "EIO")
                ++n;
        }
        return n >= expected;
    });
    return n;
}

// Reads, stat, ls, a write and a commit at close, against a stopped server:
// each returns within the bound, a write fails with EIO and makes nothing.
void requests_while_cut(StoreHost& h, const std::string& round, const std::function<void()>& cut,
                        const std::function<void()>& restore)
{
    Mount& m = h.mount;
    const std::size_t before = m.audit_count();
    Requests r;
    struct Restore {
        const std::function<void()>& restore;
        bool done = false;
        void now()
        {
            if (!done)
                restore();
            done = true;
        }
        ~Restore() { now(); }
    } frozen{restore};
    cut();
    r.run("cat cached", [&] { return read_file(m.path("app/cached")); });
    r.run("cat cold", [&] { return read_file(m.path("app/cold")); });
    r.run("stat", [&] { return stat_path(m.path("app/other")); });
    r.run("ls", [&] { return list_dir(m.path("app")); });
    // (Another name than the reads': a writer's O_TRUNC empties the inode's
    // size for every reader of that name until the attributes are asked
    // again, outage or not -- not what this test is about.)
    r.run("write (commit at close)", [&] { return write_file(m.path("app/written"), "while frozen " + round); });
    r.run("new name", [&] { return write_file(m.path("app/new-" + round), "x"); });
    // Issued later, while the first are still waiting (as a reader's next
    // `cat` of the name a writer holds would be).
    std::this_thread::sleep_for(milliseconds(500));
    r.run("cat cached, later", [&] { return read_file(m.path("app/cached")); });
    const bool all = r.wait(bound + milliseconds(2000));
    frozen.now();
    const auto done = r.join();
    INFO("round " << round << "\n" << describe(done));
    INFO(m.daemon_stderr());
    CHECK(all);
    for (const auto& d : done) {
        INFO(d.what);
        CHECK(d.took <= bound);
        if (d.what.rfind("cat cached", 0) == 0 && d.outcome.err == 0)
            CHECK(d.outcome.data == "v1");  // served as it was, or refused
        else if (d.what == "write (commit at close)" || d.what == "new name")
            CHECK(d.outcome.err == EIO);
        else if (d.what != "ls" && d.what != "stat" && d.outcome.err != 0)
            CHECK(d.outcome.err == EIO);
    }
    // Service resumes by itself; what failed made nothing.
    CHECK(eventually(milliseconds(15000), [&] { return read_file(m.path("app/cached")).data == "v1"; }));
    CHECK(read_file(m.path("app/new-" + round)).err == ENOENT);
    CHECK(get_xattr(m.path("app/cached"), "user.vault.version").data == "1");
    CHECK(get_xattr(m.path("app/written"), "user.vault.version").data == "1");
    // Each refusal is audited: the write's, and every read refused.
    const auto records = since(m, before);
    std::string text;
    for (const auto& rec : records)
        text += rec.dump() + "\n";
    INFO(text);
    CHECK(refusals_audited(m, before, refused(done)) >= refused(done));
}

}  // namespace

TEST_CASE("a frozen PostgreSQL: every request returns within the bound, refusals audited, service resumes; again "
          "after an outage with a failed write",
          "[hosts][pg][frozen]")
{
    PgServer pg;
    StoreHost h(pg.new_database());
    Mount& m = h.mount;
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/cached"), "v1").err == 0);
    REQUIRE(write_file(m.path("app/cold"), "cold").err == 0);
    REQUIRE(write_file(m.path("app/other"), "other").err == 0);
    REQUIRE(write_file(m.path("app/written"), "w").err == 0);
    REQUIRE(ok(read_file(m.path("app/cached"))) == "v1");
    std::unique_ptr<Frozen> frozen;
    const auto freeze = [&] { frozen = std::make_unique<Frozen>(pg); };
    const auto thaw = [&] { frozen.reset(); };
    requests_while_cut(h, "1", freeze, thaw);
    // The second outage meets a daemon that has already dropped sessions
    // and failed a write: the same bound.
    requests_while_cut(h, "2", freeze, thaw);
    CHECK(write_file(m.path("app/cached"), "v2").err == 0);
    CHECK(ok(read_file(m.path("app/cached"))) == "v2");
}

TEST_CASE("a network partition (a proxy that stops forwarding): every request returns within the bound, refusals "
          "audited, service resumes when it mends",
          "[hosts][pg][frozen]")
{
    PgServer pg;
    Proxy proxy(pg.port());
    std::string url = pg.new_database();
    const std::string direct = ":" + std::to_string(pg.port()) + "/";
    url.replace(url.find(direct), direct.size(), ":" + std::to_string(proxy.port()) + "/");
    StoreHost h(url);
    Mount& m = h.mount;
    REQUIRE(make_dir(m.path("app")).err == 0);
    REQUIRE(write_file(m.path("app/cached"), "v1").err == 0);
    REQUIRE(write_file(m.path("app/cold"), "cold").err == 0);
    REQUIRE(write_file(m.path("app/other"), "other").err == 0);
    REQUIRE(write_file(m.path("app/written"), "w").err == 0);
    REQUIRE(ok(read_file(m.path("app/cached"))) == "v1");
    requests_while_cut(h, "partition", [&] { proxy.cut(); }, [&] { proxy.mend(); });
    CHECK(write_file(m.path("app/cached"), "v2").err == 0);
    CHECK(ok(read_file(m.path("app/cached"))) == "v2");
}

TEST_CASE("a lock held by another session: requests return within the bound, refused and audited, and resume when "
          "it is released",
          "[hosts][pg][frozen]")
{
    OneSecret one;
    PgServer& pg = one.pg;
    const std::string& db = one.db;
    Mount& m = one.m;
    // Another session takes every table vaultfs reads and writes, and sits.
    const std::string sql = "BEGIN; LOCK TABLE secrets, versions, feed IN ACCESS EXCLUSIVE MODE; "
                            "SELECT pg_sleep(120);";
    const std::string command = "cd /tmp && exec runuser -u postgres -- psql -X -q -h 127.0.0.1 -p " +
                                std::to_string(pg.port()) + " -U postgres -d " + db + " -c \"" + sql + "\"";
    const char* argv[] = {"/bin/sh", "-c", command.c_str(), nullptr};
    pid_t holder = -1;
    REQUIRE(::posix_spawn(&holder, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ) == 0);
    struct Release {
        PgServer& pg;
        pid_t pid;
        void now()
        {
            if (pid <= 0)
                return;
            pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(120)%' AND "
                    "pid <> pg_backend_pid()");
            ::kill(pid, SIGTERM);
            ::waitpid(pid, nullptr, 0);
            pid = -1;
        }
        ~Release() { now(); }
    } release{pg, holder};
    REQUIRE(eventually(milliseconds(20000), [&] {
        return pg.psql("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation = "
                       "'feed'::regclass",
                       db) == "1";
    }));
    const std::size_t before = m.audit_count();
    Requests r;
    r.run("write", [&] { return write_file(m.path("app/s"), "blocked"); });
    r.run("cat (uncached row)", [&] { return read_file(m.path("app/s@1")); });
    r.run("new name", [&] { return write_file(m.path("app/t"), "x"); });
    const bool all = r.wait(bound + milliseconds(2000));
    release.now();
    const auto done = r.join();
    INFO(describe(done));
    INFO(m.daemon_stderr());
    CHECK(all);
    for (const auto& d : done) {
        INFO(d.what);
        CHECK(d.took <= bound);
        if (d.what != "cat (uncached row)" || d.outcome.err != 0)
            CHECK(d.outcome.err == EIO);
    }
    {
        std::string text;
        for (const auto& rec : since(m, before))
            text += rec.dump() + "\n";
        INFO(text);
        CHECK(refusals_audited(m, before, refused(done)) >= refused(done));
    }
    // Released: the next write goes through, and nothing of the refused ones exists.
    CHECK(eventually(milliseconds(15000), [&] { return write_file(m.path("app/s"), "v2").err == 0; }));
    CHECK(ok(read_file(m.path("app/s"))) == "v2");
    CHECK(get_xattr(m.path("app/s"), "user.vault.version").data == "2");
    CHECK(read_file(m.path("app/t")).err == ENOENT);
}

TEST_CASE("a commit the server is slow to finish: the write fails with EIO in the bound, and its outcome is looked "
          "up and audited once the server answers, never made twice",
          "[hosts][pg][frozen]")
{
    OneSecret one;
    PgServer& pg = one.pg;
    const std::string& db = one.db;
    Mount& m = one.m;
    const std::string outcome = GENERATE(Catch::Generators::as<std::string>{}, "committed", "rolled back");
    INFO("the slow commit is " << outcome);
    // A deferred trigger runs at COMMIT: it takes 4 s (a slow disk, a
    // synchronous standby that lags), then succeeds or fails.
    bool sql_ok = false;
    // (Quoted with '', not $$: psql's command line goes through a shell.)
    pg.psql("CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN PERFORM pg_sleep(4); " +
                std::string(outcome == "committed" ? "" : "RAISE EXCEPTION ''refused at commit''; ") +
                "RETURN NULL; END'; CREATE CONSTRAINT TRIGGER slow AFTER UPDATE ON feed DEFERRABLE INITIALLY "
                "DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
            db, &sql_ok);
    REQUIRE(sql_ok);
    const std::size_t before = m.audit_count();
    const auto start = Clock::now();
    const Outcome w = write_file(m.path("app/s"), "slow");
    const auto took = Clock::now() - start;
    pg.psql("DROP TRIGGER slow ON feed; DROP FUNCTION slow_commit();", db, &sql_ok);
    INFO(m.daemon_stderr());
    CHECK(w.err == EIO);
    CHECK(took <= bound);
    // The write's record names the transaction; the outcome's record follows.
    nlohmann::json failed, resolved;
    CHECK(eventually(milliseconds(20000), [&] {
        for (const auto& rec : since(m, before)) {
            if (rec.value("result", "") == "EIO" && rec.value("reason", "").find("did not confirm the commit") !=
                                                         std::string::npos)
                failed = rec;
            if (rec.value("op", "") == "commit_outcome")
                resolved = rec;
        }
        return !failed.is_null() && !resolved.is_null();
    }));
    INFO(failed.dump());
    INFO(resolved.dump());
    REQUIRE(failed.is_object());
    REQUIRE(resolved.is_object());
    const std::string reason = failed["reason"];
    const auto at = reason.find("transaction ");
    REQUIRE(at != std::string::npos);
    const std::string xid = reason.substr(at + 12, reason.find(' ', at + 12) - at - 12);
    CHECK(resolved["attribute"] == outcome);
    CHECK(resolved["reason"].get<std::string>().find("transaction " + xid + ",") != std::string::npos);
    // What the store holds agrees with the record, once and only once.
    const std::string want = outcome == "committed" ? "slow" : "v1";
    CHECK(eventually(milliseconds(10000), [&] { return read_file(m.path("app/s")).data == want; }));
    CHECK(get_xattr(m.path("app/s"), "user.vault.version").data == (outcome == "committed" ? "2" : "1"));
    CHECK(pg.psql("SELECT count(*) FROM versions", db) == (outcome == "committed" ? "2" : "1"));
    // And the next write is an ordinary one.
    CHECK(write_file(m.path("app/s"), "after").err == 0);
    CHECK(ok(read_file(m.path("app/s"))) == "after");
}

}  // namespace vaultfs::testing
