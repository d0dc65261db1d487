#include "vault/hooks/hooks.hpp"

#include <fcntl.h>
#include <fnmatch.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include "vault/audit/log.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::hooks {

namespace {

using namespace std::chrono_literals;

// Commits become visible out of their time order (each takes its time
// before it commits): every look goes back this far, and what was fired
// in it is remembered.
constexpr Micros look_back = 5'000'000;
constexpr auto command_time = 30s;

constexpr std::array<std::pair<std::string_view, int>, 8> signals{{{"HUP", SIGHUP},
                                                                   {"USR1", SIGUSR1},
                                                                   {"USR2", SIGUSR2},
                                                                   {"TERM", SIGTERM},
                                                                   {"INT", SIGINT},
                                                                   {"QUIT", SIGQUIT},
                                                                   {"WINCH", SIGWINCH},
                                                                   {"ALRM", SIGALRM}}};

std::string_view next_word(std::string_view& rest)
{
    const auto start = rest.find_first_not_of(" \t");
    if (start == std::string_view::npos) {
        rest = {};
        return {};
    }
    rest.remove_prefix(start);
    const auto end = rest.find_first_of(" \t");
    const std::string_view word = rest.substr(0, end);
    rest.remove_prefix(end == std::string_view::npos ? rest.size() : end);
    return word;
}

bool valid_unit(std::string_view unit)
{
    if (unit.empty() || unit.front() == '-')
        return false;
    for (const char c : unit)
        if (!std::isalnum(static_cast<unsigned char>(c)) && std::string_view("@._:-\\").find(c) == std::string_view::npos)
            return false;
    return true;
}

std::string signal_name(int signal)
{
    for (const auto& [name, s] : signals)
        if (s == signal)
            return std::string(name);
    return std::to_string(signal);
}

std::string describe_status(int status)
{
    if (WIFEXITED(status))
        return "exit status " + std::to_string(WEXITSTATUS(status));
    return std::string("killed by signal ") + ::strsignal(WTERMSIG(status));
}

// A uid by name (or number).
std::optional<uid_t> uid_of(const std::string& user)
{
    passwd pw{};
    passwd* found = nullptr;
    std::vector<char> buf(16384);
    if (::getpwnam_r(user.c_str(), &pw, buf.data(), buf.size(), &found) == 0 && found != nullptr)
        return pw.pw_uid;
    uid_t uid = 0;
    const auto [p, ec] = std::from_chars(user.data(), user.data() + user.size(), uid);
    if (!user.empty() && ec == std::errc() && p == user.data() + user.size())
        return uid;
    return std::nullopt;
}

// The real uid of the process `pidfd` holds, as /proc says it while the
// process is alive (a pid is not reused while its process lives).
std::optional<uid_t> real_uid(pid_t pid, int pidfd)
{
    std::ifstream status("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    std::optional<uid_t> uid;
    while (std::getline(status, line))
        if (line.rfind("Uid:", 0) == 0) {
            std::istringstream fields(line.substr(4));
            uid_t real = 0;
            if (fields >> real)
                uid = real;
        }
    // Still the process the pidfd holds: then /proc/PID was its.
    if (::syscall(SYS_pidfd_send_signal, pidfd, 0, nullptr, 0) != 0)
        return std::nullopt;
    return uid;
}

}  // namespace

// The confused-deputy rules of a signal hook (docs/lifecycle.md "Reacting to
// rotation"): vaultfs runs as root, and a pidfile is whatever its writer
// put there. So the pidfile must be root's or the hook's user's, and
// writable by nobody else; the process must be the user's (its real uid);
// never pid 1 nor vaultfs itself; and the signal goes through a pidfd, so a
// pid recycled meanwhile is never hit.
Result<std::string> send_signal(const Hook& hook)
{
    const auto uid = uid_of(hook.user);
    if (!uid)
        return fail(Errc::not_found, "no user '" + hook.user + "'");
    const int fd = ::open(hook.pid_file.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return fail(Errc::not_found, "no pid in " + hook.pid_file + ": " + std::strerror(errno));
    struct stat st{};
    std::string text(32, '\0');
    const bool stat_ok = ::fstat(fd, &st) == 0;
    const ssize_t n = stat_ok ? ::read(fd, text.data(), text.size()) : -1;
    ::close(fd);
    if (!stat_ok || !S_ISREG(st.st_mode))
        return fail(Errc::not_permitted, hook.pid_file + " is not a regular file");
    if (st.st_uid != 0 && st.st_uid != *uid)
        return fail(Errc::not_permitted, hook.pid_file + " belongs to uid " + std::to_string(st.st_uid) +
                                             ", neither root nor " + hook.user + ": not trusted");
    if ((st.st_mode & 022) != 0)
        return fail(Errc::not_permitted, hook.pid_file + " is writable by others than its owner: not trusted");
    long pid = 0;
    if (n > 0) {
        text.resize(static_cast<std::size_t>(n));
        const auto first = text.find_first_not_of(" \t\n");
        if (first != std::string::npos)
            std::from_chars(text.data() + first, text.data() + text.size(), pid);
    }
    if (pid <= 0)
        return fail(Errc::not_found, "no pid in " + hook.pid_file);
    if (pid == 1 || pid == ::getpid() || pid == ::getppid())
        return fail(Errc::not_permitted, "pid " + std::to_string(pid) + " is " +
                                             (pid == 1 ? std::string("init") : std::string("vaultfs itself")) +
                                             ": never signalled");
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0));
    if (pidfd < 0)
        return fail(Errc::not_found, "pid " + std::to_string(pid) + ": " + std::strerror(errno));
    const auto owner = real_uid(static_cast<pid_t>(pid), pidfd);
    std::string refused;
    if (!owner)
        refused = "pid " + std::to_string(pid) + " is gone";
    else if (*owner != *uid)
        refused = "pid " + std::to_string(pid) + " runs as uid " + std::to_string(*owner) + ", not " + hook.user;
    else if (::syscall(SYS_pidfd_send_signal, pidfd, hook.signal, nullptr, 0) != 0)
        refused = "pidfd_send_signal(" + std::to_string(pid) + "): " + std::strerror(errno);
    ::close(pidfd);
    if (!refused.empty())
        return fail(Errc::not_permitted, refused);
    return "sent SIG" + signal_name(hook.signal) + " to " + std::to_string(pid) + " (" + hook.user + ")";
}

bool Hook::matches(std::string_view vault, std::string_view name) const
{
    return ::fnmatch(vault_glob.c_str(), std::string(vault).c_str(), 0) == 0 &&
           ::fnmatch(name_glob.c_str(), std::string(name).c_str(), 0) == 0;
}

Result<Hook> parse(std::string_view spec)
{
    Hook h;
    h.spec = std::string(spec);
    std::string_view rest = spec;
    const std::string_view target = next_word(rest);
    const auto slash = target.find('/');
    if (slash == std::string_view::npos || slash == 0 || slash + 1 == target.size())
        return fail(Errc::invalid_argument, "on_change: '" + std::string(target) +
                                                "' is not VAULT/GLOB (e.g. web/tls-* or */db-password)");
    h.vault_glob = std::string(target.substr(0, slash));
    h.name_glob = std::string(target.substr(slash + 1));
    const std::string_view action = next_word(rest);
    if (action == "signal") {
        h.action = Hook::Action::signal;
        h.user = std::string(next_word(rest));
        if (!h.user.empty() && h.user.front() == '/')  // the form before the USER was required
            return fail(Errc::invalid_argument,
                        "on_change: signal names the user whose process it signals: signal USER PIDFILE SIGNAL "
                        "(e.g. '" + h.vault_glob + "/" + h.name_glob + " signal www-data " + h.user + " " +
                            std::string(next_word(rest)) + "')");
        h.pid_file = std::string(next_word(rest));
        std::string_view name = next_word(rest);
        if (name.substr(0, 3) == "SIG")
            name.remove_prefix(3);
        for (const auto& [n, s] : signals)
            if (n == name)
                h.signal = s;
        if (h.user.empty() || h.pid_file.empty() || h.pid_file.front() != '/' || h.signal == 0 ||
            !next_word(rest).empty())
            return fail(Errc::invalid_argument, "on_change: signal takes a USER, an absolute PIDFILE and one of "
                                                "SIGHUP, SIGUSR1, SIGUSR2, SIGTERM, SIGINT, SIGQUIT, SIGWINCH, "
                                                "SIGALRM");
    } else if (action == "exec") {
        h.action = Hook::Action::exec;
        h.user = std::string(next_word(rest));
        const auto start = rest.find_first_not_of(" \t");
        h.command = start == std::string_view::npos ? std::string() : std::string(rest.substr(start));
        if (h.user.empty() || h.command.empty())
            return fail(Errc::invalid_argument, "on_change: exec takes a USER and a COMMAND");
    } else if (action == "systemd-reload") {
        h.action = Hook::Action::systemd_reload;
        h.unit = std::string(next_word(rest));
        if (!valid_unit(h.unit) || !next_word(rest).empty())
            return fail(Errc::invalid_argument, "on_change: systemd-reload takes one UNIT name");
    } else {
        return fail(Errc::invalid_argument, "on_change: the action is signal, exec or systemd-reload, not '" +
                                                std::string(action) + "'");
    }
    return h;
}

Runner::Runner(std::vector<Hook> hooks, std::vector<Hook> expiry_hooks, Store& store, audit::Log& audit, Micros since)
    : hooks_(std::move(hooks)), expiry_hooks_(std::move(expiry_hooks)), store_(store), audit_(audit), seen_(since)
{
    // What was there before `since` counts as fired.
    if (auto before = store_.changes_since(since - look_back, 100000))
        for (const auto& c : *before)
            if (c.at <= since)
                fired_.emplace(c.certificate, c.id, c.at);
    thread_ = std::thread([this] { run(); });
}

Runner::~Runner()
{
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
}

void Runner::run()
{
    std::uint64_t generation = 0;
    auto last_look = std::chrono::steady_clock::now() - 1h;
    std::unique_lock lock(mutex_);
    while (!stop_) {
        cv_.wait_for(lock, 50ms);
        if (stop_)
            break;
        lock.unlock();
        // A commit here moves the generation; the feed does too (another
        // host's); and a look every 2 s catches anything else.
        const auto now = std::chrono::steady_clock::now();
        if (store_.generation() != generation || now - last_look >= 2s) {
            generation = store_.generation();
            last_look = now;
            look();
        }
        lock.lock();
        std::vector<Event> events = std::move(pending_);
        pending_.clear();
        lock.unlock();
        fire_expiry(events);
        reap(false);
        lock.lock();
    }
    // Expiry events handed over are recorded as sent: fire them before going.
    std::vector<Event> events = std::move(pending_);
    pending_.clear();
    lock.unlock();
    fire_expiry(events);
    reap(true);
}

void Runner::look()
{
    const Micros since = seen_.load();
    auto changes = store_.changes_since(since - look_back, 10000);
    if (!changes) {
        spdlog::warn("on_change hooks: cannot read the changes: {}", changes.error().message);
        return;
    }
    Micros newest = since;
    for (const Change& c : *changes) {
        newest = std::max(newest, c.at);
        if (!fired_.emplace(c.certificate, c.id, c.at).second)
            continue;
        for (const Hook& h : hooks_)
            if (h.matches(c.vault, c.name))
                fire(h, Event{c.vault, c.certificate ? ".certs/" + c.name : c.name,
                              c.certificate ? "certificate" : "secret", "change", c.version});
    }
    seen_.store(newest);
    std::erase_if(fired_, [&](const auto& k) { return std::get<2>(k) < newest - 2 * look_back; });
}

void Runner::fire_expiry(const std::vector<Event>& events)
{
    for (const Event& e : events)
        for (const Hook& h : expiry_hooks_)  // globs match the name without .keys/ or .certs/
            if (h.matches(e.vault, e.name.substr(e.name.starts_with(".") ? e.name.find('/') + 1 : 0)))
                fire(h, e);
}

void Runner::expiry_event(Event event)
{
    {
        std::lock_guard lock(mutex_);
        pending_.push_back(std::move(event));
    }
    cv_.notify_all();
}

void Runner::fire(const Hook& hook, const Event& change)
{
    const std::string& name = change.name;
    if (hook.action == Hook::Action::signal) {
        auto sent = send_signal(hook);
        record(hook.spec, change.vault, name, change.version, sent.has_value(),
               sent ? *sent : sent.error().message);
        return;
    }

    // A command: everything it needs is made before fork (only
    // async-signal-safe calls in the child of this threaded process).
    uid_t uid = 0;
    gid_t gid = 0;
    std::vector<gid_t> groups;
    std::vector<std::string> args;
    if (hook.action == Hook::Action::exec) {
        passwd pw{};
        passwd* found = nullptr;
        std::vector<char> buf(16384);
        if (::getpwnam_r(hook.user.c_str(), &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) {
            record(hook.spec, change.vault, name, change.version, false, "no user '" + hook.user + "'");
            return;
        }
        uid = pw.pw_uid;
        gid = pw.pw_gid;
        int count = 64;
        groups.resize(static_cast<std::size_t>(count));
        if (::getgrouplist(pw.pw_name, gid, groups.data(), &count) < 0) {
            groups.resize(static_cast<std::size_t>(count));
            ::getgrouplist(pw.pw_name, gid, groups.data(), &count);
        }
        groups.resize(static_cast<std::size_t>(std::max(count, 0)));
        args = {"/bin/sh", "-c", hook.command};
    } else {
        std::string systemctl;
        for (const char* p : {"/usr/bin/systemctl", "/bin/systemctl"})
            if (::access(p, X_OK) == 0) {
                systemctl = p;
                break;
            }
        if (systemctl.empty()) {
            record(hook.spec, change.vault, name, change.version, false, "systemctl is not installed");
            return;
        }
        args = {systemctl, "reload", hook.unit};
    }
    std::vector<std::string> env{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                 "VAULTFS_VAULT=" + change.vault,
                                 "VAULTFS_NAME=" + name.substr(name.starts_with(".") ? name.find('/') + 1 : 0),
                                 "VAULTFS_KIND=" + change.kind, "VAULTFS_VERSION=" + std::to_string(change.version),
                                 "VAULTFS_EVENT=" + change.event};
    std::vector<char*> argv, envp;
    for (auto& a : args)
        argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : env)
        envp.push_back(e.data());
    envp.push_back(nullptr);
    const bool drop = hook.action == Hook::Action::exec;

    const pid_t pid = ::fork();
    if (pid < 0) {
        record(hook.spec, change.vault, name, change.version, false, std::string("fork: ") + std::strerror(errno));
        return;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);
        const int null = ::open("/dev/null", O_RDWR);
        if (null < 0)
            ::_exit(126);
        ::dup2(null, 0);
        ::dup2(null, 1);
        ::dup2(null, 2);
        ::close_range(3, ~0U, 0);
        if (drop && (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0))
            ::_exit(126);
        if (::chdir("/") != 0)
            ::_exit(126);
        ::execve(argv[0], argv.data(), envp.data());
        ::_exit(127);
    }
    running_.push_back(Running{pid, hook.spec, change.vault, name, change.version, std::chrono::steady_clock::now()});
}

void Runner::reap(bool all)
{
    const auto deadline = std::chrono::steady_clock::now() + (all ? 5s : 0s);
    while (!running_.empty()) {
        for (auto it = running_.begin(); it != running_.end();) {
            int status = 0;
            const pid_t r = ::waitpid(it->pid, &status, WNOHANG);
            const bool late = std::chrono::steady_clock::now() - it->started > command_time;
            if (r == 0 && late) {
                ::kill(it->pid, SIGKILL);
                ::waitpid(it->pid, &status, 0);
                record(it->spec, it->vault, it->name, it->version, false, "killed after 30 s");
            } else if (r == it->pid) {
                const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
                record(it->spec, it->vault, it->name, it->version, ok,
                       WIFEXITED(status) && WEXITSTATUS(status) == 127 ? "cannot run the command (exit status 127)"
                                                                      : describe_status(status));
            } else if (r == 0) {
                ++it;
                continue;
            }
            it = running_.erase(it);
        }
        if (!all || running_.empty() || std::chrono::steady_clock::now() >= deadline)
            break;
        std::this_thread::sleep_for(20ms);
    }
    if (all)
        for (const auto& r : running_)
            record(r.spec, r.vault, r.name, r.version, false, "still running at shutdown (left to finish)");
}

void Runner::record(const std::string& spec, const std::string& vault, const std::string& name, std::uint64_t version,
                    bool ok, const std::string& outcome)
{
    if (ok)
        spdlog::info("on_change {} ({}/{}): {}", spec, vault, name, outcome);
    else
        spdlog::warn("on_change {} ({}/{}) failed: {}", spec, vault, name, outcome);
    audit::Event ev{.op = "hook", .vault = vault, .secret = name, .allowed = true, .rule = spec};
    if (version != 0)
        ev.version = version;
    ev.result = ok ? "ok" : "EIO";
    ev.reason = outcome;
    if (auto r = audit_.append(ev); !r)
        spdlog::error("on_change: the audit record of a hook cannot be written: {}", r.error().message);
}

}  // namespace vaultfs::vault::hooks
