#include "vault/store/integrity_stamp.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

namespace vaultfs::vault::integrity_stamp {
namespace {

std::string stamp_path(const std::string& db_path) { return db_path + ".checked"; }

// "device inode size mtime-seconds mtime-nanoseconds", or "" if the file
// cannot be stat'ed.
std::string fingerprint(const std::string& db_path)
{
    struct stat st{};
    if (::stat(db_path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
        return {};
    std::ostringstream out;
    out << st.st_dev << ' ' << st.st_ino << ' ' << st.st_size << ' ' << st.st_mtim.tv_sec << ' '
        << st.st_mtim.tv_nsec;
    return out.str();
}

}  // namespace

bool unchanged(const std::string& db_path)
{
    struct stat wal{};
    if (::stat((db_path + "-wal").c_str(), &wal) == 0 && wal.st_size > 0)
        return false;
    std::ifstream in(stamp_path(db_path));
    std::string recorded;
    if (!in || !std::getline(in, recorded))
        return false;
    const std::string now = fingerprint(db_path);
    return !now.empty() && recorded == now;
}

void clear(const std::string& db_path) { ::unlink(stamp_path(db_path).c_str()); }

void record(const std::string& db_path)
{
    const std::string now = fingerprint(db_path);
    if (now.empty())
        return;
    const std::string path = stamp_path(db_path);
    const std::string tmp = path + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return;  // no stamp: the next start checks the whole file
    const std::string line = now + "\n";
    const bool written = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
    if (::close(fd) != 0 || !written || std::rename(tmp.c_str(), path.c_str()) != 0)
        ::unlink(tmp.c_str());
}

}  // namespace vaultfs::vault::integrity_stamp
