// state_lock: one process at a time owns a state directory.
//
// Two daemons serving one state would hand out the same version numbers,
// lose writes and break the audit chain for good. So whatever opens a state
// to change it (`vaultfs mount`, and any command that writes the database)
// first takes an exclusive open-file-description lock (fcntl F_OFD_SETLK)
// on STATE/lock, writes its pid there, and holds the lock until it exits;
// the kernel drops it when the process dies, however it dies. A second
// taker fails at once, naming the holder's pid. holder() only tests the
// lock (F_OFD_GETLK): it never takes it, so it cannot make a mount fail.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>

#include "vault/model/error.hpp"

namespace vaultfs::vault {

class StateLock {
public:
    // Errc::busy, with a message naming the holder's pid, when another
    // process holds the state; Errc::storage when the lock file cannot be made.
    static Result<StateLock> acquire(const std::string& state_dir);
    // The pid of the process holding the state, or nullopt when none does.
    static std::optional<pid_t> holder(const std::string& state_dir);
    // The lock held through `fd`, an fd of the holder's open file
    // description (a restart hands it to the next process).
    static StateLock adopt(int fd) { return StateLock(fd); }
    int fd() const { return fd_; }

    StateLock(StateLock&& other) noexcept;
    StateLock& operator=(StateLock&& other) noexcept;
    StateLock(const StateLock&) = delete;
    StateLock& operator=(const StateLock&) = delete;
    ~StateLock();

private:
    explicit StateLock(int fd) : fd_(fd) {}
    int fd_ = -1;
};

}  // namespace vaultfs::vault
