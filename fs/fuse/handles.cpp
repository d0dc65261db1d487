#include "fs/fuse/handles.hpp"

#include <algorithm>

namespace vaultfs::fs {

PageCacheReaders::Ticket PageCacheReaders::enter(std::uint64_t ino)
{
    std::unique_lock lock(mutex_);
    filled_.wait(lock, [&] { return !filling_.contains(ino); });
    const bool first = open_[ino]++ == 0;
    if (first)
        filling_.insert(ino);
    return Ticket(this, ino, first);
}

void PageCacheReaders::Ticket::filled()
{
    if (!readers_ || !filling_)
        return;
    filling_ = false;
    {
        std::lock_guard lock(readers_->mutex_);
        readers_->filling_.erase(ino_);
    }
    readers_->filled_.notify_all();
}

PageCacheReaders::Ticket::~Ticket()
{
    if (!readers_)
        return;
    filled();
    std::lock_guard lock(readers_->mutex_);
    if (const auto it = readers_->open_.find(ino_); it != readers_->open_.end() && --it->second == 0)
        readers_->open_.erase(it);
}

std::uint64_t HandleTable::add(std::shared_ptr<Handle> h)
{
    std::unique_lock lock(mutex_);
    const auto fh = next_++;
    handles_.emplace(fh, std::move(h));
    return fh;
}

std::shared_ptr<Handle> HandleTable::find(std::uint64_t fh) const
{
    std::shared_lock lock(mutex_);
    const auto it = handles_.find(fh);
    return it == handles_.end() ? nullptr : it->second;
}

std::shared_ptr<Handle> HandleTable::remove(std::uint64_t fh)
{
    std::unique_lock lock(mutex_);
    const auto it = handles_.find(fh);
    if (it == handles_.end())
        return nullptr;
    auto h = std::move(it->second);
    handles_.erase(it);
    return h;
}

void HandleTable::number_from(std::uint64_t base)
{
    std::unique_lock lock(mutex_);
    next_ = std::max(next_, base);
}

bool HandleTable::add_at(std::uint64_t fh, std::shared_ptr<Handle> h)
{
    std::unique_lock lock(mutex_);
    return handles_.emplace(fh, std::move(h)).second;
}

std::vector<std::pair<std::uint64_t, std::shared_ptr<Handle>>> HandleTable::all() const
{
    std::shared_lock lock(mutex_);
    return {handles_.begin(), handles_.end()};
}

std::size_t HandleTable::size() const
{
    std::shared_lock lock(mutex_);
    return handles_.size();
}

}  // namespace vaultfs::fs
