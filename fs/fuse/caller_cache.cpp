#include "fs/fuse/caller_cache.hpp"

namespace vaultfs::fs {

std::optional<std::vector<gid_t>> CallerCache::groups(pid_t pid, uid_t uid, gid_t gid, const Fetch& fetch)
{
    const auto now = Clock::now();
    {
        std::lock_guard lock(mutex_);
        const auto it = entries_.find(pid);
        if (it != entries_.end() && it->second.uid == uid && it->second.gid == gid && now - it->second.fetched < ttl)
            return it->second.groups;
    }
    auto fresh = fetch();
    if (!fresh)
        return std::nullopt;
    std::lock_guard lock(mutex_);
    if (entries_.size() >= capacity)
        entries_.clear();
    entries_[pid] = Entry{uid, gid, *fresh, now};
    return fresh;
}

}  // namespace vaultfs::fs
