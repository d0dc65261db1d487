#include "fs/daemon/restart/supervisor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>
#include <vector>

#include "fs/daemon/restart/channel.hpp"
#include "hsm/hex.hpp"

namespace vaultfs::fs::restart {

namespace {

using Clock = std::chrono::steady_clock;

struct Server {
    pid_t pid = -1;
    int socket = -1;
    bool serving = false;
    bool handed_over = false;  // sent its handles: its clean exit is not the mount's end
    Clock::time_point started = Clock::now();
};

// How long a restart's new process may take to be ready (a token login, a
// quick_check of a large database) before the restart is abandoned.
constexpr auto takeover_deadline = std::chrono::seconds(120);

std::string describe(int status)
{
    if (WIFSIGNALED(status))
        return std::string("killed by signal ") + ::strsignal(WTERMSIG(status));
    return "exit status " + std::to_string(WEXITSTATUS(status));
}

void close_fd(int& fd)
{
    if (fd >= 0)
        ::close(fd);
    fd = -1;
}

class Supervisor {
public:
    Supervisor(SupervisorOptions o, vault::StateLock lock) : options_(std::move(o)), lock_(std::move(lock))
    {
        current_.pid = options_.server;
        current_.socket = options_.server_socket;
    }
    int run();

private:
    bool listen();
    void accept_client();
    void on_server_message(Server& from, const Message& m);
    void drain(pid_t pid);
    void on_exit(pid_t pid, int status);
    std::optional<Server> spawn(const std::string& mode, const std::string& previous);
    void answer_client(const Message& m);
    void abandon_restart(const std::string& reason);
    void end_mount();

    SupervisorOptions options_;
    vault::StateLock lock_;
    Server current_;
    std::optional<Server> next_;   // a restart's new process, until it has taken over
    std::optional<Server> old_;    // the process that handed over, until it exits
    int device_ = -1;
    std::optional<std::pair<std::string, std::string>> init_;  // request, reply (hex)
    std::uint64_t generation_ = 1;
    int listen_ = -1;
    int client_ = -1;
    unsigned wait_ms_ = 10000;
    bool force_ = false;  // go on after wait_ms_, failing the writes still open
    Clock::time_point handover_at_{};
    pid_t restarted_from_ = -1;
    std::deque<Clock::time_point> crashes_;
    bool stopping_ = false;
    std::optional<int> exit_status_;
};

bool Supervisor::listen()
{
    const std::string path = supervisor_socket_path(options_.state_dir);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof addr.sun_path)
        return false;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    listen_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ::unlink(path.c_str());
    const mode_t old = ::umask(0177);
    const bool ok = listen_ >= 0 && ::bind(listen_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                    ::listen(listen_, 4) == 0;
    ::umask(old);
    if (!ok)
        spdlog::error("restart: cannot listen on {}: {}; `vaultfs restart` is unavailable", path, std::strerror(errno));
    return ok;
}

std::optional<Server> Supervisor::spawn(const std::string& mode, const std::string& previous)
{
    int sp[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0)
        return std::nullopt;
    const pid_t self = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
        ::close(sp[0]);
        ::close(sp[1]);
        return std::nullopt;
    }
    if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != self)
            ::_exit(1);
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);
        if (sp[1] == 3)
            ::fcntl(3, F_SETFD, 0);
        else
            ::dup2(sp[1], 3);  // dup2 leaves the copy open across exec
        const std::string bin = options_.binary;
        ::execl(bin.c_str(), bin.c_str(), "takeover", "--socket", "3", static_cast<char*>(nullptr));
        std::fprintf(stderr, "vaultfs: cannot start %s: %s\n", bin.c_str(), std::strerror(errno));
        ::_exit(127);
    }
    ::close(sp[1]);
    Server s;
    s.pid = pid;
    s.socket = sp[0];
    Message hello{"hello", {}, {device_, lock_.fd()}};
    hello.fields = {{"protocol", std::to_string(protocol_version)},
                    {"mode", mode},
                    {"generation", std::to_string(++generation_)},
                    {"state", options_.state_dir},
                    {"mountpoint", options_.mountpoint},
                    {"mount_namespace", options_.mount_namespace},
                    {"threads", std::to_string(options_.threads)},
                    {"debug", options_.debug ? "1" : "0"},
                    {"foreground", options_.foreground ? "1" : "0"},
                    {"previous", previous},
                    {"init_request", init_->first},
                    {"init_reply", init_->second}};
    if (!send_message(s.socket, hello))
        spdlog::error("restart: cannot talk to the new process {}: {}", pid, std::strerror(errno));
    return s;
}

void Supervisor::answer_client(const Message& m)
{
    if (client_ < 0)
        return;
    (void)send_message(client_, m);
    close_fd(client_);
}

void Supervisor::abandon_restart(const std::string& reason)
{
    spdlog::warn("restart refused: {}", reason);
    if (next_) {
        (void)send_message(next_->socket, Message{"abort", {}, {}});
        // Its exit is reaped in on_exit; it holds nothing the server needs.
    }
    answer_client(Message{"refused", {{"reason", reason}}, {}});
}

void Supervisor::accept_client()
{
    const int c = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0)
        return;
    // Only root or this daemon's user (the socket is 0600 in a 0700
    // directory as well).
    ucred peer{};
    socklen_t len = sizeof peer;
    if (::getsockopt(c, SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0 || (peer.uid != 0 && peer.uid != ::geteuid())) {
        ::close(c);
        return;
    }
    auto m = receive_message(c, 1000);
    if (m)
        for (const int fd : m->fds)
            ::close(fd);
    if (!m || m->kind != "restart") {
        ::close(c);
        return;
    }
    if (client_ >= 0 || next_) {
        (void)send_message(c, Message{"refused", {{"reason", "a restart is already under way"}}, {}});
        ::close(c);
        return;
    }
    if (!init_ || device_ < 0 || !current_.serving) {
        (void)send_message(c, Message{"refused", {{"reason", "the server is not serving yet"}}, {}});
        ::close(c);
        return;
    }
    client_ = c;
    wait_ms_ = static_cast<unsigned>(m->number("wait_ms"));
    force_ = m->get("force") == "1";
    spdlog::info("restart: starting {} to take over from process {}", options_.binary, current_.pid);
    next_ = spawn("graceful", std::to_string(current_.pid));
    if (!next_)
        abandon_restart(std::string("cannot start ") + options_.binary + ": " + std::strerror(errno));
}

void Supervisor::on_server_message(Server& from, const Message& m)
{
    const bool is_current = from.pid == current_.pid;
    const bool is_next = next_ && from.pid == next_->pid;
    if (m.kind == "device" && is_current && !m.fds.empty()) {
        close_fd(device_);
        device_ = m.fds[0];
        for (std::size_t i = 1; i < m.fds.size(); ++i)
            ::close(m.fds[i]);
        return;
    }
    for (const int fd : m.fds)
        ::close(fd);
    if (m.kind == "init" && is_current) {
        init_ = {m.get("request"), m.get("reply")};
    } else if (m.kind == "serving" && is_current) {
        current_.serving = true;
        crashes_.clear();
    } else if (m.kind == "ready" && is_next) {
        handover_at_ = Clock::now();
        (void)send_message(current_.socket, Message{"handover",
                                                    {{"wait_ms", std::to_string(wait_ms_)}, {"force", force_ ? "1" : "0"}},
                                                    {}});
    } else if (m.kind == "refused" && (is_next || is_current)) {
        abandon_restart(m.get("reason"));
    } else if (m.kind == "handles" && is_current) {
        // The old server has written its shutdown record and is leaving.
        current_.handed_over = true;
        if (next_) {
            (void)send_message(next_->socket, Message{"handles",
                                                      {{"data", m.get("data")}, {"hooks_seen", m.get("hooks_seen")}},
                                                      {}});
            old_ = current_;
            restarted_from_ = current_.pid;
            current_ = *next_;
            next_.reset();
        }
    }
    if (m.kind == "serving" && is_current && client_ >= 0) {
        const auto pause = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - handover_at_);
        spdlog::info("restart: process {} serves (the mount paused {} ms)", current_.pid, pause.count());
        answer_client(Message{"restarted",
                              {{"old", std::to_string(restarted_from_)},
                               {"new", std::to_string(current_.pid)},
                               {"pause_ms", std::to_string(pause.count())},
                               {"handles", m.get("handles")}},
                              {}});
    }
}

void Supervisor::end_mount()
{
    // The servers are gone: detach the mount, so that its users get errors
    // instead of a hung connection (only if it is still this connection's).
    if (options_.mount_namespace.empty() && connection_alive(device_))
        detach_mount(options_.mountpoint);
}

void Supervisor::drain(pid_t pid)
{
    for (;;) {
        Server* s = pid == current_.pid ? &current_ : next_ && pid == next_->pid ? &*next_ : nullptr;
        if (s == nullptr || s->socket < 0)
            return;
        pollfd p{s->socket, POLLIN, 0};
        if (::poll(&p, 1, 0) != 1)
            return;
        auto m = receive_message(s->socket, 1000);
        if (!m) {
            close_fd(s->socket);
            return;
        }
        on_server_message(*s, *m);
    }
}

void Supervisor::on_exit(pid_t pid, int status)
{
    if (old_ && pid == old_->pid) {
        close_fd(old_->socket);
        old_.reset();
        return;
    }
    if (next_ && pid == next_->pid) {
        // Why it refused, if it said so before it went, comes first.
        drain(pid);
        if (!next_ || pid != next_->pid)
            return;
        close_fd(next_->socket);
        next_.reset();
        if (client_ >= 0)
            answer_client(Message{"refused",
                                  {{"reason", "the new process exited before it took over (" + describe(status) +
                                                  "); see its log"}},
                                  {}});
        return;
    }
    if (pid != current_.pid)
        return;
    // What it said before it went comes first (its handles, say).
    drain(pid);
    if (pid != current_.pid) {
        on_exit(pid, status);
        return;
    }
    close_fd(current_.socket);
    const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (stopping_ || (clean && !current_.handed_over)) {
        if (!clean)
            end_mount();
        exit_status_ = clean ? 0 : 1;
        return;
    }
    spdlog::error("the server (process {}) ended: {}", pid, describe(status));
    if (next_)
        abandon_restart("the server ended during the restart");
    const auto now = Clock::now();
    crashes_.push_back(now);
    while (!crashes_.empty() && now - crashes_.front() > std::chrono::seconds(10))
        crashes_.pop_front();
    if (!init_ || device_ < 0 || crashes_.size() >= 3) {
        spdlog::error("{}; unmounting {}", !init_ ? "the server ended before it served" : "servers keep failing",
                      options_.mountpoint);
        end_mount();
        exit_status_ = 1;
        return;
    }
    auto s = spawn("crash", std::to_string(pid));
    if (!s) {
        end_mount();
        exit_status_ = 1;
        return;
    }
    current_ = *s;
}

int Supervisor::run()
{
    sigset_t mask;
    sigemptyset(&mask);
    for (const int s : {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT})
        sigaddset(&mask, s);
    ::sigprocmask(SIG_BLOCK, &mask, nullptr);
    const int signals = ::signalfd(-1, &mask, SFD_CLOEXEC);
    listen();
    while (!exit_status_) {
        std::vector<pollfd> fds{{signals, POLLIN, 0}};
        if (listen_ >= 0)
            fds.push_back({listen_, POLLIN, 0});
        std::vector<pid_t> servers;
        for (Server* s : {&current_, next_ ? &*next_ : nullptr, old_ ? &*old_ : nullptr})
            if (s != nullptr && s->socket >= 0) {
                fds.push_back({s->socket, POLLIN, 0});
                servers.push_back(s->pid);
            }
        int timeout = -1;
        if (next_) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next_->started +
                                                                                    takeover_deadline - Clock::now());
            if (left.count() <= 0) {
                ::kill(next_->pid, SIGKILL);  // its exit answers the client
                next_->started = Clock::now();  // (once)
                continue;
            }
            timeout = static_cast<int>(left.count());
        }
        if (::poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR)
            break;
        if (fds[0].revents & POLLIN) {
            signalfd_siginfo info{};
            if (::read(signals, &info, sizeof info) == sizeof info && info.ssi_signo != SIGCHLD) {
                if (info.ssi_signo != SIGHUP) {
                    stopping_ = true;
                    if (next_)
                        ::kill(next_->pid, SIGKILL);
                }
                ::kill(current_.pid, static_cast<int>(info.ssi_signo));
            }
            int status = 0;
            pid_t pid;
            while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0)
                on_exit(pid, status);
        }
        std::size_t at = 1;
        if (listen_ >= 0 && (fds[at++].revents & POLLIN))
            accept_client();
        for (const pid_t pid : servers) {
            const pollfd& p = fds[at++];
            // (Messages move servers around: each is found again by pid.)
            Server* s = pid == current_.pid        ? &current_
                        : next_ && pid == next_->pid ? &*next_
                        : old_ && pid == old_->pid   ? &*old_
                                                     : nullptr;
            if (s == nullptr || s->socket < 0 || !(p.revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            auto m = receive_message(s->socket, 1000);
            if (!m) {
                close_fd(s->socket);  // its exit comes as SIGCHLD
                continue;
            }
            on_server_message(*s, *m);
        }
    }
    ::unlink(supervisor_socket_path(options_.state_dir).c_str());
    close_fd(device_);
    return exit_status_.value_or(1);
}

}  // namespace

void detach_mount(const std::string& mountpoint)
{
    if (::umount2(mountpoint.c_str(), MNT_DETACH) == 0)
        return;
    const pid_t p = ::fork();
    if (p == 0) {
        ::execlp("fusermount3", "fusermount3", "-u", "-z", mountpoint.c_str(), static_cast<char*>(nullptr));
        ::_exit(127);
    }
    int status = 0;
    if (p > 0)
        ::waitpid(p, &status, 0);
}

bool connection_alive(int fd)
{
    pollfd p{fd, 0, 0};
    return fd >= 0 && ::poll(&p, 1, 0) >= 0 && !(p.revents & (POLLERR | POLLNVAL));
}

std::string supervisor_socket_path(const std::string& state_dir) { return state_dir + "/supervisor.sock"; }

int supervise(SupervisorOptions options, vault::StateLock lock)
{
    Supervisor s(std::move(options), std::move(lock));
    return s.run();
}

int request_restart(const std::string& state_dir, unsigned wait_ms, bool force)
{
    const std::string path = supervisor_socket_path(state_dir);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || ::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        std::fprintf(stderr, "vaultfs: cannot reach the supervisor at %s: %s (is %s mounted by vaultfs mount?)\n",
                     path.c_str(), std::strerror(errno), state_dir.c_str());
        return 1;
    }
    if (!send_message(s, Message{"restart", {{"wait_ms", std::to_string(wait_ms)}, {"force", force ? "1" : "0"}}, {}})) {
        std::fprintf(stderr, "vaultfs: cannot send to %s: %s\n", path.c_str(), std::strerror(errno));
        return 1;
    }
    auto reply = receive_message(s, -1);
    ::close(s);
    if (!reply) {
        std::fprintf(stderr, "vaultfs: the supervisor ended the exchange without an answer\n");
        return 1;
    }
    if (reply->kind == "restarted") {
        std::printf("restarted: process %s took over from %s (%s open file(s) kept), the mount paused %s ms\n",
                    reply->get("new").c_str(), reply->get("old").c_str(), reply->get("handles").c_str(),
                    reply->get("pause_ms").c_str());
        return 0;
    }
    std::fprintf(stderr, "vaultfs: restart refused: %s; the running server goes on serving\n",
                 reply->get("reason").c_str());
    return 1;
}

}  // namespace vaultfs::fs::restart
