#include "fs/fuse/staging.hpp"

#include <algorithm>

namespace vaultfs::fs {

std::shared_ptr<StagedFile> StagingArea::create(vault::VaultId vault, const std::string& name, uid_t uid, gid_t gid,
                                                std::uint32_t mode, UidQuota::Charge charge)
{
    std::lock_guard lock(mutex_);
    const Key key{vault.value, uid, name};
    if (by_name_.count(key) != 0)
        return nullptr;
    auto file = std::make_shared<StagedFile>(next_id_++, vault, name, uid, gid, mode, std::move(charge));
    file->modified = vault::now_micros();
    by_name_.emplace(key, file);
    by_id_.emplace(file->id, file);
    return file;
}

std::shared_ptr<StagedFile> StagingArea::find(vault::VaultId vault, const std::string& name, uid_t uid) const
{
    std::lock_guard lock(mutex_);
    const auto it = by_name_.find(Key{vault.value, uid, name});
    return it == by_name_.end() ? nullptr : it->second;
}

std::shared_ptr<StagedFile> StagingArea::by_id(std::int64_t id, uid_t uid) const
{
    std::lock_guard lock(mutex_);
    const auto it = by_id_.find(id);
    if (it == by_id_.end() || it->second->creator != uid)
        return nullptr;
    return it->second;
}

std::shared_ptr<StagedFile> StagingArea::take(vault::VaultId vault, const std::string& name, uid_t uid)
{
    std::lock_guard lock(mutex_);
    const auto it = by_name_.find(Key{vault.value, uid, name});
    if (it == by_name_.end())
        return nullptr;
    auto file = std::move(it->second);
    by_name_.erase(it);
    by_id_.erase(file->id);
    std::lock_guard file_lock(file->mutex);
    file->gone = true;
    return file;
}

bool StagingArea::rename(vault::VaultId vault, const std::string& from, const std::string& to, uid_t uid)
{
    std::shared_ptr<StagedFile> replaced;
    std::lock_guard lock(mutex_);
    const auto it = by_name_.find(Key{vault.value, uid, from});
    if (it == by_name_.end())
        return false;
    if (from == to)
        return true;
    auto file = std::move(it->second);
    by_name_.erase(it);
    const Key target{vault.value, uid, to};
    if (const auto old = by_name_.find(target); old != by_name_.end()) {
        replaced = std::move(old->second);
        by_id_.erase(replaced->id);
        by_name_.erase(old);
        std::lock_guard old_lock(replaced->mutex);
        replaced->gone = true;
    }
    {
        std::lock_guard file_lock(file->mutex);
        file->name = to;
    }
    by_name_.emplace(target, std::move(file));
    return true;
}

std::vector<std::shared_ptr<StagedFile>> StagingArea::list(vault::VaultId vault, uid_t uid) const
{
    std::lock_guard lock(mutex_);
    std::vector<std::shared_ptr<StagedFile>> out;
    for (const auto& [id, file] : by_id_)
        if (file->vault == vault && file->creator == uid)
            out.push_back(file);
    return out;
}

void StagingArea::expire_copies(std::int64_t secret, uid_t uid)
{
    const auto at = std::chrono::steady_clock::now() + copy_grace;
    std::lock_guard lock(mutex_);
    for (auto& [id, file] : by_id_) {
        std::lock_guard file_lock(file->mutex);
        if (file->creator == uid && file->copy_of == secret)
            file->expires = at;
    }
}

std::size_t StagingArea::sweep(std::chrono::steady_clock::time_point now)
{
    std::vector<std::shared_ptr<StagedFile>> dropped;  // freed (and wiped) outside the lock
    std::lock_guard lock(mutex_);
    for (auto it = by_name_.begin(); it != by_name_.end();) {
        auto& file = it->second;
        std::unique_lock file_lock(file->mutex);
        const bool expired = file->expires && now >= *file->expires;
        if (file->open_handles == 0 && (expired || now - file->last_closed >= idle_)) {
            file->gone = true;
            file_lock.unlock();
            by_id_.erase(file->id);
            dropped.push_back(std::move(file));
            it = by_name_.erase(it);
        } else {
            ++it;
        }
    }
    return dropped.size();
}
std::size_t StagingArea::count() const
{
    std::lock_guard lock(mutex_);
    return by_id_.size();
}

void StagingArea::number_from(std::int64_t base)
{
    std::lock_guard lock(mutex_);
    next_id_ = std::max(next_id_, base);
}

}  // namespace vaultfs::fs
