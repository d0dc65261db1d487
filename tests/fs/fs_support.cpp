#include "fs_support.hpp"

#include <catch2/catch.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <openssl/rand.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace vaultfs::testing {

std::string ok(const Outcome& o)
{
    INFO("errno " << o.err << " (" << std::strerror(o.err) << ") " << o.data);
    REQUIRE(o.err == 0);
    return o.data;
}

std::string slurp(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

namespace {

int run(const std::vector<std::string>& argv, bool quiet = true)
{
    const pid_t pid = ::fork();
    if (pid == 0) {
        if (quiet) {
            const int null = ::open("/dev/null", O_WRONLY);
            ::dup2(null, 1);
            ::dup2(null, 2);
        }
        std::vector<char*> args;
        for (const auto& a : argv)
            args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        ::_exit(127);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

std::string unique_name(const std::string& tag)
{
    // Short: user names are at most 32 characters.
    return "vt" + std::to_string(::getpid() % 100000) + tag + random_hex(2);
}

bool write_all(int fd, const void* data, std::size_t n)
{
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
        const ssize_t w = ::write(fd, p, n);
        if (w <= 0)
            return false;
        p += w;
        n -= static_cast<std::size_t>(w);
    }
    return true;
}

void send_outcome(int fd, const Outcome& o)
{
    const std::uint64_t len = o.data.size();
    write_all(fd, &o.err, sizeof o.err);
    write_all(fd, &len, sizeof len);
    write_all(fd, o.data.data(), o.data.size());
}

bool read_exact(int fd, void* out, std::size_t n)
{
    auto* p = static_cast<char*>(out);
    while (n > 0) {
        const ssize_t r = ::read(fd, p, n);
        if (r <= 0)
            return false;
        p += r;
        n -= static_cast<std::size_t>(r);
    }
    return true;
}

Outcome receive_outcome(int fd)
{
    Outcome o;
    std::uint64_t len = 0;
    if (!read_exact(fd, &o.err, sizeof o.err) || !read_exact(fd, &len, sizeof len))
        throw std::runtime_error("test child died without an answer");
    o.data.resize(len);
    if (!read_exact(fd, o.data.data(), len))
        throw std::runtime_error("test child died mid-answer");
    return o;
}

Outcome in_child(const std::function<void()>& become, const std::function<Outcome()>& action)
{
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)  // what the action execs must not hold it open
        throw std::runtime_error("pipe failed");
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::close(fds[0]);
        become();
        send_outcome(fds[1], action());
        ::_exit(0);
    }
    ::close(fds[1]);
    // Read by length, not to end of file: a child another thread forks
    // meanwhile holds a copy of the write end for as long as it lives.
    Outcome o;
    try {
        o = receive_outcome(fds[0]);
    } catch (...) {
        ::close(fds[0]);
        ::waitpid(pid, nullptr, 0);
        throw;
    }
    ::close(fds[0]);
    ::waitpid(pid, nullptr, 0);
    return o;
}

}  // namespace

std::string random_hex(std::size_t bytes)
{
    std::vector<unsigned char> raw(bytes);
    RAND_bytes(raw.data(), static_cast<int>(raw.size()));
    static const char digits[] = "0123456789abcdef";
    std::string s;
    for (const auto b : raw) {
        s.push_back(digits[b >> 4]);
        s.push_back(digits[b & 0xf]);
    }
    return s;
}

void move_audit_to(const Mount& m, const std::string& dir, const std::string& extra)
{
    std::filesystem::copy_file(m.state_file("audit.jsonl"), dir + "/audit.jsonl");
    std::filesystem::remove(m.state_file("audit.jsonl"));
    std::ofstream(m.state_file("vaultfs.conf"), std::ios::app) << "audit_file = " << dir << "/audit.jsonl\n" << extra;
}

BackgroundDaemon::~BackgroundDaemon()
{
    shell("fusermount3 -u -z " + mountpoint + " 2>/dev/null");
    const int pid = std::atoi(slurp(state + "/lock").c_str());
    if (pid > 1)
        ::kill(pid, SIGTERM);
}

std::string vaultfs_binary()
{
    const char* bin = std::getenv("VAULTFS_BIN");
    if (bin == nullptr)
        throw std::runtime_error("VAULTFS_BIN is not set (run through meson test)");
    return bin;
}

std::optional<TestToken> test_token()
{
    const auto env = [](const char* name) {
        const char* v = std::getenv(name);
        return std::string(v == nullptr ? "" : v);
    };
    TestToken t{env("VAULTFS_TEST_TOKEN_MODULE"), env("VAULTFS_TEST_TOKEN_LABEL"), env("VAULTFS_TEST_TOKEN_PIN_FILE"),
                env("VAULTFS_TEST_TOKEN_NAME")};
    if (t.module.empty() || t.label.empty() || t.pin_file.empty())
        return std::nullopt;
    return t;
}

// ---- users -------------------------------------------------------------------------

TestGroup::TestGroup(const std::string& tag) : name(unique_name(tag))
{
    if (run({"groupadd", name}) != 0)
        throw std::runtime_error("groupadd " + name + " failed");
    const group* g = ::getgrnam(name.c_str());
    if (g == nullptr)
        throw std::runtime_error("group " + name + " not found after groupadd");
    gid = g->gr_gid;
}

TestGroup::~TestGroup() { run({"groupdel", name}); }

TestUser::TestUser(const std::string& tag, const std::vector<const TestGroup*>& member_of) : name(unique_name(tag))
{
    std::vector<std::string> argv{"useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin"};
    std::string list;
    for (const auto* g : member_of)
        list += (list.empty() ? "" : ",") + g->name;
    if (!list.empty()) {
        argv.push_back("-G");
        argv.push_back(list);
    }
    argv.push_back(name);
    if (run(argv) != 0)
        throw std::runtime_error("useradd " + name + " failed");
    const passwd* pw = ::getpwnam(name.c_str());
    if (pw == nullptr)
        throw std::runtime_error("user " + name + " not found after useradd");
    uid = pw->pw_uid;
    gid = pw->pw_gid;
    for (const auto* g : member_of)
        groups.push_back(g->gid);
}

TestUser::~TestUser() { run({"userdel", name}); }

Outcome as(const TestUser& user, const std::function<Outcome()>& action)
{
    return in_child(
        [&] {
            if (::setgroups(user.groups.size(), user.groups.data()) != 0 ||
                ::setresgid(user.gid, user.gid, user.gid) != 0 || ::setresuid(user.uid, user.uid, user.uid) != 0)
                ::_exit(99);
        },
        action);
}

Outcome as_root(const std::function<Outcome()>& action)
{
    return in_child([] {}, action);
}


Paused::Paused(const TestUser* user, std::function<Outcome()> first, std::function<Outcome()> second)
{
    int results[2];
    int go[2];
    if (::pipe2(results, O_CLOEXEC) != 0 || ::pipe2(go, O_CLOEXEC) != 0)
        throw std::runtime_error("pipe failed");
    pid_ = ::fork();
    if (pid_ == 0) {
        ::close(results[0]);
        ::close(go[1]);
        if (user != nullptr && (::setgroups(user->groups.size(), user->groups.data()) != 0 ||
                                ::setresgid(user->gid, user->gid, user->gid) != 0 ||
                                ::setresuid(user->uid, user->uid, user->uid) != 0))
            ::_exit(99);
        send_outcome(results[1], first());
        char c;
        if (::read(go[0], &c, 1) != 1)
            ::_exit(0);
        send_outcome(results[1], second());
        ::_exit(0);
    }
    ::close(results[1]);
    ::close(go[0]);
    results_ = results[0];
    go_ = go[1];
    first_ = receive_outcome(results_);
}

Outcome Paused::finish()
{
    const char c = 'g';
    if (::write(go_, &c, 1) != 1)
        throw std::runtime_error("the paused child is gone");
    Outcome o = receive_outcome(results_);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return o;
}

Paused::~Paused()
{
    if (pid_ > 0) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
    }
    ::close(results_);
    ::close(go_);
}

// ---- actions ---------------------------------------------------------------------

Outcome read_file(const std::string& path)
{
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0)
        return {errno, {}};
    std::string data;
    char buf[65536];
    for (;;) {
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0) {
            const int e = errno;
            ::close(fd);
            return {e, {}};
        }
        if (n == 0)
            break;
        data.append(buf, static_cast<std::size_t>(n));
    }
    if (::close(fd) != 0)
        return {errno, data};
    return {0, data};
}

Outcome write_file(const std::string& path, const std::string& data, int flags)
{
    const int fd = ::open(path.c_str(), flags != 0 ? flags : O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return {errno, {}};
    if (!data.empty() && !write_all(fd, data.data(), data.size())) {
        const int e = errno;
        ::close(fd);
        return {e, "write"};
    }
    if (::close(fd) != 0)
        return {errno, "close"};
    return {0, {}};
}

Outcome list_dir(const std::string& path)
{
    DIR* d = ::opendir(path.c_str());
    if (d == nullptr)
        return {errno, {}};
    std::vector<std::string> names;
    errno = 0;
    while (const dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..")
            names.push_back(n);
    }
    const int e = errno;
    ::closedir(d);
    std::sort(names.begin(), names.end());
    std::string out;
    for (const auto& n : names)
        out += (out.empty() ? "" : "\n") + n;
    return {e, out};
}

Outcome stat_path(const std::string& path)
{
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0)
        return {errno, {}};
    return {0, std::to_string(st.st_size)};
}

Outcome make_dir(const std::string& path) { return {::mkdir(path.c_str(), 0700) == 0 ? 0 : errno, {}}; }
Outcome remove_dir(const std::string& path) { return {::rmdir(path.c_str()) == 0 ? 0 : errno, {}}; }
Outcome remove_file(const std::string& path) { return {::unlink(path.c_str()) == 0 ? 0 : errno, {}}; }
Outcome rename_path(const std::string& from, const std::string& to)
{
    return {::rename(from.c_str(), to.c_str()) == 0 ? 0 : errno, {}};
}

Outcome get_xattr(const std::string& path, const std::string& name)
{
    char buf[65536];
    const ssize_t n = ::getxattr(path.c_str(), name.c_str(), buf, sizeof buf);
    if (n < 0)
        return {errno, {}};
    return {0, std::string(buf, static_cast<std::size_t>(n))};
}

Outcome set_xattr(const std::string& path, const std::string& name, const std::string& value)
{
    return {::setxattr(path.c_str(), name.c_str(), value.data(), value.size(), 0) == 0 ? 0 : errno, {}};
}

Outcome list_xattr(const std::string& path)
{
    char buf[65536];
    const ssize_t n = ::listxattr(path.c_str(), buf, sizeof buf);
    if (n < 0)
        return {errno, {}};
    std::vector<std::string> names;
    for (ssize_t i = 0; i < n;) {
        names.emplace_back(buf + i);
        i += static_cast<ssize_t>(names.back().size()) + 1;
    }
    std::sort(names.begin(), names.end());
    std::string out;
    for (const auto& x : names)
        out += (out.empty() ? "" : "\n") + x;
    return {0, out};
}

bool eventually(int seconds, const std::function<bool()>& done)
{
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (std::chrono::steady_clock::now() < until) {
        if (done())
            return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return done();
}

std::uint64_t unproven_through(const std::string& verify_output)
{
    static const std::string mark = "acknowledge --through ";
    std::uint64_t through = 0;
    for (auto at = verify_output.find(mark); at != std::string::npos; at = verify_output.find(mark, at + 1))
        through = std::max<std::uint64_t>(through, std::stoull(verify_output.substr(at + mark.size())));
    return through;
}

Outcome shell(const std::string& command)
{
    FILE* p = ::popen(command.c_str(), "r");
    if (p == nullptr)
        return {errno, {}};
    std::string out;
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0)
        out.append(buf, n);
    const int status = ::pclose(p);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, out};
}

// ---- the mount -----------------------------------------------------------------------

Mount::Mount(MountOptions options) : options_(std::move(options))
{
    std::string tmpl = (std::filesystem::temp_directory_path() / "vaultfs-it-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr)
        throw std::runtime_error("mkdtemp failed");
    root = tmpl;
    ::chmod(root.c_str(), 0755);  // other users must reach the mountpoint
    // Tests run the binary as other uids too, and the build tree may sit in a
    // directory they cannot reach (a clone in root's 0700 home): each mount
    // runs its own copy.
    binary = root + "/vaultfs";
    std::filesystem::copy_file(vaultfs_binary(), binary);
    ::chmod(binary.c_str(), 0755);
    state = root + "/state";
    mountpoint = root + "/mnt";
    stderr_path_ = root + "/daemon.stderr";
    std::filesystem::create_directory(mountpoint);
    if (options_.init) {
        std::vector<std::string> init{binary, "init", "--state", state};
        if (const auto token = test_token(); token && !options_.embedded_token)
            init.insert(init.end(), {"--module", token->module, "--token-label", token->label, "--pin-file",
                                     token->pin_file});
        if (run(init) != 0)
            throw std::runtime_error("vaultfs init failed");
        if (!options_.config_lines.empty()) {
            std::ofstream conf(state + "/vaultfs.conf", std::ios::app);
            for (const auto& line : options_.config_lines)
                conf << line << "\n";
        }
        start();
    }
}

Mount::~Mount()
{
    try {
        stop();
    } catch (...) {
    }
    // A sanitizer report from the daemon (run under ASan/UBSan/TSan by
    // `scripts/test --sanitize|--tsan`) fails the test that started it.
    const std::string log = daemon_stderr();
    for (const char* marker : {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                               "WARNING: ThreadSanitizer"}) {
        if (log.find(marker) != std::string::npos) {
            const auto at = log.find(marker);
            FAIL_CHECK("the daemon reported a sanitizer error:\n" << log.substr(at > 200 ? at - 200 : 0, 4000));
            break;
        }
    }
    std::error_code ec;
    std::filesystem::remove_all(root, ec);
}

bool Mount::mounted() const
{
    std::ifstream in("/proc/self/mountinfo");
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream f(line);
        std::string id, parent, devs, r, mnt;
        f >> id >> parent >> devs >> r >> mnt;
        if (mnt == mountpoint)
            return true;
    }
    return false;
}

void Mount::start()
{
    pid_ = ::fork();
    if (pid_ == 0) {
        const int err = ::open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
        ::dup2(err, 2);
        const int null = ::open("/dev/null", O_RDWR);
        ::dup2(null, 0);
        ::dup2(null, 1);
        std::vector<std::string> argv = options_.wrapper;
        for (const std::string& a : {binary, std::string("mount"), std::string("-f"), std::string("--threads"),
                                     std::to_string(options_.threads), std::string("--state"), state, mountpoint})
            argv.push_back(a);
        std::vector<char*> args;
        for (auto& a : argv)
            args.push_back(a.data());
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
            pid_ = -1;
            const std::string how = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                                        : "exit status " + std::to_string(WEXITSTATUS(status));
            const std::string log = daemon_stderr();
            throw std::runtime_error("vaultfs mount exited during start-up (" + how + "):\n" +
                                     log.substr(log.size() > 2000 ? log.size() - 2000 : 0));
        }
        // Live: the mountpoint answers stat as another file system than its
        // parent. (A stale mount answers ENOTCONN; once the new daemon has
        // detached it, the bare directory answers, on the parent's device,
        // until the new mount is made.)
        struct stat st{};
        struct stat parent{};
        if (::stat(mountpoint.c_str(), &st) == 0 && ::stat(root.c_str(), &parent) == 0 && st.st_dev != parent.st_dev)
            return;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    stop();
    throw std::runtime_error("vaultfs did not mount within 20 s:\n" + daemon_stderr());
}

Outcome Mount::start_expecting_failure()
{
    const std::size_t before = daemon_stderr().size();
    Outcome o = shell(binary + " mount -f --state " + state + " " + mountpoint + " 2>>" + stderr_path_ + " </dev/null");
    o.data = daemon_stderr().substr(before);
    if (o.err == 0 || mounted())
        ::umount2(mountpoint.c_str(), MNT_DETACH);
    return o;
}

void Mount::stop()
{
    if (pid_ > 0) {
        ::kill(pid_, SIGTERM);
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        int status = 0;
        while (::waitpid(pid_, &status, WNOHANG) == 0) {
            if (std::chrono::steady_clock::now() > deadline) {
                ::kill(pid_, SIGKILL);
                ::waitpid(pid_, &status, 0);
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        pid_ = -1;
    }
    if (mounted() && ::umount2(mountpoint.c_str(), MNT_DETACH) != 0)
        run({"fusermount3", "-u", "-z", mountpoint});
}

void Mount::kill_daemon()
{
    if (pid_ > 0) {
        // The daemon is two processes (fs/daemon/restart/supervisor.hpp): the
        // supervisor's death ends the server too, a moment later; this
        // returns once both are gone, as after a crash of the whole daemon.
        std::ifstream children("/proc/" + std::to_string(pid_) + "/task/" + std::to_string(pid_) + "/children");
        pid_t server = -1;
        children >> server;
        ::kill(pid_, SIGKILL);
        int status = 0;
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
        if (server > 0) {
            ::kill(server, SIGKILL);
            // Until its descriptors are closed. The leader's fd list empties
            // as it exits, while its other threads may still hold the
            // table: wait until they have left /proc/PID/task too.
            const auto alive = [server] {
                const std::string dir = "/proc/" + std::to_string(server);
                std::error_code ec;
                std::size_t threads = 0;
                for (std::filesystem::directory_iterator t(dir + "/task", ec), end; !ec && t != end; t.increment(ec))
                    ++threads;
                std::filesystem::directory_iterator fds(dir + "/fd", ec);
                const bool open = !ec && fds != std::filesystem::directory_iterator();
                return threads > 1 || open;
            };
            for (int i = 0; i < 500 && alive(); ++i)
                std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
    }
}

std::string Mount::daemon_stderr() const { return slurp(stderr_path_); }

std::vector<nlohmann::json> Mount::audit() const
{
    std::vector<nlohmann::json> out;
    std::istringstream in(slurp(state + "/audit.jsonl"));
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty())
            continue;
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded() || !j.is_object())
            throw std::runtime_error("audit line is not a JSON object: " + line.substr(0, 200));
        out.push_back(std::move(j));
    }
    return out;
}

nlohmann::json Mount::last_audit(const std::string& op, std::optional<uid_t> uid) const
{
    const auto records = audit();
    for (auto it = records.rbegin(); it != records.rend(); ++it)
        if (it->value("op", "") == op && (!uid || it->value("uid", -1) == static_cast<std::int64_t>(*uid)))
            return *it;
    throw std::runtime_error("no audit record with op " + op);
}

std::vector<nlohmann::json> Mount::records_of(const std::function<void()>& action) const
{
    const auto before = audit_count();
    action();
    auto all = audit();
    if (all.size() < before)
        return {};
    return std::vector<nlohmann::json>(all.begin() + static_cast<std::ptrdiff_t>(before), all.end());
}

Outcome Mount::verify() const { return shell(binary + " audit verify --state " + state + " 2>&1"); }

}  // namespace vaultfs::testing

namespace vaultfs::testing {

nlohmann::json p11_attack(const std::string& state, const std::string& command)
{
    const char* tool = std::getenv("VAULTFS_P11_ATTACK");
    if (tool == nullptr)
        throw std::runtime_error("VAULTFS_P11_ATTACK is not set (meson test sets it)");
    std::string module, label, pin, env;
    std::ifstream conf(state + "/vaultfs.conf");
    std::string line;
    const auto value = [&](const std::string& key) -> std::optional<std::string> {
        if (line.rfind(key + " = ", 0) != 0)
            return std::nullopt;
        std::string v = line.substr(key.size() + 3);
        if (const auto at = v.find("${STATE}"); at != std::string::npos)
            v.replace(at, 8, state);
        return v;
    };
    while (std::getline(conf, line)) {
        if (auto v = value("pkcs11_module"))
            module = *v;
        else if (auto v = value("token_label"))
            label = *v;
        else if (auto v = value("pin_source"))
            pin = v->substr(5);  // file:PATH
        else if (auto v = value("module_env.SOFTHSM2_CONF"))
            env = "SOFTHSM2_CONF=" + *v;
    }
    if (!pin.empty() && pin[0] != '/')
        pin = state + "/" + pin;
    const auto r = shell(std::string(tool) + " --module " + module + " --label " + label + " --pin-file " + pin +
                         (env.empty() ? "" : " --env " + env) + " " + command);
    if (r.err != 0)
        throw std::runtime_error("p11-attack " + command + " failed with " + std::to_string(r.err));
    return nlohmann::json::parse(r.data);
}

}  // namespace vaultfs::testing
