#include "vault/store/store.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <tuple>

#include "vault/store/feed.hpp"
#include "vault/store/integrity_stamp.hpp"
#include "vault/store/postgresql.hpp"
#include "vault/store/schema.hpp"
#include "vault/store/sqlite.hpp"

namespace vaultfs::vault {

namespace {

#define VAULT_COLUMNS                                                                                              \
    "id, name, kek_id, retention_days, purge_protection, created, created_by, default_owner, default_group, "        \
    "default_mode, rekey_after_days, kek_created"
#define SECRET_COLUMNS \
    "id, vault_id, name, created, next_version, deleted_at, purge_at, owner, grp, mode, changed, created_by"
// A page of a vault's secrets with at least one version, by id after `after`
// (bound by bind_live_page).
#define LIVE_PAGE \
    " FROM secrets WHERE vault_id = ? AND deleted_at IS NULL AND id > ? AND next_version > 1 ORDER BY id LIMIT ?"

void bind_live_page(db::Query& q, VaultId vault, SecretId after, std::size_t limit)
{
    q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
}

VaultRow read_vault(const db::Query& q)
{
    return VaultRow{VaultId{q.int64(0)},
                    q.text(1),
                    q.text(2),
                    static_cast<int>(q.int64(3)),
                    q.int64(4) != 0,
                    q.int64(5),
                    static_cast<uid_t>(q.int64(6)),
                    Ownership{static_cast<uid_t>(q.int64(7)), static_cast<gid_t>(q.int64(8)),
                              static_cast<std::uint32_t>(q.int64(9))},
                    static_cast<int>(q.int64(10)),
                    q.int64(11) != 0 ? q.int64(11) : q.int64(5)};
}

// The number of SECRET_COLUMNS: joined queries select a version's after them.
constexpr int secret_column_count = 12;

SecretRow read_secret(const db::Query& q)
{
    SecretRow s{SecretId{q.int64(0)},      VaultId{q.int64(1)}, q.text(2), q.int64(3),
                static_cast<std::uint64_t>(q.int64(4)), q.optional_int64(5), q.optional_int64(6)};
    if (const auto o = q.optional_int64(7))
        s.owner = static_cast<uid_t>(*o);
    if (const auto g = q.optional_int64(8))
        s.group = static_cast<gid_t>(*g);
    if (const auto m = q.optional_int64(9))
        s.mode = static_cast<std::uint32_t>(*m);
    s.changed = q.int64(10);
    if (const auto by = q.optional_int64(11))
        s.created_by = static_cast<uid_t>(*by);
    return s;
}

#define VERSION_COLUMNS \
    "id, secret_id, version, size, created, updated, created_by, enabled, not_before, expires, content_type"

VersionRow read_version(const db::Query& q)
{
    return VersionRow{VersionId{q.int64(0)},
                      SecretId{q.int64(1)},
                      static_cast<std::uint64_t>(q.int64(2)),
                      static_cast<std::uint64_t>(q.int64(3)),
                      q.int64(4),
                      q.int64(5),
                      static_cast<uid_t>(q.int64(6)),
                      q.int64(7) != 0,
                      q.optional_int64(8),
                      q.optional_int64(9),
                      q.optional_text(10)};
}

// Secret columns then version columns, as the joined hot-path queries select them.
#define JOINED_COLUMNS                                                                                      \
    "s.id, s.vault_id, s.name, s.created, s.next_version, s.deleted_at, s.purge_at, s.owner, s.grp, s.mode, " \
    "s.changed, s.created_by, "                                                                            \
    "v.id, v.secret_id, v.version, v.size, v.created, v.updated, v.created_by, v.enabled, v.not_before, "     \
    "v.expires, v.content_type"

VersionRow read_version_at(const db::Query& q, int c)
{
    return VersionRow{VersionId{q.int64(c)},
                      SecretId{q.int64(c + 1)},
                      static_cast<std::uint64_t>(q.int64(c + 2)),
                      static_cast<std::uint64_t>(q.int64(c + 3)),
                      q.int64(c + 4),
                      q.int64(c + 5),
                      static_cast<uid_t>(q.int64(c + 6)),
                      q.int64(c + 7) != 0,
                      q.optional_int64(c + 8),
                      q.optional_int64(c + 9),
                      q.optional_text(c + 10)};
}

SecretVersion read_joined(const db::Query& q)
{
    SecretVersion out{read_secret(q), std::nullopt};
    if (!q.is_null(secret_column_count))
        out.version = read_version_at(q, secret_column_count);
    return out;
}

using db::collect;
using db::first;
using db::run;

// A lock another session holds is waited for half of what a request may
// wait (the staleness bound): the server then cancels the statement itself,
// before the request's deadline, and the session stays usable (the deadline
// would drop it, leaving a backend waiting on the lock until it is released).
Result<void> bound_lock_waits(db::Connection& c, std::chrono::milliseconds bound)
{
    const std::string sql = "SET lock_timeout = " + std::to_string(std::max<long long>(50, bound.count() / 2));
    return c.exec(sql.c_str());
}

}  // namespace

struct PendingWrite {
    const Store::Work* work;
    Result<void> result;
    bool done = false;
    std::optional<std::chrono::steady_clock::time_point> deadline;  // its request's (shared stores)
};

struct Store::Engine {
    std::string location;  // the file, or the full connection string
    bool postgresql = false;
};

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

template <class F>
auto Store::with_reader(F&& f, bool bounded) -> decltype(f(std::declval<db::Connection&>()))
{
    if (auto r = fresh(); !r)
        return tl::unexpected(r.error());
    // On a shared store no request waits on the database past the
    // staleness bound, whatever the server does (frozen, partitioned, a
    // lock held): every call of this read gives up at the deadline.
    const auto deadline = bounded ? request_deadline() : std::nullopt;
    std::unique_ptr<db::Connection> conn;
    {
        std::lock_guard lock(readers_mutex_);
        if (!idle_readers_.empty()) {
            conn = std::move(idle_readers_.back());
            idle_readers_.pop_back();
        }
    }
    if (!conn) {
        auto opened = connect(true, deadline);
        if (!opened)
            return tl::unexpected(opened.error());
        conn = std::move(*opened);
    }
    conn->set_deadline(deadline);
    auto result = f(*conn);
    const bool late = deadline && std::chrono::steady_clock::now() >= *deadline;
    if (!result && conn->broken() && !late) {
        // A lost session (a restarted server, a failover): once more, on a
        // new one, which libpq's multi-host string points at the primary.
        auto opened = connect(true, deadline);
        if (!opened)
            return result;
        conn = std::move(*opened);
        conn->set_deadline(deadline);
        result = f(*conn);
        if (conn->broken())
            return result;
    }
    if (conn->broken())
        return result;  // dropped at the deadline: never pooled again
    conn->set_deadline(std::nullopt);
    std::lock_guard lock(readers_mutex_);
    idle_readers_.push_back(std::move(conn));
    return result;
}

Result<void> Store::read(const std::function<Result<void>(db::Connection&)>& f)
{
    return with_reader([&](db::Connection& c) { return f(c); });
}

// ---- reads -------------------------------------------------------------------

Result<std::optional<VaultRow>> Store::vault_by_name(std::string_view name)
{
    return with_reader([&](db::Connection& c) {
        return first<VaultRow>(
            c,
            "SELECT " VAULT_COLUMNS " FROM vaults WHERE name = ?",
            [&](db::Query& q) { q.bind(1, name); }, read_vault);
    });
}

Result<std::optional<VaultRow>> Store::vault_by_id(VaultId id)
{
    return with_reader([&](db::Connection& c) {
        return first<VaultRow>(
            c, "SELECT " VAULT_COLUMNS " FROM vaults WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_vault);
    });
}

Result<std::vector<VaultRow>> Store::vaults()
{
    return with_reader([&](db::Connection& c) {
        return collect<VaultRow>(
            c, "SELECT " VAULT_COLUMNS " FROM vaults ORDER BY id",
            [](db::Query&) {}, read_vault);
    });
}

Result<std::optional<PolicyRow>> Store::policy(VaultId vault)
{
    return with_reader([&](db::Connection& c) {
        return first<PolicyRow>(
            c, "SELECT text, updated, updated_by FROM policies WHERE vault_id = ?",
            [&](db::Query& q) { q.bind(1, vault.value); },
            [](const db::Query& q) {
                return PolicyRow{q.text(0), q.int64(1), static_cast<uid_t>(q.int64(2))};
            });
    });
}

Result<std::optional<SecretRow>> Store::secret_by_name(VaultId vault, std::string_view name)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND name = ?",
            [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
    });
}

Result<std::optional<SecretRow>> Store::secret_by_id(SecretId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretRow>(
            c, "SELECT " SECRET_COLUMNS " FROM secrets WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_secret);
    });
}

Result<std::vector<SecretRow>> Store::live_secrets(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS LIVE_PAGE, [&](db::Query& q) { bind_live_page(q, vault, after, limit); },
            read_secret);
    });
}

Result<std::vector<SecretName>> Store::live_names(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretName>(
            c,
            "SELECT id, name" LIVE_PAGE, [&](db::Query& q) { bind_live_page(q, vault, after, limit); },
            [](const db::Query& q) { return SecretName{SecretId{q.int64(0)}, q.text(1)}; });
    });
}

Result<std::vector<SecretVersion>> Store::live_secrets_with_current(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s JOIN versions v ON v.id = (SELECT id FROM versions "
            "WHERE secret_id = s.id ORDER BY enabled DESC, version DESC LIMIT 1) "
            "WHERE s.vault_id = ? AND s.deleted_at IS NULL AND s.id > ? AND s.next_version > 1 ORDER BY s.id LIMIT ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_joined);
    });
}

Result<std::vector<SecretRow>> Store::deleted_secrets(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND deleted_at IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_secret);
    });
}

Result<std::vector<SecretRow>> Store::purge_due(Micros now, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE purge_at IS NOT NULL AND purge_at <= ? ORDER BY purge_at LIMIT ?",
            [&](db::Query& q) { q.bind(1, now).bind(2, static_cast<std::int64_t>(limit)); }, read_secret);
    });
}

Result<std::int64_t> Store::secret_count(VaultId vault)
{
    return with_reader([&](db::Connection& c) -> Result<std::int64_t> {
        auto n = first<std::int64_t>(
            c, "SELECT (SELECT count(*) FROM secrets WHERE vault_id = ?1 AND next_version > 1) + "
            "(SELECT count(*) FROM objects WHERE vault_id = ?1)",
            [&](db::Query& q) { q.bind(1, vault.value); }, [](const db::Query& q) { return q.int64(0); });
        if (!n)
            return tl::unexpected(n.error());
        return n->value_or(0);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version(VaultId vault, std::string_view name,
                                                               std::optional<std::uint64_t> number)
{
    if (!number) {
        const std::string key = std::to_string(vault.value) + "/" + std::string(name);
        return cached(by_name_, key, [&] { return secret_with_version_uncached(vault, name); });
    }
    return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s JOIN versions v ON v.secret_id = s.id "
            "WHERE s.vault_id = ? AND s.name = ? AND v.version = ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, name).bind(3, static_cast<std::int64_t>(*number));
            },
            read_joined);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_uncached(VaultId vault, std::string_view name)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s LEFT JOIN versions v ON v.secret_id = s.id "
            "WHERE s.vault_id = ? AND s.name = ? ORDER BY v.enabled DESC, v.version DESC LIMIT 1",
            [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_joined);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_current(SecretId id)
{
    return cached(by_id_, id.value, [&] {
        return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s LEFT JOIN versions v ON v.secret_id = s.id "
            "WHERE s.id = ? ORDER BY v.enabled DESC, v.version DESC LIMIT 1",
            [&](db::Query& q) { q.bind(1, id.value); }, read_joined);
        });
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_id(VersionId id)
{
    return cached(by_version_, id.value, [&] { return secret_with_version_id_uncached(id); });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_id_uncached(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c, "SELECT " JOINED_COLUMNS " FROM versions v JOIN secrets s ON s.id = v.secret_id WHERE v.id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_joined);
    });
}

Result<std::optional<SealedRead>> Store::sealed_for_read(VersionId id)
{
    if (auto r = fresh(); !r)
        return tl::unexpected(r.error());
    const std::uint64_t generation = generation_.load();
    {
        std::lock_guard lock(cache_mutex_);
        if (const auto it = sealed_.find(id.value); it != sealed_.end() && it->second.first == generation)
            return std::optional<SealedRead>(it->second.second);
    }
    auto read = sealed_for_read_uncached(id);
    if (!read || !*read)
        return read;
    const std::size_t bytes = (*read)->sealed.ciphertext.size() + (*read)->sealed.sealed_dek.size() + 256;
    std::lock_guard lock(cache_mutex_);
    if (sealed_bytes_ + bytes > sealed_limit) {
        sealed_.clear();
        sealed_bytes_ = 0;
    }
    if (sealed_.insert_or_assign(id.value, std::make_pair(generation, **read)).second)
        sealed_bytes_ += bytes;
    return read;
}

Result<std::optional<SealedRead>> Store::sealed_for_read_uncached(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SealedRead>(
            c,
            "SELECT " JOINED_COLUMNS ", v.kek_id, v.nonce, v.ciphertext, v.sealed_dek "
            "FROM versions v JOIN secrets s ON s.id = v.secret_id WHERE v.id = ?",
            [&](db::Query& q) { q.bind(1, id.value); },
            [](const db::Query& q) {
                constexpr int c = secret_column_count + 11;  // after the version's columns
                return SealedRead{read_secret(q), SealedVersion{read_version_at(q, secret_column_count), q.text(c),
                                                                q.blob(c + 1), q.blob(c + 2), q.blob(c + 3)}};
            });
    });
}

Result<std::optional<VersionRow>> Store::version(SecretId secret, std::uint64_t number)
{
    return with_reader([&](db::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? AND version = ?",
            [&](db::Query& q) { q.bind(1, secret.value).bind(2, static_cast<std::int64_t>(number)); },
            read_version);
    });
}

Result<std::vector<Change>> Store::changes_since(Micros since, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<Change>(
            c,
            "SELECT * FROM ("
            "SELECT s.id, 0, v.name, s.name, 0, s.changed FROM secrets s JOIN vaults v ON v.id = s.vault_id "
            "WHERE s.changed >= ?1 AND s.deleted_at IS NULL "
            "UNION ALL "
            "SELECT o.id, 1, v.name, o.name, ov.version, ov.created FROM object_versions ov "
            "JOIN objects o ON o.id = ov.object_id JOIN vaults v ON v.id = o.vault_id "
            "WHERE o.kind = ?2 AND ov.created >= ?1"
            ") AS c ORDER BY 6 LIMIT ?3",
            [&](db::Query& q) {
                q.bind(1, since)
                    .bind(2, static_cast<std::int64_t>(ObjectKind::certificate))
                    .bind(3, static_cast<std::int64_t>(limit));
            },
            [](const db::Query& q) {
                return Change{q.int64(0), q.int64(1) != 0, q.text(2), q.text(3),
                              static_cast<std::uint64_t>(q.int64(4)), q.int64(5)};
            });
    });
}

Result<std::vector<Expiring>> Store::expiring()
{
    auto rows = with_reader([&](db::Connection& c) {
        return collect<std::pair<Expiring, std::string>>(
            c,
            "SELECT 0, v.name, s.name, ver.version, ver.id, ver.expires, '' FROM secrets s "
            "JOIN vaults v ON v.id = s.vault_id JOIN versions ver ON ver.secret_id = s.id "
            "WHERE s.deleted_at IS NULL AND ver.expires IS NOT NULL AND ver.version = "
            "(SELECT MAX(x.version) FROM versions x WHERE x.secret_id = s.id AND x.enabled = 1) "
            "UNION ALL "
            // A certificate's expiry is its not_after, in the version's body.
            "SELECT o.kind, v.name, o.name, ov.version, ov.id, ov.expires, "
            "CASE WHEN o.kind = ?1 THEN ov.body ELSE '' END FROM objects o "
            "JOIN vaults v ON v.id = o.vault_id JOIN object_versions ov ON ov.object_id = o.id "
            "WHERE (ov.expires IS NOT NULL OR o.kind = ?1) AND ov.version = "
            "(SELECT MAX(y.version) FROM object_versions y WHERE y.object_id = o.id AND y.enabled = 1)",
            [](db::Query& q) { q.bind(1, static_cast<std::int64_t>(ObjectKind::certificate)); },
            [](const db::Query& q) {
                return std::pair{Expiring{static_cast<Expiring::Kind>(q.int64(0)), q.text(1), q.text(2),
                                          static_cast<std::uint64_t>(q.int64(3)), q.int64(4),
                                          q.is_null(5) ? 0 : q.int64(5)},
                                 q.text(6)};
            });
    });
    if (!rows)
        return tl::unexpected(rows.error());
    std::vector<Expiring> out;
    for (auto& [e, body] : *rows) {
        if (e.kind == Expiring::Kind::certificate && !body.empty()) {
            const auto j = nlohmann::json::parse(body, nullptr, false);
            if (j.is_object() && j.contains("not_after") && j["not_after"].is_number_integer()) {
                const Micros not_after = j["not_after"].get<Micros>();
                e.expires = e.expires == 0 ? not_after : std::min(e.expires, not_after);
            }
        }
        if (e.expires != 0)
            out.push_back(std::move(e));
    }
    std::sort(out.begin(), out.end(), [](const Expiring& a, const Expiring& b) {
        return std::tie(a.expires, a.vault, a.name) < std::tie(b.expires, b.vault, b.name);
    });
    return out;
}

Result<std::optional<VersionRow>> Store::version_by_id(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_version);
    });
}

Result<std::optional<VersionRow>> Store::current_version(SecretId secret)
{
    return with_reader([&](db::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? ORDER BY enabled DESC, version DESC LIMIT 1",
            [&](db::Query& q) { q.bind(1, secret.value); }, read_version);
    });
}

Result<std::vector<VersionRow>> Store::versions_of(SecretId secret)
{
    return with_reader([&](db::Connection& c) {
        return collect<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? ORDER BY version",
            [&](db::Query& q) { q.bind(1, secret.value); }, read_version);
    });
}

Result<std::vector<VersionEntry>> Store::versions_in_vault(VaultId vault, VersionId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<VersionEntry>(
            c,
            "SELECT v.id, s.name, v.version FROM versions v JOIN secrets s ON s.id = v.secret_id "
            "WHERE s.vault_id = ? AND s.deleted_at IS NULL AND v.id > ? ORDER BY v.id LIMIT ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            [](const db::Query& q) {
                return VersionEntry{VersionId{q.int64(0)}, q.text(1), static_cast<std::uint64_t>(q.int64(2))};
            });
    });
}

Result<std::optional<SealedVersion>> Store::sealed_version(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SealedVersion>(
            c, "SELECT " VERSION_COLUMNS ", kek_id, nonce, ciphertext, sealed_dek FROM versions WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); },
            [](const db::Query& q) {
                return SealedVersion{read_version(q), q.text(11), q.blob(12), q.blob(13), q.blob(14)};
            });
    });
}

Result<std::vector<Tag>> Store::tags(VersionId version)
{
    return with_reader([&](db::Connection& c) {
        return collect<Tag>(
            c, "SELECT name, value FROM tags WHERE version_id = ? ORDER BY name",
            [&](db::Query& q) { q.bind(1, version.value); },
            [](const db::Query& q) { return Tag{q.text(0), q.text(1)}; });
    });
}

Result<std::optional<std::string>> Store::setting(std::string_view key)
{
    return with_reader([&](db::Connection& c) {
        return first<std::string>(
            c, "SELECT value FROM settings WHERE host = ? AND key = ?",
            [&](db::Query& q) { q.bind(1, host_id_).bind(2, key); },
            [](const db::Query& q) { return q.text(0); });
    });
}

Result<std::vector<std::string>> Store::setting_on_all_hosts(std::string_view key)
{
    return with_reader([&](db::Connection& c) {
        return collect<std::string>(
            c, "SELECT value FROM settings WHERE key = ? ORDER BY host", [&](db::Query& q) { q.bind(1, key); },
            [](const db::Query& q) { return q.text(0); });
    });
}

Result<std::vector<std::pair<std::int64_t, std::string>>> Store::setting_by_host(std::string_view key)
{
    return with_reader([&](db::Connection& c) {
        return collect<std::pair<std::int64_t, std::string>>(
            c, "SELECT host, value FROM settings WHERE key = ? ORDER BY host", [&](db::Query& q) { q.bind(1, key); },
            [](const db::Query& q) { return std::pair<std::int64_t, std::string>{q.int64(0), q.text(1)}; });
    });
}

Result<std::optional<AuditAnchor>> Store::audit_anchor()
{
    return with_reader([&](db::Connection& c) {
        return first<AuditAnchor>(
            c, "SELECT seq, hash, clean_shutdown, time, file_start, sig FROM audit_anchor WHERE id = ?",
            [&](db::Query& q) { q.bind(1, host_id_); },
            [](const db::Query& q) {
                return AuditAnchor{static_cast<std::uint64_t>(q.int64(0)), q.text(1), q.int64(2) != 0, q.int64(3),
                                   static_cast<std::uint64_t>(q.int64(4)), q.blob(5)};
            });
    });
}

Result<void> Store::each_row(const std::string& sql, const std::function<Result<void>(const db::Query&)>& f)
{
    return with_reader(
        [&](db::Connection& c) -> Result<void> {
        auto q = c.query(sql);
        if (!q)
            return tl::unexpected(q.error());
        for (;;) {
            auto more = q->step();
            if (!more)
                return tl::unexpected(more.error());
            if (!*more)
                return {};
            if (auto r = f(*q); !r)
                return r;
        }
        },
        false);
}

Result<void> Store::integrity_check()
{
    if (shared_)
        return with_reader([&](db::Connection& c) { return schema::prepare_postgresql(c, path_, false, false); },
                           false);
    return with_reader([&](db::Connection& c) { return schema::check_sqlite(c, path_, true); }, false);
}

// ---- writes ------------------------------------------------------------------

Result<void> Store::write(const Work& work, bool bounded)
{
    if (read_only_)
        return fail(Errc::storage, "database " + path_ + " is open read-only");
    PendingWrite mine{&work, {}, false, bounded ? request_deadline() : std::nullopt};
    std::unique_lock lock(queue_mutex_);
    queue_.push_back(&mine);
    // Wait until a leader has run our work, or until we can lead.
    queue_cv_.wait(lock, [&] { return mine.done || !leader_active_; });
    if (mine.done)
        return mine.result;

    leader_active_ = true;
    std::deque<PendingWrite*> batch;
    batch.swap(queue_);
    lock.unlock();
    Result<void> committed;
    try {
        committed = run_batch(batch);
    } catch (const std::exception& e) {
        // Never leave the transaction open or the followers waiting.
        (void)writer_->exec("ROLLBACK");
        committed = fail(Errc::storage, std::string("write failed: ") + e.what());
    }
    lock.lock();
    for (auto* p : batch) {
        if (!committed)
            p->result = tl::unexpected(committed.error());
        p->done = true;
    }
    // Whatever committed (or did not), cached lookups may be stale now.
    generation_.fetch_add(1);
    leader_active_ = false;
    queue_cv_.notify_all();
    return mine.result;
}

std::size_t Store::pending_writes()
{
    std::lock_guard lock(queue_mutex_);
    return queue_.size();
}

template <class Map, class Key, class Load>
Result<std::optional<SecretVersion>> Store::cached(Map& map, const Key& key, Load&& load)
{
    if (auto r = fresh(); !r)
        return tl::unexpected(r.error());
    const std::uint64_t generation = generation_.load();
    {
        std::lock_guard lock(cache_mutex_);
        if (const auto it = map.find(key); it != map.end() && it->second.generation == generation)
            return it->second.value;
    }
    auto fresh = load();
    if (!fresh)
        return fresh;
    std::lock_guard lock(cache_mutex_);
    if (map.size() >= cache_limit)
        map.clear();
    // Stamped with the generation read before the query: a write that
    // committed meanwhile has already moved past it.
    map[key] = Cached{generation, *fresh};
    return fresh;
}

// Runs every unit of `batch` in one transaction; each unit's result is stored
// in it. Returns the commit's own outcome.
Result<void> Store::run_batch(std::deque<PendingWrite*>& batch)
{
    // The batch answers by its most pressed request's deadline (each
    // waited behind the batch before it, which ended by its own).
    std::optional<std::chrono::steady_clock::time_point> deadline;
    for (const auto* p : batch)
        if (p->deadline && (!deadline || *p->deadline < *deadline))
            deadline = p->deadline;
    if (deadline && std::chrono::steady_clock::now() >= *deadline)
        return fail(Errc::storage, "the database did not answer within the staleness bound (" +
                                       std::to_string(options_.staleness_bound.count()) +
                                       " ms) while this write waited behind another");
    if (writer_->broken()) {
        // Lost (a restarted server, a failover, a deadline): a new session,
        // on whichever host libpq's connection string now finds writable.
        auto c = connect(false, deadline);
        if (!c)
            return fail(c.error().code, "cannot start a write transaction: " + c.error().message);
        writer_ = std::move(*c);
    }
    db::Connection& c = *writer_;
    c.set_deadline(deadline);
    struct Unbound {
        db::Connection& c;
        ~Unbound() { c.set_deadline(std::nullopt); }
    } unbind{c};
    // Transaction control through cached statements: parsing these on every
    // commit showed up in profiles.
    const auto control = [&](const char* sql) -> Result<void> {
        auto q = c.query(sql);
        if (!q)
            return tl::unexpected(q.error());
        return q->run();
    };
    if (auto r = control(c.begin_write()); !r)
        return fail(r.error().code, "cannot start a write transaction: " + r.error().message);
    Transaction tx(c, host_id_, shared_);
    // A lone unit needs no savepoint: its failure rolls back the whole.
    const bool alone = batch.size() == 1;
    bool any_ok = false;
    for (auto* p : batch) {
        if (!alone) {
            if (auto r = control("SAVEPOINT unit"); !r) {
                p->result = tl::unexpected(r.error());
                continue;
            }
        }
        p->result = (*p->work)(tx);
        any_ok = any_ok || p->result.has_value();
        if (!alone) {
            if (!p->result)
                (void)control("ROLLBACK TO unit");
            (void)control("RELEASE unit");
        }
        // Some errors (SQLITE_FULL, IOERR, NOMEM; a lost PostgreSQL session)
        // end the whole transaction by themselves: nothing of this batch can
        // commit any more.
        if (!c.in_transaction())
            return fail(p->result ? Errc::storage : p->result.error().code,
                        "the write transaction was rolled back: " +
                            (p->result ? std::string("by the database") : p->result.error().message));
    }
    if (!any_ok) {
        (void)control("ROLLBACK");
        return {};  // every unit carries its own error
    }
    // The change feed (vault/store/feed.hpp): writers queue on feed's row
    // until COMMIT, so revisions commit in order.
    // On PostgreSQL the transaction's id comes along: should the server stop
    // answering at COMMIT, it is how the outcome is looked up later.
    std::int64_t xid = 0;
    auto rev = shared_ ? first<std::int64_t>(
                             c, "UPDATE feed SET rev = rev + 1 WHERE id = 1 RETURNING rev, txid_current()",
                             [](db::Query&) {},
                             [&](const db::Query& q) {
                                 xid = q.int64(1);
                                 return q.int64(0);
                             })
                             .and_then([](std::optional<std::int64_t> r) -> Result<std::int64_t> {
                                 if (!r)
                                     return fail(Errc::storage, "the feed row is missing");
                                 return *r;
                             })
                       : db::integer(c, "UPDATE feed SET rev = rev + 1 WHERE id = 1 RETURNING rev", [](db::Query&) {});
    Result<void> logged = rev ? run(c, "INSERT INTO changes (rev, host, at) VALUES (?, ?, ?)",
                                    [&](db::Query& q) { q.bind(1, *rev).bind(2, host_id_).bind(3, now_micros()); })
                              : Result<void>(tl::unexpected(rev.error()));
    if (logged && *rev % 1000 == 0)
        logged = run(c, "DELETE FROM changes WHERE rev <= ?", [&](db::Query& q) { q.bind(1, *rev - 1000); });
    if (logged && shared_)
        logged = run(c, "SELECT pg_notify('vaultfs_changes', ?)",
                     [&](db::Query& q) { q.bind(1, std::to_string(*rev)); });
    if (!logged) {
        (void)control("ROLLBACK");
        return fail(logged.error().code, "the change feed cannot be written: " + logged.error().message);
    }
    if (auto r = control("COMMIT"); !r) {
        if (shared_ && c.broken() && xid != 0) {
            // The server stopped answering (or the session broke) after
            // COMMIT was sent: it may have committed. Never a second try
            // (that would be a duplicate); the outcome is looked up when
            // the server answers again, and reported.
            std::string why = "the database did not confirm the commit of transaction " + std::to_string(xid) +
                              " (" + r.error().message + "): it may have committed; its outcome is looked up and "
                              "audited when the database answers";
            std::lock_guard lock(in_doubt_mutex_);
            in_doubt_.push_back(InDoubt{xid, why});
            spdlog::error("{}", why);
            return fail(Errc::in_doubt, std::move(why));
        }
        (void)control("ROLLBACK");
        return fail(r.error().code, "commit failed: " + r.error().message);
    }
    return {};
}

void Store::on_in_doubt_resolved(InDoubtResolved f)
{
    // Also waits for a report under way: none runs after it is replaced.
    std::lock_guard report(in_doubt_report_mutex_);
    on_in_doubt_resolved_ = std::move(f);
}

std::size_t Store::in_doubt() const
{
    std::lock_guard lock(in_doubt_mutex_);
    return in_doubt_.size();
}

void Store::resolve_in_doubt(db::Connection& c)
{
    std::vector<InDoubt> pending;
    {
        std::lock_guard lock(in_doubt_mutex_);
        if (in_doubt_.empty())
            return;
        pending = in_doubt_;
    }
    for (const auto& d : pending) {
        // 'committed', 'aborted', or 'in progress' (the server resumed and
        // is finishing it: asked again at the next confirmation).
        auto status = first<std::string>(
            c, "SELECT txid_status(?)", [&](db::Query& q) { q.bind(1, d.xid); },
            [](const db::Query& q) { return q.is_null(0) ? std::string() : q.text(0); });
        if (!status)
            return;  // asked again at the next confirmation
        const std::string s = status->value_or("");
        if (s == "in progress")
            continue;
        const bool committed = s == "committed";
        const std::string outcome = committed ? "committed" : s == "aborted" ? "rolled back" : "unknown";
        spdlog::warn("the commit of transaction {}, in doubt until now: {}", d.xid, outcome);
        {
            std::lock_guard lock(in_doubt_mutex_);
            std::erase_if(in_doubt_, [&](const InDoubt& x) { return x.xid == d.xid; });
        }
        if (committed)
            generation_.fetch_add(1);
        std::lock_guard report(in_doubt_report_mutex_);
        if (on_in_doubt_resolved_)
            on_in_doubt_resolved_(d.xid, outcome, d.failed_with);
    }
}

Result<VaultId> Store::Transaction::insert_vault(const VaultRow& row, const PolicyRow& policy)
{
    auto r = db::integer(conn_,
                 "INSERT INTO vaults (name, kek_id, retention_days, purge_protection, created, created_by, "
                 "default_owner, default_group, default_mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, row.name)
                         .bind(2, row.kek_id)
                         .bind(3, static_cast<std::int64_t>(row.retention_days))
                         .bind(4, static_cast<std::int64_t>(row.purge_protection))
                         .bind(5, row.created)
                         .bind(6, static_cast<std::int64_t>(row.created_by))
                         .bind(7, static_cast<std::int64_t>(row.defaults.owner))
                         .bind(8, static_cast<std::int64_t>(row.defaults.group))
                         .bind(9, static_cast<std::int64_t>(row.defaults.mode));
                 });
    if (!r)
        return tl::unexpected(r.error());
    const VaultId id{*r};
    if (auto p = set_policy(id, policy); !p)
        return tl::unexpected(p.error());
    return id;
}

Result<void> Store::Transaction::delete_vault(VaultId vault)
{
    if (auto r = remove_empty_secrets(vault); !r)
        return r;
    return run(conn_, "DELETE FROM vaults WHERE id = ?", [&](db::Query& q) { q.bind(1, vault.value); });
}

Result<void> Store::Transaction::update_vault_settings(VaultId vault, int retention_days, bool purge_protection)
{
    return run(conn_, "UPDATE vaults SET retention_days = ?, purge_protection = ? WHERE id = ?",
               [&](db::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(retention_days))
                       .bind(2, static_cast<std::int64_t>(purge_protection))
                       .bind(3, vault.value);
               });
}

Result<void> Store::Transaction::set_rekey_after(VaultId vault, int days)
{
    return run(conn_, "UPDATE vaults SET rekey_after_days = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, static_cast<std::int64_t>(days)).bind(2, vault.value); });
}

Result<std::string> Store::Transaction::vault_kek(VaultId vault, bool exclusive)
{
    const char* sql = !postgresql_ ? "SELECT kek_id FROM vaults WHERE id = ?"
                      : exclusive  ? "SELECT kek_id FROM vaults WHERE id = ? FOR UPDATE"
                                   : "SELECT kek_id FROM vaults WHERE id = ? FOR SHARE";
    auto kek = first<std::string>(
        conn_, sql, [&](db::Query& q) { q.bind(1, vault.value); }, [](const db::Query& q) { return q.text(0); });
    if (!kek)
        return tl::unexpected(kek.error());
    if (!*kek)
        return fail(Errc::not_found, "the vault was removed");
    return **kek;
}

Result<void> Store::Transaction::set_vault_kek(VaultId vault, std::string_view kek_id, Micros created)
{
    return run(conn_, "UPDATE vaults SET kek_id = ?, kek_created = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, kek_id).bind(2, created).bind(3, vault.value); });
}

Result<void> Store::Transaction::set_vault_defaults(VaultId vault, const Ownership& d)
{
    return run(conn_, "UPDATE vaults SET default_owner = ?, default_group = ?, default_mode = ? WHERE id = ?",
               [&](db::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(d.owner))
                       .bind(2, static_cast<std::int64_t>(d.group))
                       .bind(3, static_cast<std::int64_t>(d.mode))
                       .bind(4, vault.value);
               });
}

Result<void> Store::Transaction::set_ownership(SecretId secret, std::optional<uid_t> owner, std::optional<gid_t> group,
                                               std::optional<std::uint32_t> mode)
{
    const auto wide = [](auto v) {
        return v ? std::optional<std::int64_t>(static_cast<std::int64_t>(*v)) : std::nullopt;
    };
    return run(conn_, "UPDATE secrets SET owner = ?, grp = ?, mode = ? WHERE id = ?", [&](db::Query& q) {
        q.bind(1, wide(owner)).bind(2, wide(group)).bind(3, wide(mode)).bind(4, secret.value);
    });
}

Result<void> Store::Transaction::set_policy(VaultId vault, const PolicyRow& policy)
{
    return run(conn_,
               "INSERT INTO policies (vault_id, text, updated, updated_by) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (vault_id) DO UPDATE SET text = excluded.text, updated = excluded.updated, "
               "updated_by = excluded.updated_by",
               [&](db::Query& q) {
                   q.bind(1, vault.value)
                       .bind(2, policy.text)
                       .bind(3, policy.updated)
                       .bind(4, static_cast<std::int64_t>(policy.updated_by));
               });
}

Result<std::optional<SecretRow>> Store::Transaction::secret(SecretId id)
{
    return first<SecretRow>(
        conn_, "SELECT " SECRET_COLUMNS " FROM secrets WHERE id = ?",
        [&](db::Query& q) { q.bind(1, id.value); }, read_secret);
}

Result<std::optional<SecretRow>> Store::Transaction::secret_by_name(VaultId vault, std::string_view name)
{
    return first<SecretRow>(
        conn_,
        "SELECT " SECRET_COLUMNS " FROM secrets "
        "WHERE vault_id = ? AND name = ?",
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
}

Result<std::optional<VersionRow>> Store::Transaction::version_by_id(VersionId id)
{
    return first<VersionRow>(
        conn_, "SELECT " VERSION_COLUMNS " FROM versions WHERE id = ?", [&](db::Query& q) { q.bind(1, id.value); },
        read_version);
}

Result<std::optional<VersionRow>> Store::Transaction::version(SecretId secret, std::uint64_t number)
{
    return first<VersionRow>(
        conn_, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? AND version = ?",
        [&](db::Query& q) { q.bind(1, secret.value).bind(2, static_cast<std::int64_t>(number)); }, read_version);
}

Result<std::vector<Tag>> Store::Transaction::tags(VersionId version)
{
    return collect<Tag>(
        conn_, "SELECT name, value FROM tags WHERE version_id = ? ORDER BY name",
        [&](db::Query& q) { q.bind(1, version.value); },
        [](const db::Query& q) { return Tag{q.text(0), q.text(1)}; });
}

Result<SecretRow> Store::Transaction::ensure_secret(VaultId vault, std::string_view name, Micros now, uid_t by)
{
    // A certificate owns its name among secrets too (store.hpp, ObjectKind).
    auto certificate = first<std::int64_t>(
        conn_,
        "SELECT 1 FROM objects o WHERE o.vault_id = ?1 AND o.name = ?2 AND o.kind = 2 "
        "AND NOT EXISTS (SELECT 1 FROM secrets s WHERE s.vault_id = ?1 AND s.name = ?2)",
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); },
        [](const db::Query& q) { return q.int64(0); });
    if (!certificate)
        return tl::unexpected(certificate.error());
    if (*certificate)
        return fail(Errc::already_exists, "a certificate in this vault is named " + std::string(name));
    auto r = run(conn_,
                 "INSERT INTO secrets (vault_id, name, created, created_by) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 [&](db::Query& q) {
                     q.bind(1, vault.value).bind(2, name).bind(3, now).bind(4, static_cast<std::int64_t>(by));
                 });
    if (!r)
        return tl::unexpected(r.error());
    auto row = first<SecretRow>(
        conn_,
        "SELECT " SECRET_COLUMNS " FROM secrets "
        "WHERE vault_id = ? AND name = ?",
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row)
        return fail(Errc::storage, "secret row vanished inside its transaction");
    return std::move(**row);
}

Result<std::uint64_t> Store::Transaction::allocate_version(SecretId secret)
{
    auto n = first<std::int64_t>(
        conn_, "UPDATE secrets SET next_version = next_version + 1 WHERE id = ? RETURNING next_version - 1",
        [&](db::Query& q) { q.bind(1, secret.value); }, [](const db::Query& q) { return q.int64(0); });
    if (!n)
        return tl::unexpected(n.error());
    if (!*n)
        return fail(Errc::not_found, "the secret was removed");
    return static_cast<std::uint64_t>(**n);
}

Result<void> Store::Transaction::require_vault_kek(bool object, std::int64_t owner, std::string_view kek)
{
    // Locks the vault's row on PostgreSQL (FOR SHARE): a rekey, which holds
    // it FOR UPDATE while it re-seals, then waits for this row to commit and
    // re-seals it too -- or this waits for the rekey, and sees its KEK.
    const char* sql = object ? (postgresql_ ? "SELECT v.kek_id FROM vaults v JOIN objects o ON o.vault_id = v.id "
                                              "WHERE o.id = ? FOR SHARE OF v"
                                            : "SELECT v.kek_id FROM vaults v JOIN objects o ON o.vault_id = v.id "
                                              "WHERE o.id = ?")
                             : (postgresql_ ? "SELECT v.kek_id FROM vaults v JOIN secrets s ON s.vault_id = v.id "
                                              "WHERE s.id = ? FOR SHARE OF v"
                                            : "SELECT v.kek_id FROM vaults v JOIN secrets s ON s.vault_id = v.id "
                                              "WHERE s.id = ?");
    auto current = first<std::string>(
        conn_, sql, [&](db::Query& q) { q.bind(1, owner); }, [](const db::Query& q) { return q.text(0); });
    if (!current)
        return tl::unexpected(current.error());
    if (!*current)
        return fail(Errc::not_found, "the vault was removed");
    if (**current != kek)
        return fail(Errc::busy, "the vault got a new KEK (vault rekey) while this was sealed; do it again");
    return {};
}

Result<VersionId> Store::Transaction::insert_version(const SealedVersion& v)
{
    if (auto k = require_vault_kek(false, v.meta.secret.value, v.kek_id); !k)
        return tl::unexpected(k.error());
    auto r = db::integer(conn_,
                 "INSERT INTO versions (secret_id, version, kek_id, nonce, ciphertext, sealed_dek, size, created, "
                 "created_by, updated, enabled, not_before, expires, content_type) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, v.meta.secret.value)
                         .bind(2, static_cast<std::int64_t>(v.meta.number))
                         .bind(3, v.kek_id)
                         .bind_blob(4, v.nonce)
                         .bind_blob(5, v.ciphertext)
                         .bind_blob(6, v.sealed_dek)
                         .bind(7, static_cast<std::int64_t>(v.meta.size))
                         .bind(8, v.meta.created)
                         .bind(9, static_cast<std::int64_t>(v.meta.created_by))
                         .bind(10, v.meta.updated)
                         .bind(11, static_cast<std::int64_t>(v.meta.enabled))
                         .bind(12, v.meta.not_before)
                         .bind(13, v.meta.expires)
                         .bind(14, v.meta.content_type);
                 });
    if (!r)
        return tl::unexpected(r.error());
    // An enabled new version is what S serves from now on.
    if (v.meta.enabled)
        if (auto c = mark_changed(v.meta.secret, v.meta.created); !c)
            return tl::unexpected(c.error());
    return VersionId{*r};
}

Result<Store::Transaction::Served> Store::Transaction::served(SecretId secret, Micros at)
{
    // The version S stands for: the highest enabled one, else the highest.
    auto row = first<Served>(
        conn_,
        "SELECT id, enabled, not_before, expires FROM versions WHERE secret_id = ? "
        "ORDER BY enabled DESC, version DESC LIMIT 1",
        [&](db::Query& q) { q.bind(1, secret.value); },
        [at](const db::Query& q) {
            const auto nb = q.optional_int64(2);
            const auto exp = q.optional_int64(3);
            return Served{q.int64(0), q.int64(1) != 0 && !(nb && at < *nb) && !(exp && at >= *exp)};
        });
    if (!row)
        return tl::unexpected(row.error());
    return row->value_or(Served{});
}

Result<void> Store::Transaction::mark_changed(SecretId secret, Micros at)
{
    return run(conn_, "UPDATE secrets SET changed = ? WHERE id = ? AND changed < ?",
               [&](db::Query& q) { q.bind(1, at).bind(2, secret.value).bind(3, at); });
}

Result<void> Store::Transaction::update_version(const VersionRow& v)
{
    auto before = served(v.secret, v.updated);
    if (!before)
        return tl::unexpected(before.error());
    if (auto r = run(conn_,
                     "UPDATE versions SET updated = ?, enabled = ?, not_before = ?, expires = ?, content_type = ? "
                     "WHERE id = ?",
                     [&](db::Query& q) {
                         q.bind(1, v.updated)
                             .bind(2, static_cast<std::int64_t>(v.enabled))
                             .bind(3, v.not_before)
                             .bind(4, v.expires)
                             .bind(5, v.content_type)
                             .bind(6, v.id.value);
                     });
        !r)
        return r;
    // What S serves changed (another version, or readable no more or again):
    // its mtime moves on (a tag or content type change does not move it).
    auto after = served(v.secret, v.updated);
    if (!after)
        return tl::unexpected(after.error());
    if (*after != *before)
        return mark_changed(v.secret, v.updated);
    return {};
}

Result<void> Store::Transaction::replace_tags(VersionId version, const std::vector<Tag>& tags)
{
    if (auto r = run(conn_, "DELETE FROM tags WHERE version_id = ?", [&](db::Query& q) { q.bind(1, version.value); });
        !r)
        return r;
    for (const auto& t : tags) {
        if (auto r = run(conn_, "INSERT INTO tags (version_id, name, value) VALUES (?, ?, ?)",
                         [&](db::Query& q) { q.bind(1, version.value).bind(2, t.name).bind(3, t.value); });
            !r)
            return r;
    }
    return {};
}

Result<void> Store::Transaction::set_deleted(SecretId secret, std::optional<Micros> deleted_at,
                                             std::optional<Micros> purge_at)
{
    return run(conn_, "UPDATE secrets SET deleted_at = ?, purge_at = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, deleted_at).bind(2, purge_at).bind(3, secret.value); });
}

Result<void> Store::Transaction::purge_secret(SecretId secret)
{
    // Tags and versions go by ON DELETE CASCADE; secure_delete zeroes the pages.
    return run(conn_, "DELETE FROM secrets WHERE id = ?", [&](db::Query& q) { q.bind(1, secret.value); });
}

Result<std::int64_t> Store::Transaction::secret_count(VaultId vault)
{
    auto n = first<std::int64_t>(
        conn_, "SELECT (SELECT count(*) FROM secrets WHERE vault_id = ?1 AND next_version > 1) + "
            "(SELECT count(*) FROM objects WHERE vault_id = ?1)",
        [&](db::Query& q) { q.bind(1, vault.value); }, [](const db::Query& q) { return q.int64(0); });
    if (!n)
        return tl::unexpected(n.error());
    return n->value_or(0);
}

Result<void> Store::Transaction::remove_empty_secrets(VaultId vault)
{
    return run(conn_, "DELETE FROM secrets WHERE vault_id = ? AND next_version = 1",
               [&](db::Query& q) { q.bind(1, vault.value); });
}

Result<SecretId> Store::Transaction::insert_secret(VaultId vault, std::string_view name, Micros created,
                                                   std::uint64_t next_version)
{
    auto r = db::integer(conn_, "INSERT INTO secrets (vault_id, name, created, next_version) VALUES (?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, vault.value).bind(2, name).bind(3, created).bind(4,
                                                                              static_cast<std::int64_t>(next_version));
                 });
    if (!r)
        return tl::unexpected(r.error());
    return SecretId{*r};
}

Result<void> Store::Transaction::set_setting(std::string_view key, std::string_view value)
{
    return run(conn_,
               "INSERT INTO settings (host, key, value) VALUES (?, ?, ?) "
               "ON CONFLICT (host, key) DO UPDATE SET value = excluded.value",
               [&](db::Query& q) { q.bind(1, host_).bind(2, key).bind(3, value); });
}

Result<void> Store::Transaction::set_audit_anchor(const AuditAnchor& a)
{
    return run(conn_,
               "INSERT INTO audit_anchor (id, seq, hash, clean_shutdown, time, file_start, sig) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, "
               "hash = excluded.hash, clean_shutdown = excluded.clean_shutdown, time = excluded.time, "
               "file_start = excluded.file_start, sig = excluded.sig",
               [&](db::Query& q) {
                   q.bind(1, host_)
                       .bind(2, static_cast<std::int64_t>(a.seq))
                       .bind(3, a.hash)
                       .bind(4, static_cast<std::int64_t>(a.clean_shutdown))
                       .bind(5, a.time)
                       .bind(6, static_cast<std::int64_t>(a.file_start))
                       .bind_blob(7, a.sig);
               });
}

}  // namespace vaultfs::vault
