#include "vault/audit/coalescer.hpp"

namespace vaultfs::vault::audit {

RefusalCoalescer::RefusalCoalescer(Micros window, std::size_t capacity, std::size_t per_uid)
    : window_(window), capacity_(capacity), per_uid_(per_uid)
{
}

RefusalCoalescer::Verdict RefusalCoalescer::admit(const Key& key, std::int64_t gid, Micros now)
{
    Verdict v;
    auto it = groups_.find(key);
    if (it != groups_.end() && now - it->second.opened >= window_) {
        if (it->second.count > 0)
            v.flush = Summary{it->first, it->second.gid, it->second.count, it->second.first, it->second.last};
        forget(it);
        it = groups_.end();
    }
    if (it == groups_.end() && !key.vault.empty() && open_per_uid_[key.uid] >= per_uid_) {
        // This uid's names beyond its share: counted in its own overflow
        // group, whose first refusal is written like any group's.
        const Key mine{key.uid, key.op, key.result, "*", "*", "*"};
        it = groups_.find(mine);
        if (it == groups_.end() && groups_.size() < capacity_) {
            groups_.emplace(mine, Group{now, gid, 0, 0, 0});
            ++open_per_uid_[key.uid];
            v.write = true;
            return v;
        }
    }
    if (it == groups_.end()) {
        if (groups_.size() < capacity_) {
            groups_.emplace(key, Group{now, gid, 0, 0, 0});
            ++open_per_uid_[key.uid];
            v.write = true;
            return v;
        }
        // Too many groups: count it with the overflow group, which is itself
        // written once per window.
        const Key overflow{-1, "*", "*", "", "", ""};
        it = groups_.find(overflow);
        if (it == groups_.end()) {
            groups_.emplace(overflow, Group{now, -1, 1, now, now});
            return v;
        }
    }
    Group& g = it->second;
    if (g.count++ == 0)
        g.first = now;
    g.last = now;
    g.gid = gid;
    return v;
}

std::vector<RefusalCoalescer::Summary> RefusalCoalescer::drain(Micros now, bool everything)
{
    std::vector<Summary> out;
    for (auto it = groups_.begin(); it != groups_.end();) {
        if (!everything && now - it->second.opened < window_) {
            ++it;
            continue;
        }
        if (it->second.count > 0)
            out.push_back(Summary{it->first, it->second.gid, it->second.count, it->second.first, it->second.last});
        it = forget(it);
    }
    return out;
}

std::map<RefusalCoalescer::Key, RefusalCoalescer::Group>::iterator RefusalCoalescer::forget(
    std::map<Key, Group>::iterator it)
{
    if (const auto u = open_per_uid_.find(it->first.uid); u != open_per_uid_.end() && --u->second == 0)
        open_per_uid_.erase(u);
    return groups_.erase(it);
}

}  // namespace vaultfs::vault::audit
