// Feed: how a daemon on PostgreSQL learns of other hosts' changes, and
// knows that it has not missed any.
//
// Every committed write batch raises the one row of `feed` (rev + 1) and
// sends NOTIFY vaultfs_changes in its transaction; writers queue on that
// row's lock, so revisions commit in order and a reader that has seen rev
// R has seen every change up to R. The listener holds its own connection,
// LISTENs, and reads `SELECT rev FROM feed` on every notification and at
// least every bound/4 (a notification can be lost: it is a hint, never the
// record). A read that succeeds confirms freshness as of the moment it was
// sent; when rev moved, `changed` runs first (the Store drops its caches).
//
// fresh() fails once no read has confirmed freshness for the staleness
// bound: PostgreSQL is unreachable, or the listener is stuck. It recovers
// by itself: the listener reconnects every 200 ms until it can read again.
// Its own calls give up at the bound too (a stopped server never answers),
// and after each confirmation `confirmed` runs on its session (the Store
// looks up the outcome of commits left in doubt).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "vault/model/error.hpp"

namespace vaultfs::vault {

namespace db {
class Connection;
}

class Feed {
public:
    // `changed` runs before a moved revision counts as fresh, `after` once
    // it does; `confirmed` after every confirmation, on the feed's session.
    Feed(std::string conninfo, std::string where, std::chrono::milliseconds bound, std::function<void()> changed,
         std::function<void()> after, std::function<void(db::Connection&)> confirmed = {});
    ~Feed();
    Feed(const Feed&) = delete;
    Feed& operator=(const Feed&) = delete;

    // Confirms once (synchronously) and starts following.
    Result<void> start();

    Result<void> fresh() const;
    // Since the last confirmation started (since this Feed was made when none has).
    std::chrono::milliseconds age() const;
    std::int64_t revision() const { return revision_.load(); }

private:
    void run(std::unique_ptr<class FeedConnection> conn);
    // One confirmation: reads rev (on `conn`), runs `changed` if it moved.
    Result<void> confirm(class FeedConnection& conn);

    const std::string conninfo_;
    const std::string where_;
    const std::chrono::milliseconds bound_;
    const std::function<void()> changed_;
    const std::function<void()> after_;
    const std::function<void(db::Connection&)> confirmed_fn_;
    std::atomic<std::int64_t> revision_{-1};
    // steady_clock nanoseconds of the last confirmation's start (0: none).
    std::atomic<std::int64_t> confirmed_{0};
    std::int64_t created_;  // steady_clock nanoseconds
    std::mutex mutex_;
    std::condition_variable stop_cv_;
    bool stop_ = false;
    std::thread thread_;
};

}  // namespace vaultfs::vault
