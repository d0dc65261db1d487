#include "vault/store/feed.hpp"

#include <spdlog/spdlog.h>

#include "vault/store/postgresql.hpp"

namespace vaultfs::vault {

namespace {

std::int64_t now_ns()
{
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

}  // namespace

// The listener's session: LISTENs as soon as it is opened.
class FeedConnection {
public:
    static Result<FeedConnection> open(const std::string& conninfo, std::chrono::milliseconds bound)
    {
        const auto deadline = std::chrono::steady_clock::now() + bound;
        auto c = pg::Connection::open(conninfo, deadline);
        if (!c)
            return tl::unexpected(c.error());
        (*c)->set_deadline(deadline);
        if (auto r = (*c)->exec("LISTEN vaultfs_changes"); !r)
            return tl::unexpected(r.error());
        return FeedConnection{std::move(*c)};
    }
    pg::Connection& get() { return *conn; }
    std::unique_ptr<pg::Connection> conn;
};

Feed::Feed(std::string conninfo, std::string where, std::chrono::milliseconds bound, std::function<void()> changed,
           std::function<void()> after, std::function<void(db::Connection&)> confirmed)
    : conninfo_(std::move(conninfo)),
      where_(std::move(where)),
      bound_(bound),
      changed_(std::move(changed)),
      after_(std::move(after)),
      confirmed_fn_(std::move(confirmed)),
      created_(now_ns())
{
}

Feed::~Feed()
{
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    stop_cv_.notify_all();
    if (thread_.joinable())
        thread_.join();
}

Result<void> Feed::confirm(FeedConnection& conn)
{
    const std::int64_t sent = now_ns();
    conn.get().set_deadline(std::chrono::steady_clock::now() + bound_);
    auto rev = db::integer(conn.get(), "SELECT rev FROM feed WHERE id = 1", [](db::Query&) {});
    if (!rev)
        return tl::unexpected(rev.error());
    const std::int64_t before = revision_.exchange(*rev);
    const bool moved = before >= 0 && *rev != before;
    if (moved)
        changed_();
    confirmed_.store(sent);
    if (moved && after_)
        after_();
    if (confirmed_fn_)
        confirmed_fn_(conn.get());
    conn.get().set_deadline(std::nullopt);  // waiting for notifications has its own timeout
    return {};
}

Result<void> Feed::start()
{
    auto conn = FeedConnection::open(conninfo_, bound_);
    if (!conn)
        return tl::unexpected(conn.error());
    if (auto r = confirm(*conn); !r)
        return r;
    thread_ = std::thread(
        [this, c = std::make_unique<FeedConnection>(std::move(*conn))]() mutable { run(std::move(c)); });
    return {};
}

void Feed::run(std::unique_ptr<FeedConnection> conn)
{
    const auto interval = std::max(std::chrono::milliseconds(20), bound_ / 4);
    bool reported = false;
    for (;;) {
        {
            std::lock_guard lock(mutex_);
            if (stop_)
                return;
        }
        if (!conn) {
            auto opened = FeedConnection::open(conninfo_, bound_);
            if (!opened) {
                if (!reported)
                    spdlog::error("change feed: {}; reads fail closed after {} ms without a confirmation, "
                                  "retrying every 200 ms",
                                  opened.error().message, bound_.count());
                reported = true;
                std::unique_lock lock(mutex_);
                stop_cv_.wait_for(lock, std::chrono::milliseconds(200), [&] { return stop_; });
                continue;
            }
            conn = std::make_unique<FeedConnection>(std::move(*opened));
        }
        if (auto r = confirm(*conn); !r) {
            if (!reported)
                spdlog::error("change feed: {}", r.error().message);
            reported = true;
            conn.reset();
            continue;
        }
        if (reported)
            spdlog::info("change feed: following {} again at revision {}", where_, revision_.load());
        reported = false;
        auto woke = conn->get().wait_notification(interval);
        if (!woke)
            conn.reset();
    }
}

std::chrono::milliseconds Feed::age() const
{
    const std::int64_t at = confirmed_.load();
    return std::chrono::milliseconds((now_ns() - (at == 0 ? created_ : at)) / 1000000);
}

Result<void> Feed::fresh() const
{
    const std::int64_t at = confirmed_.load();
    const std::int64_t age = now_ns() - at;
    if (at == 0 || age > std::chrono::duration_cast<std::chrono::nanoseconds>(bound_).count())
        return fail(Errc::not_fresh, "not confirmed fresh for " + std::to_string(age / 1000000) +
                                         " ms (staleness bound " + std::to_string(bound_.count()) + " ms): " +
                                         where_ + " unreachable or its change feed stuck");
    return {};
}

}  // namespace vaultfs::vault
