#include "rsyslog.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace vaultfs::testing {

namespace {

int free_tcp_port()
{
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0)
        throw std::runtime_error("no free port");
    ::close(fd);
    return ntohs(a.sin_port);
}

bool accepts(int port)
{
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
}

}  // namespace

RsyslogServer::RsyslogServer()
{
    std::string tmpl = (std::filesystem::temp_directory_path() / "vaultfs-rsyslog-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr)
        throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    for (int attempt = 0; attempt < 3 && pid_ < 0; ++attempt) {
        port_ = free_tcp_port();
        {
            std::ofstream conf(dir_ + "/rsyslog.conf");
            conf << "global(workDirectory=\"" << dir_ << "\")\n"
                 << "module(load=\"imtcp\")\n"
                 << "input(type=\"imtcp\" address=\"127.0.0.1\" port=\"" << port_ << "\")\n"
                 << "template(name=\"fields\" type=\"string\" string=\"%syslogfacility-text% %app-name% %msgid% "
                    "%structured-data% %msg%\\n\")\n"
                 << "if $app-name == \"vaultfs-audit\" then {\n"
                 << "  action(type=\"omfile\" file=\"" << dir_ << "/received\" template=\"fields\" flushOnTXEnd=\"on\" "
                    "asyncWriting=\"off\")\n"
                 << "}\n";
        }
        const pid_t pid = ::fork();
        if (pid < 0)
            throw std::runtime_error("fork failed");
        if (pid == 0) {
            const std::string log = dir_ + "/rsyslogd.out";
            const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (out >= 0) {
                ::dup2(out, 1);
                ::dup2(out, 2);
            }
            const std::string conf = dir_ + "/rsyslog.conf";
            const std::string pidfile = dir_ + "/rsyslogd.pid";
            ::execl("/usr/sbin/rsyslogd", "rsyslogd", "-n", "-f", conf.c_str(), "-i", pidfile.c_str(),
                    static_cast<char*>(nullptr));
            ::_exit(127);
        }
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        int status = 0;
        while (std::chrono::steady_clock::now() < deadline) {
            if (::waitpid(pid, &status, WNOHANG) == pid)
                break;  // it exited: the port was taken after all, or it cannot run
            if (accepts(port_)) {
                pid_ = pid;
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        if (pid_ < 0 && ::waitpid(pid, &status, WNOHANG) == 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, &status, 0);
        }
    }
    if (pid_ < 0) {
        std::ifstream in(dir_ + "/rsyslogd.out");
        std::stringstream ss;
        ss << in.rdbuf();
        std::error_code ec;
        std::filesystem::remove_all(dir_, ec);
        throw std::runtime_error("rsyslogd did not start: " + ss.str());
    }
}

void RsyslogServer::kill()
{
    if (pid_ < 0)
        return;
    ::kill(pid_, SIGTERM);
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
        if (std::chrono::steady_clock::now() > deadline) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, &status, 0);
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
}

RsyslogServer::~RsyslogServer()
{
    kill();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
}

std::string RsyslogServer::received() const
{
    std::ifstream in(dir_ + "/received");
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

}  // namespace vaultfs::testing
