// Test support: a small tmpfs mounted for one test, to
// make a file system run out of space for real. Needs root (CAP_SYS_ADMIN).
#pragma once

#include <sys/mount.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <cerrno>
#include <cstring>
#include <string>

namespace vaultfs::testing {

// Mounted on `path` (created here) and unmounted in the destructor — lazily,
// so that a file still open on it cannot keep it mounted — also when the
// test fails.
class SmallTmpfs {
public:
    SmallTmpfs(const std::string& path, const char* options) : path_(path)
    {
        REQUIRE(::mkdir(path.c_str(), 0700) == 0);
        if (::mount("tmpfs", path.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, options) != 0)
            FAIL("cannot mount a tmpfs on " << path << " (" << std::strerror(errno)
                                             << "); this test needs root (CAP_SYS_ADMIN)");
        mounted_ = true;
    }
    ~SmallTmpfs()
    {
        if (mounted_)
            ::umount2(path_.c_str(), MNT_DETACH);
    }
    SmallTmpfs(const SmallTmpfs&) = delete;
    SmallTmpfs& operator=(const SmallTmpfs&) = delete;

    const std::string& path() const { return path_; }
    std::string operator/(const std::string& name) const { return path_ + "/" + name; }

    // Writes to `name` until the file system is full; returns the bytes
    // written (ENOSPC is checked).
    std::size_t fill(const std::string& name) const
    {
        const int fd = ::open((*this / name).c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        REQUIRE(fd >= 0);
        const std::string chunk(512, 'F');
        std::size_t total = 0;
        int err = 0;
        for (;;) {
            const ssize_t n = ::write(fd, chunk.data(), chunk.size());
            if (n <= 0) {
                err = errno;
                break;
            }
            total += static_cast<std::size_t>(n);
        }
        ::close(fd);
        CHECK(err == ENOSPC);
        return total;
    }

private:
    std::string path_;
    bool mounted_ = false;
};

}  // namespace vaultfs::testing
