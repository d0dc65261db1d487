#include "fs/daemon/process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/sinks/rotating_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "fs/daemon/daemon.hpp"
#include "vault/audit/log.hpp"

namespace vaultfs::fs {

namespace {

// The audit log whose file SIGHUP reopens. Set while serving.
std::atomic<vault::audit::Log*> hup_target{nullptr};

void on_sighup(int)
{
    if (auto* audit = hup_target.load())
        audit->request_reopen();
}

// Whether a syslog daemon (rsyslog, or journald's /dev/log) takes messages.
bool syslog_reachable()
{
    const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, "/dev/log");
    const bool ok = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    return ok;
}

}  // namespace

void StartupChannel::failed(const std::string& message)
{
    spdlog::error("{}", message);
    send("E" + message);
}

void StartupChannel::abandon()
{
    if (fd_ >= 0)
        ::close(fd_);
    fd_ = -1;
}

void StartupChannel::send(const std::string& msg)
{
    if (fd_ < 0)
        return;
    (void)!::write(fd_, msg.data(), msg.size());
    ::close(fd_);
    fd_ = -1;
}

StartupChannel daemonize()
{
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
        std::fprintf(stderr, "vaultfs: pipe: %s\n", std::strerror(errno));
        std::exit(1);
    }
    const pid_t pid = ::fork();
    if (pid < 0) {
        std::fprintf(stderr, "vaultfs: fork: %s\n", std::strerror(errno));
        std::exit(1);
    }
    if (pid > 0) {
        ::close(fds[1]);
        std::string msg;
        char buf[4096];
        ssize_t n;
        while ((n = ::read(fds[0], buf, sizeof buf)) > 0)
            msg.append(buf, static_cast<std::size_t>(n));
        if (!msg.empty() && msg[0] == 'R')
            std::exit(0);
        if (!msg.empty() && msg[0] == 'E') {
            std::fprintf(stderr, "vaultfs: %s\n", msg.c_str() + 1);
        } else {
            int status = 0;
            ::waitpid(pid, &status, 0);
            std::fprintf(stderr, "vaultfs: the daemon exited during start-up (see syslog, or vaultfs.log in the state directory)\n");
        }
        std::exit(1);
    }
    ::close(fds[0]);
    ::setsid();
    return StartupChannel(fds[1]);
}

void detach_stdio()
{
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        ::dup2(null, 0);
        ::dup2(null, 1);
        ::dup2(null, 2);
        if (null > 2)
            ::close(null);
    }
    (void)!::chdir("/");
}

std::string setup_logging(bool foreground, const std::string& state_dir)
{
    std::shared_ptr<spdlog::logger> logger;
    std::string where = "stderr";
    if (foreground) {
        logger = spdlog::stderr_logger_mt("vaultfs");
    } else if (syslog_reachable()) {
        logger = spdlog::syslog_logger_mt("vaultfs", "vaultfs", LOG_PID, LOG_DAEMON);
        where = "syslog";
    } else {
        where = state_dir + "/vaultfs.log";
        try {
            logger = spdlog::rotating_logger_mt("vaultfs", where, 5 << 20, 3);
            ::chmod(where.c_str(), 0600);
        } catch (const spdlog::spdlog_ex&) {
            logger = spdlog::syslog_logger_mt("vaultfs", "vaultfs", LOG_PID, LOG_DAEMON);
            where = "syslog (" + where + " cannot be written)";
        }
    }
    logger->set_pattern(foreground || where.find("syslog") == std::string::npos ? "%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v"
                                                                                 : "%l %v");
    spdlog::set_default_logger(logger);
    spdlog::flush_on(spdlog::level::info);
    return where;
}

void install_sighup()
{
    struct sigaction hup{};
    hup.sa_handler = on_sighup;
    sigemptyset(&hup.sa_mask);
    ::sigaction(SIGHUP, &hup, nullptr);
}

void reopen_on_sighup(vault::audit::Log* log) { hup_target.store(log); }

void harden_process()
{
    ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    const rlimit none{0, 0};
    ::setrlimit(RLIMIT_CORE, &none);
}

}  // namespace vaultfs::fs
