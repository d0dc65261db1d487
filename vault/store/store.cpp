#include "vault/store/store.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "vault/store/feed.hpp"
#include "vault/store/integrity_stamp.hpp"
#include "vault/store/postgresql.hpp"
#include "vault/store/schema.hpp"
#include "vault/store/sqlite.hpp"
#include "vault/store/store_detail.hpp"

namespace vaultfs::vault {

using namespace store_detail;

Store::Store(std::string path, std::unique_ptr<Engine> engine, std::unique_ptr<db::Connection> writer, bool read_only,
             StoreOptions options)
    : path_(std::move(path)),
      read_only_(read_only),
      options_(std::move(options)),
      engine_(std::move(engine)),
      shared_(engine_->postgresql),
      host_(options_.host),
      writer_(std::move(writer))
{
}

Store::~Store()
{
    feed_.reset();  // its thread calls into this store
    if (!stamp_at_close_)
        return;
    // The file is stamped only as it passes quick_check now (a run that met
    // a damaged page leaves no stamp), and once every connection is closed
    // (SQLite has checkpointed and removed the log).
    {
        std::lock_guard lock(readers_mutex_);
        idle_readers_.clear();
    }
    auto sound = writer_ && !writer_->broken() ? schema::check_sqlite(*writer_, path_, false)
                                               : fail(Errc::storage, "the connection is broken");
    writer_.reset();
    if (sound)
        integrity_stamp::record(path_);
    else
        spdlog::warn("database {} was not found sound at close ({}); the next start checks every page",
                     path_, sound.error().message);
}

std::optional<std::chrono::steady_clock::time_point> Store::request_deadline() const
{
    if (!shared_)
        return std::nullopt;
    return std::chrono::steady_clock::now() + options_.staleness_bound;
}

Result<std::unique_ptr<db::Connection>> Store::connect(bool read_only,
                                                       std::optional<std::chrono::steady_clock::time_point> deadline)
{
    if (engine_->postgresql) {
        auto c = pg::Connection::open(engine_->location, deadline);
        if (!c)
            return tl::unexpected(c.error());
        (*c)->set_deadline(deadline);
        if (auto r = bound_lock_waits(**c, options_.staleness_bound); !r)
            return tl::unexpected(r.error());
        (*c)->set_deadline(std::nullopt);
        return std::unique_ptr<db::Connection>(std::move(*c));
    }
    auto c = sqlite::Connection::open(engine_->location, read_only, false);
    if (!c)
        return tl::unexpected(c.error());
    return std::unique_ptr<db::Connection>(std::move(*c));
}

Result<std::unique_ptr<Store>> Store::open(const std::string& location, Mode mode, const StoreOptions& options)
{
    const bool read_only = mode == Mode::read_only;
    auto engine = std::make_unique<Engine>(Engine{location, pg::is_conninfo(location)});
    std::unique_ptr<Store> store;
    if (engine->postgresql) {
        const std::string where = pg::redact(location);
        auto conn = pg::Connection::open(location);
        if (!conn)
            return fail(Errc::storage, conn.error().message + "; check that the server runs and the connection string");
        if (auto r = schema::prepare_postgresql(**conn, where, mode == Mode::create,
                                                options.migrate && mode != Mode::read_only);
            !r)
            return tl::unexpected(r.error());
        if (auto r = bound_lock_waits(**conn, options.staleness_bound); !r)
            return tl::unexpected(r.error());
        store.reset(new Store(where, std::move(engine), std::move(*conn), read_only, options));
        if (auto r = store->refresh_host(); !r)
            return tl::unexpected(r.error());
        if (options.follow) {
            Store* self = store.get();
            store->feed_ = std::make_unique<Feed>(
                location, where, options.staleness_bound, [self] { self->changed(); },
                [self] {
                    std::lock_guard lock(self->change_mutex_);
                    if (self->on_change_)
                        self->on_change_();
                },
                [self](db::Connection& c) { self->resolve_in_doubt(c); });
            if (auto r = store->feed_->start(); !r)
                return fail(Errc::storage, "cannot follow the change feed of " + where + ": " + r.error().message);
        }
        return store;
    }

    const std::string& path = location;
    struct stat st{};
    const bool exists = ::stat(path.c_str(), &st) == 0;
    if (mode == Mode::create && exists)
        return fail(Errc::already_exists, "database " + path + " already exists");
    if (mode != Mode::create && !exists)
        return fail(Errc::not_found, "database " + path + " does not exist; run `vaultfs init` or fix the path");
    // The whole file is read (quick_check) unless it is, byte for byte, the
    // one a clean close left after it had been checked (integrity_stamp.hpp).
    const bool stamped = mode != Mode::create && integrity_stamp::unchanged(path);
    auto conn = sqlite::Connection::open(path, read_only, mode == Mode::create);
    if (!conn)
        return fail(Errc::storage, conn.error().message + "; check the file and its permissions");
    if (!read_only) {
        if (auto r = (*conn)->exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"); !r)
            return fail(Errc::storage, "database " + path + " is not usable (" + r.error().message +
                                           "); restore it from a backup");
    }
    if (auto r = schema::prepare_sqlite(**conn, path, mode == Mode::create, read_only, !stamped, options.migrate); !r)
        return tl::unexpected(r.error());
    if (!read_only) {
        ::chmod(path.c_str(), 0600);
        integrity_stamp::clear(path);  // until this store's clean close
    }
    store.reset(new Store(path, std::move(engine), std::move(*conn), read_only, options));
    store->stamp_at_close_ = !read_only;
    store->pages_read_at_open_ = !stamped;
    store->host_id_ = 1;
    return store;
}

Result<void> Store::refresh_host()
{
    if (!shared_) {
        host_id_ = 1;
        return {};
    }
    if (host_.empty()) {
        host_id_ = 1;
        return {};
    }
    auto row = host_by_name(host_);
    if (!row)
        return tl::unexpected(row.error());
    host_id_ = *row ? (*row)->id : 0;
    return {};
}

bool Store::background_leader()
{
    if (!shared_)
        return true;
    std::lock_guard lock(leader_mutex_);
    if (leader_ && !leader_->broken())
        return true;  // the lock is the session's: held while it lives
    leader_.reset();
    // Another host leads: ask again every few seconds, not on every round.
    const auto now = std::chrono::steady_clock::now();
    if (now < next_leader_try_)
        return false;
    next_leader_try_ = now + std::chrono::seconds(5);
    // Within the bound, as a request: a frozen server must not hold the
    // background rounds (or the daemon's stop, which waits for them).
    const auto deadline = request_deadline();
    auto c = connect(false, deadline);
    if (!c)
        return false;
    (*c)->set_deadline(deadline);
    auto got = db::integer(**c, "SELECT CASE WHEN pg_try_advisory_lock(7261537) THEN 1 ELSE 0 END",
                           [](db::Query&) {});
    if (!got || *got != 1)
        return false;
    (*c)->set_deadline(std::nullopt);
    leader_ = std::move(*c);
    return true;
}

std::int64_t Store::revision() const { return feed_ ? feed_->revision() : 0; }

Result<void> Store::fresh() const
{
    if (!feed_)
        return {};
    return feed_->fresh();
}

std::optional<std::chrono::milliseconds> Store::feed_age() const
{
    if (!feed_)
        return std::nullopt;
    return feed_->age();
}

void Store::on_change(std::function<void()> f)
{
    std::lock_guard lock(change_mutex_);
    on_change_ = std::move(f);
}

void Store::changed() { generation_.fetch_add(1); }

Result<void> Store::read(const std::function<Result<void>(db::Connection&)>& f)
{
    return with_reader([&](db::Connection& c) { return f(c); });
}

}  // namespace vaultfs::vault
