// DekCache: unsealed DEKs kept in locked memory so that repeated reads do not
// each pay a token round trip. Bounded (LRU) and time-limited (TTL); an entry
// is wiped when it is evicted, expires, or the cache is destroyed — or, if a
// reader still holds it, when that reader lets go.
//
// capacity 0 or ttl 0 disables the cache: every read goes to the token.
//
// Keyed by the sealed blob itself (plus the KEK id), so a sealed DEK that has
// been altered in the database can never hit a cached entry.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>

#include "hsm/secure_buffer.hpp"

namespace vaultfs::vault {

class DekCache {
public:
    using Clock = std::chrono::steady_clock;
    using Dek = std::shared_ptr<const hsm::SecureBuffer>;

    // `now` tells the time (tests step it; the daemon uses the steady clock).
    DekCache(std::size_t capacity, std::chrono::milliseconds ttl,
             std::function<Clock::time_point()> now = [] { return Clock::now(); });

    bool enabled() const { return capacity_ != 0 && ttl_.count() != 0; }

    // The cached DEK, or nullptr (a miss).
    Dek find(std::string_view kek_id, std::span<const std::uint8_t> sealed);
    // Remembers a DEK (no-op when disabled).
    void insert(std::string_view kek_id, std::span<const std::uint8_t> sealed, Dek dek);
    // Drops expired entries; run periodically so that expired keys do not
    // linger in memory until the next lookup.
    void sweep();
    void clear();

    struct Stats {
        std::uint64_t hits = 0;
        std::uint64_t misses = 0;
        std::size_t entries = 0;
    };
    Stats stats() const;

private:
    struct Entry {
        std::string key;
        Dek dek;
        Clock::time_point expires;
    };
    static std::string make_key(std::string_view kek_id, std::span<const std::uint8_t> sealed);

    const std::size_t capacity_;
    const std::chrono::milliseconds ttl_;
    const std::function<Clock::time_point()> now_;
    mutable std::mutex mutex_;
    std::list<Entry> lru_;  // front = most recently used
    std::unordered_map<std::string, std::list<Entry>::iterator> index_;
    std::uint64_t hits_ = 0;
    std::uint64_t misses_ = 0;
};

}  // namespace vaultfs::vault
