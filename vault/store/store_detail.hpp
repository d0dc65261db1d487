// The Store's own: column lists, row readers, the group-commit queue's
// entries and the member templates that the files of Store (store.cpp,
// store_reads.cpp, store_writes.cpp, store_transaction.cpp) share. Not part
// of the interface: only those files include it.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "vault/store/db.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault {

namespace store_detail {

#define VAULT_COLUMNS                                                                                              \
    "id, name, kek_id, retention_days, purge_protection, created, created_by, default_owner, default_group, "        \
    "default_mode, rekey_after_days, kek_created"
#define SECRET_COLUMNS \
    "id, vault_id, name, created, next_version, deleted_at, purge_at, owner, grp, mode, changed, created_by"
// A page of a vault's secrets with at least one version, by id after `after`
// (bound by bind_live_page).
#define LIVE_PAGE \
    " FROM secrets WHERE vault_id = ? AND deleted_at IS NULL AND id > ? AND next_version > 1 ORDER BY id LIMIT ?"

inline void bind_live_page(db::Query& q, VaultId vault, SecretId after, std::size_t limit)
{
    q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
}

inline VaultRow read_vault(const db::Query& q)
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

inline SecretRow read_secret(const db::Query& q)
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

inline VersionRow read_version(const db::Query& q)
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

inline VersionRow read_version_at(const db::Query& q, int c)
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

inline SecretVersion read_joined(const db::Query& q)
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
inline Result<void> bound_lock_waits(db::Connection& c, std::chrono::milliseconds bound)
{
    const std::string sql = "SET lock_timeout = " + std::to_string(std::max<long long>(50, bound.count() / 2));
    return c.exec(sql.c_str());
}

}  // namespace store_detail

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

}  // namespace vaultfs::vault
