#include "fs/daemon/mountpoint.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string_view>

namespace vaultfs::fs {

namespace {

// Is `path` the mountpoint of a FUSE filesystem right now?
bool is_fuse_mountpoint(const std::string& path)
{
    std::ifstream in("/proc/self/mountinfo");
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string id, parent, devs, root, mnt;
        fields >> id >> parent >> devs >> root >> mnt;
        if (mnt != path)
            continue;
        const auto dash = line.find(" - ");
        if (dash != std::string::npos && line.compare(dash + 3, 4, "fuse") == 0)
            return true;
    }
    return false;
}

}  // namespace

bool has_entries(const std::string& dir)
{
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr)
        return false;
    bool any = false;
    while (const dirent* e = ::readdir(d)) {
        const std::string_view n(e->d_name);
        if (n != "." && n != "..") {
            any = true;
            break;
        }
    }
    ::closedir(d);
    return any;
}

bool clean_stale_mount(const std::string& mountpoint, std::string& error)
{
    struct stat st{};
    if (::stat(mountpoint.c_str(), &st) == 0) {
        if (is_fuse_mountpoint(mountpoint)) {
            error = mountpoint + " is already mounted by a running FUSE daemon; unmount it first (fusermount3 -u " +
                    mountpoint + ")";
            return false;
        }
        if (!S_ISDIR(st.st_mode)) {
            error = mountpoint + " is not a directory";
            return false;
        }
        return true;
    }
    if (errno != ENOTCONN) {
        error = "cannot use mountpoint " + mountpoint + ": " + std::strerror(errno) + " (create it with mkdir)";
        return false;
    }
    spdlog::warn("{} holds a stale mount left by a daemon that died; unmounting it", mountpoint);
    if (::umount2(mountpoint.c_str(), MNT_DETACH) != 0) {
        const pid_t pid = ::fork();
        if (pid == 0) {
            ::execlp("fusermount3", "fusermount3", "-u", "-z", mountpoint.c_str(), static_cast<char*>(nullptr));
            ::_exit(127);
        }
        int status = 1;
        if (pid > 0)
            ::waitpid(pid, &status, 0);
        if (status != 0) {
            error = "cannot remove the stale mount at " + mountpoint + "; run: fusermount3 -u -z " + mountpoint;
            return false;
        }
    }
    if (::stat(mountpoint.c_str(), &st) != 0) {
        error = "the stale mount at " + mountpoint + " is still in the way: " + std::strerror(errno);
        return false;
    }
    return true;
}

int in_mount_namespace(const std::string& ns_path, const std::function<int()>& action)
{
    if (ns_path.empty())
        return action();
    const pid_t pid = ::fork();
    if (pid < 0)
        return errno;
    if (pid == 0) {
        const int ns = ::open(ns_path.c_str(), O_RDONLY | O_CLOEXEC);
        if (ns < 0 || ::setns(ns, CLONE_NEWNS) != 0)
            ::_exit(errno != 0 ? errno : EPERM);
        ::_exit(action());
    }
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid)
        return errno;
    return WIFEXITED(status) ? WEXITSTATUS(status) : EINTR;
}

int mount_fuse_fd(int fd, const std::string& mountpoint, bool allow_other)
{
    std::string options = "fd=" + std::to_string(fd) + ",rootmode=40000,user_id=" + std::to_string(::geteuid()) +
                          ",group_id=" + std::to_string(::getegid());
    if (allow_other)
        options += ",allow_other";
    if (::mount("vaultfs", mountpoint.c_str(), "fuse.vaultfs", MS_NOSUID | MS_NODEV | MS_NOATIME, options.c_str()) != 0)
        return errno;
    return 0;
}

}  // namespace vaultfs::fs
