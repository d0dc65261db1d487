// caller_cache: supplementary groups of FUSE callers.
//
// The kernel's request carries uid, gid and pid but not the supplementary
// groups; fuse_req_getgroups() reads them from /proc/PID/task/TID/status,
// which costs a file open and read per call. The groups are therefore
// cached per (pid, uid, gid) for at most one second, and the cache holds at
// most 4096 entries (it is emptied when full). The bound on staleness: a
// process that drops a supplementary group keeps it, for policy decisions,
// for up to one second — and only if its pid, uid and gid are unchanged.
// The pid selects the cache entry; it never grants anything by itself.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace vaultfs::fs {

class CallerCache {
public:
    using Clock = std::chrono::steady_clock;
    static constexpr std::chrono::milliseconds ttl{1000};
    static constexpr std::size_t capacity = 4096;

    // The groups for (pid, uid, gid), from the cache or from `fetch`.
    // nullopt when `fetch` could not read them; that is not cached.
    using Fetch = std::function<std::optional<std::vector<gid_t>>()>;
    std::optional<std::vector<gid_t>> groups(pid_t pid, uid_t uid, gid_t gid, const Fetch& fetch);

private:
    struct Entry {
        uid_t uid;
        gid_t gid;
        std::vector<gid_t> groups;
        Clock::time_point fetched;
    };
    std::mutex mutex_;
    std::unordered_map<pid_t, Entry> entries_;
};

}  // namespace vaultfs::fs
