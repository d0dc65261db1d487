#include "vault/state/lock.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace vaultfs::vault {

namespace {

std::string lock_path(const std::string& dir) { return dir + "/lock"; }

// The whole file, exclusively.
struct flock whole(short type)
{
    struct flock l{};
    l.l_type = type;
    l.l_whence = SEEK_SET;
    l.l_start = 0;
    l.l_len = 0;
    return l;
}

std::optional<pid_t> read_pid(int fd)
{
    char buf[32] = {};
    const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return std::nullopt;
    const long pid = std::strtol(buf, nullptr, 10);
    return pid > 0 ? std::optional<pid_t>(static_cast<pid_t>(pid)) : std::nullopt;
}

}  // namespace

Result<StateLock> StateLock::acquire(const std::string& dir)
{
    const std::string path = lock_path(dir);
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return fail(Errc::storage, "cannot open " + path + ": " + std::strerror(errno));
    struct flock l = whole(F_WRLCK);
    if (::fcntl(fd, F_OFD_SETLK, &l) != 0) {
        const int err = errno;
        const bool held = err == EAGAIN || err == EACCES;
        const auto pid = held ? read_pid(fd) : std::nullopt;
        ::close(fd);
        if (!held)
            return fail(Errc::storage, "cannot lock " + path + ": " + std::strerror(err));
        return fail(Errc::busy, "state " + dir + " is in use by process " +
                                    (pid ? std::to_string(*pid) : std::string("(unknown)")) +
                                    " (a running `vaultfs mount`?); stop it first: one process serves a state");
    }
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
        const std::string why = std::strerror(errno);
        ::close(fd);
        return fail(Errc::storage, "cannot write " + path + ": " + why);
    }
    return StateLock(fd);
}

std::optional<pid_t> StateLock::holder(const std::string& dir)
{
    const int fd = ::open(lock_path(dir).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return std::nullopt;
    std::optional<pid_t> pid;
    struct flock l = whole(F_WRLCK);
    if (::fcntl(fd, F_OFD_GETLK, &l) == 0 && l.l_type != F_UNLCK)
        pid = read_pid(fd).value_or(0);
    ::close(fd);
    return pid;
}

StateLock::StateLock(StateLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

StateLock& StateLock::operator=(StateLock&& other) noexcept
{
    if (this != &other) {
        if (fd_ >= 0)
            ::close(fd_);
        fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
}

StateLock::~StateLock()
{
    if (fd_ >= 0)
        ::close(fd_);
}

}  // namespace vaultfs::vault
