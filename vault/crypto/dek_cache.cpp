#include "vault/crypto/dek_cache.hpp"

namespace vaultfs::vault {

DekCache::DekCache(std::size_t capacity, std::chrono::milliseconds ttl, std::function<Clock::time_point()> now)
    : capacity_(capacity), ttl_(ttl), now_(std::move(now))
{
}

std::string DekCache::make_key(std::string_view kek_id, std::span<const std::uint8_t> sealed)
{
    std::string key(kek_id);
    key.push_back('/');
    key.append(reinterpret_cast<const char*>(sealed.data()), sealed.size());
    return key;
}

DekCache::Dek DekCache::find(std::string_view kek_id, std::span<const std::uint8_t> sealed)
{
    std::lock_guard lock(mutex_);
    if (!enabled()) {
        ++misses_;
        return nullptr;
    }
    const auto it = index_.find(make_key(kek_id, sealed));
    if (it == index_.end()) {
        ++misses_;
        return nullptr;
    }
    if (it->second->expires <= now_()) {
        lru_.erase(it->second);
        index_.erase(it);
        ++misses_;
        return nullptr;
    }
    lru_.splice(lru_.begin(), lru_, it->second);
    ++hits_;
    return it->second->dek;
}

void DekCache::insert(std::string_view kek_id, std::span<const std::uint8_t> sealed, Dek dek)
{
    if (!enabled())
        return;
    auto key = make_key(kek_id, sealed);
    std::lock_guard lock(mutex_);
    if (const auto it = index_.find(key); it != index_.end()) {
        lru_.erase(it->second);
        index_.erase(it);
    }
    lru_.push_front(Entry{key, std::move(dek), now_() + ttl_});
    index_.emplace(std::move(key), lru_.begin());
    while (lru_.size() > capacity_) {
        index_.erase(lru_.back().key);
        lru_.pop_back();
    }
}

void DekCache::sweep()
{
    std::lock_guard lock(mutex_);
    const auto now = now_();
    for (auto it = lru_.begin(); it != lru_.end();) {
        if (it->expires <= now) {
            index_.erase(it->key);
            it = lru_.erase(it);
        } else {
            ++it;
        }
    }
}

void DekCache::clear()
{
    std::lock_guard lock(mutex_);
    index_.clear();
    lru_.clear();
}

DekCache::Stats DekCache::stats() const
{
    std::lock_guard lock(mutex_);
    return Stats{hits_, misses_, lru_.size()};
}

}  // namespace vaultfs::vault
