#include "vault/store.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include "vault/sqlite.hpp"

namespace vaultfs::vault {

namespace {

constexpr int schema_version = 4;

// Version 1. Times are microseconds since the epoch (UTC). Ids use
// AUTOINCREMENT so that a purged secret's id (and so its inode number) is
// never handed out again.
constexpr const char* schema_v1 = R"sql(
CREATE TABLE vaults (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  name             TEXT NOT NULL UNIQUE,
  kek_id           TEXT NOT NULL,
  retention_days   INTEGER NOT NULL DEFAULT 90 CHECK (retention_days BETWEEN 7 AND 90),
  purge_protection INTEGER NOT NULL DEFAULT 0 CHECK (purge_protection IN (0, 1)),
  created          INTEGER NOT NULL,
  created_by       INTEGER NOT NULL
);
CREATE TABLE policies (
  vault_id   INTEGER PRIMARY KEY REFERENCES vaults(id) ON DELETE CASCADE,
  text       TEXT NOT NULL,
  updated    INTEGER NOT NULL,
  updated_by INTEGER NOT NULL
);
CREATE TABLE secrets (
  id           INTEGER PRIMARY KEY AUTOINCREMENT,
  vault_id     INTEGER NOT NULL REFERENCES vaults(id),
  name         TEXT NOT NULL,
  created      INTEGER NOT NULL,
  next_version INTEGER NOT NULL DEFAULT 1,
  deleted_at   INTEGER,
  purge_at     INTEGER,
  UNIQUE (vault_id, name)
);
CREATE INDEX secrets_live ON secrets (vault_id, id) WHERE deleted_at IS NULL;
CREATE INDEX secrets_deleted ON secrets (vault_id, id) WHERE deleted_at IS NOT NULL;
CREATE INDEX secrets_purge ON secrets (purge_at) WHERE purge_at IS NOT NULL;
CREATE TABLE versions (
  id           INTEGER PRIMARY KEY AUTOINCREMENT,
  secret_id    INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
  version      INTEGER NOT NULL,
  kek_id       TEXT NOT NULL,
  nonce        BLOB NOT NULL,
  ciphertext   BLOB NOT NULL,
  sealed_dek   BLOB NOT NULL,
  size         INTEGER NOT NULL,
  created      INTEGER NOT NULL,
  created_by   INTEGER NOT NULL,
  updated      INTEGER NOT NULL,
  enabled      INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  not_before   INTEGER,
  expires      INTEGER,
  content_type TEXT,
  UNIQUE (secret_id, version)
);
CREATE INDEX versions_current ON versions (secret_id, enabled, version);
CREATE TABLE tags (
  version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
  name       TEXT NOT NULL,
  value      TEXT NOT NULL,
  PRIMARY KEY (version_id, name)
) WITHOUT ROWID;
CREATE TABLE settings (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE audit_anchor (
  id             INTEGER PRIMARY KEY CHECK (id = 1),
  seq            INTEGER NOT NULL,
  hash           TEXT NOT NULL,
  clean_shutdown INTEGER NOT NULL
);
)sql";

// Version 2: the audit anchor is signed by the token (audit/format.hpp).
constexpr const char* schema_v2 = R"sql(
ALTER TABLE audit_anchor ADD COLUMN time INTEGER NOT NULL DEFAULT 0;
ALTER TABLE audit_anchor ADD COLUMN file_start INTEGER NOT NULL DEFAULT 0;
ALTER TABLE audit_anchor ADD COLUMN sig BLOB;
)sql";

// Version 3: owners, groups and modes of secrets (NULL: the vault's default)
// and each vault's defaults (root:root 0400).
constexpr const char* schema_v3 = R"sql(
ALTER TABLE secrets ADD COLUMN owner INTEGER;
ALTER TABLE secrets ADD COLUMN grp INTEGER;
ALTER TABLE secrets ADD COLUMN mode INTEGER CHECK (mode BETWEEN 0 AND 511);
ALTER TABLE vaults ADD COLUMN default_owner INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vaults ADD COLUMN default_group INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vaults ADD COLUMN default_mode INTEGER NOT NULL DEFAULT 256 CHECK (default_mode BETWEEN 0 AND 511);
)sql";

// Version 4: keys and certificates (store.hpp, ObjectKind). A key's or an
// exportable certificate key's private half is never here in the clear: it
// is in the token (token_key) or envelope-encrypted (sealed_key).
constexpr const char* schema_v4 = R"sql(
CREATE TABLE objects (
  id           INTEGER PRIMARY KEY AUTOINCREMENT,
  vault_id     INTEGER NOT NULL REFERENCES vaults(id),
  kind         INTEGER NOT NULL CHECK (kind IN (1, 2)),
  name         TEXT NOT NULL,
  created      INTEGER NOT NULL,
  created_by   INTEGER NOT NULL,
  spec         TEXT NOT NULL,
  next_version INTEGER NOT NULL DEFAULT 1,
  UNIQUE (vault_id, name)
);
CREATE TABLE object_versions (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  object_id   INTEGER NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
  version     INTEGER NOT NULL,
  created     INTEGER NOT NULL,
  created_by  INTEGER NOT NULL,
  enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  not_before  INTEGER,
  expires     INTEGER,
  token_key   TEXT NOT NULL,
  public_der  BLOB NOT NULL,
  body        TEXT NOT NULL,
  kek_id      TEXT NOT NULL,
  nonce       BLOB NOT NULL,
  sealed_key  BLOB NOT NULL,
  sealed_dek  BLOB NOT NULL,
  notified    INTEGER NOT NULL DEFAULT 0,
  UNIQUE (object_id, version)
);
)sql";

// Forward migrations: migrations[i] takes user_version i to i + 1.
constexpr const char* migrations[] = {schema_v1, schema_v2, schema_v3, schema_v4};
static_assert(std::size(migrations) == schema_version);

#define VAULT_COLUMNS \
    "id, name, kek_id, retention_days, purge_protection, created, created_by, default_owner, default_group, default_mode"
#define SECRET_COLUMNS "id, vault_id, name, created, next_version, deleted_at, purge_at, owner, grp, mode"

VaultRow read_vault(const sqlite::Query& q)
{
    return VaultRow{VaultId{q.int64(0)},
                    q.text(1),
                    q.text(2),
                    static_cast<int>(q.int64(3)),
                    q.int64(4) != 0,
                    q.int64(5),
                    static_cast<uid_t>(q.int64(6)),
                    Ownership{static_cast<uid_t>(q.int64(7)), static_cast<gid_t>(q.int64(8)),
                              static_cast<std::uint32_t>(q.int64(9))}};
}

// The number of SECRET_COLUMNS: joined queries select a version's after them.
constexpr int secret_column_count = 10;

SecretRow read_secret(const sqlite::Query& q)
{
    SecretRow s{SecretId{q.int64(0)},      VaultId{q.int64(1)}, q.text(2), q.int64(3),
                static_cast<std::uint64_t>(q.int64(4)), q.optional_int64(5), q.optional_int64(6)};
    if (const auto o = q.optional_int64(7))
        s.owner = static_cast<uid_t>(*o);
    if (const auto g = q.optional_int64(8))
        s.group = static_cast<gid_t>(*g);
    if (const auto m = q.optional_int64(9))
        s.mode = static_cast<std::uint32_t>(*m);
    return s;
}

#define VERSION_COLUMNS \
    "id, secret_id, version, size, created, updated, created_by, enabled, not_before, expires, content_type"

VersionRow read_version(const sqlite::Query& q)
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
    "v.id, v.secret_id, v.version, v.size, v.created, v.updated, v.created_by, v.enabled, v.not_before, "     \
    "v.expires, v.content_type"

VersionRow read_version_at(const sqlite::Query& q, int c)
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

SecretVersion read_joined(const sqlite::Query& q)
{
    SecretVersion out{read_secret(q), std::nullopt};
    if (!q.is_null(secret_column_count))
        out.version = read_version_at(q, secret_column_count);
    return out;
}

using sqlite::collect;
using sqlite::first;
using sqlite::run;

Result<void> check_database(sqlite::Connection& c, const std::string& path, const char* pragma)
{
    auto rows = collect<std::string>(
        c, pragma, [](auto&) {}, [](const sqlite::Query& q) { return q.text(0); });
    if (!rows)
        return fail(Errc::storage, "database " + path + " cannot be checked (" + rows.error().message +
                                       "); restore it from a backup");
    if (rows->size() != 1 || (*rows)[0] != "ok")
        return fail(Errc::storage, "database " + path + " is damaged (" +
                                       (rows->empty() ? std::string("no result") : (*rows)[0]) +
                                       "); restore it from a backup");
    return {};
}

Result<int> user_version(sqlite::Connection& c)
{
    auto v = first<std::int64_t>(
        c, "PRAGMA user_version", [](auto&) {}, [](const sqlite::Query& q) { return q.int64(0); });
    if (!v)
        return tl::unexpected(v.error());
    return static_cast<int>(v->value_or(0));
}

Result<void> migrate(sqlite::Connection& c, const std::string& path, int from)
{
    for (int v = from; v < schema_version; ++v) {
        if (auto r = c.exec("BEGIN IMMEDIATE"); !r)
            return r;
        auto r = c.exec(migrations[v]);
        if (r) {
            const std::string bump = "PRAGMA user_version = " + std::to_string(v + 1);
            r = c.exec(bump.c_str());
        }
        if (r)
            r = c.exec("COMMIT");
        if (!r) {
            (void)c.exec("ROLLBACK");
            return fail(r.error().code, "migrating " + path + " to schema " + std::to_string(v + 1) +
                                            " failed: " + r.error().message);
        }
    }
    return {};
}

}  // namespace

struct PendingWrite {
    const Store::Work* work;
    Result<void> result;
    bool done = false;
};

Store::Store(std::string path, std::unique_ptr<sqlite::Connection> writer, bool read_only)
    : path_(std::move(path)), read_only_(read_only), writer_(std::move(writer))
{
}

Store::~Store() = default;

Result<std::unique_ptr<Store>> Store::open(const std::string& path, Mode mode)
{
    struct stat st{};
    const bool exists = ::stat(path.c_str(), &st) == 0;
    if (mode == Mode::create && exists)
        return fail(Errc::already_exists, "database " + path + " already exists");
    if (mode != Mode::create && !exists)
        return fail(Errc::not_found, "database " + path + " does not exist; run `vaultfs init` or fix the path");

    const bool read_only = mode == Mode::read_only;
    auto conn = sqlite::Connection::open(path, read_only, mode == Mode::create);
    if (!conn)
        return fail(Errc::storage, conn.error().message + "; check the file and its permissions");

    if (!read_only) {
        if (auto r = (*conn)->exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"); !r)
            return fail(Errc::storage, "database " + path + " is not usable (" + r.error().message +
                                           "); restore it from a backup");
    }
    auto version = user_version(**conn);
    if (!version)
        return fail(Errc::storage, "database " + path + " is not a SQLite database vaultfs can read (" +
                                       version.error().message + "); restore it from a backup");
    if (*version > schema_version)
        return fail(Errc::storage, "database " + path + " has schema " + std::to_string(*version) +
                                       ", newer than this vaultfs understands (" + std::to_string(schema_version) +
                                       "); upgrade vaultfs");
    if (*version == 0 && mode != Mode::create)
        return fail(Errc::storage, "database " + path + " is not a vaultfs database (no schema)");
    if (auto r = check_database(**conn, path, "PRAGMA quick_check"); !r)
        return tl::unexpected(r.error());
    if (!read_only) {
        if (auto r = migrate(**conn, path, *version); !r)
            return tl::unexpected(r.error());
        ::chmod(path.c_str(), 0600);
    }
    return std::unique_ptr<Store>(new Store(path, std::move(*conn), read_only));
}

template <class F>
auto Store::with_reader(F&& f) -> decltype(f(std::declval<sqlite::Connection&>()))
{
    std::unique_ptr<sqlite::Connection> conn;
    {
        std::lock_guard lock(readers_mutex_);
        if (!idle_readers_.empty()) {
            conn = std::move(idle_readers_.back());
            idle_readers_.pop_back();
        }
    }
    if (!conn) {
        auto opened = sqlite::Connection::open(path_, true, false);
        if (!opened)
            return tl::unexpected(opened.error());
        conn = std::move(*opened);
    }
    auto result = f(*conn);
    std::lock_guard lock(readers_mutex_);
    idle_readers_.push_back(std::move(conn));
    return result;
}

Result<void> Store::read(const std::function<Result<void>(sqlite::Connection&)>& f)
{
    return with_reader([&](sqlite::Connection& c) { return f(c); });
}

// ---- reads -------------------------------------------------------------------

Result<std::optional<VaultRow>> Store::vault_by_name(std::string_view name)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<VaultRow>(
            c,
            "SELECT " VAULT_COLUMNS " FROM vaults WHERE name = ?",
            [&](sqlite::Query& q) { q.bind(1, name); }, read_vault);
    });
}

Result<std::optional<VaultRow>> Store::vault_by_id(VaultId id)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<VaultRow>(
            c, "SELECT " VAULT_COLUMNS " FROM vaults WHERE id = ?",
            [&](sqlite::Query& q) { q.bind(1, id.value); }, read_vault);
    });
}

Result<std::vector<VaultRow>> Store::vaults()
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<VaultRow>(
            c, "SELECT " VAULT_COLUMNS " FROM vaults ORDER BY id",
            [](sqlite::Query&) {}, read_vault);
    });
}

Result<std::optional<PolicyRow>> Store::policy(VaultId vault)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<PolicyRow>(
            c, "SELECT text, updated, updated_by FROM policies WHERE vault_id = ?",
            [&](sqlite::Query& q) { q.bind(1, vault.value); },
            [](const sqlite::Query& q) {
                return PolicyRow{q.text(0), q.int64(1), static_cast<uid_t>(q.int64(2))};
            });
    });
}

Result<std::optional<SecretRow>> Store::secret_by_name(VaultId vault, std::string_view name)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND name = ?",
            [&](sqlite::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
    });
}

Result<std::optional<SecretRow>> Store::secret_by_id(SecretId id)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<SecretRow>(
            c, "SELECT " SECRET_COLUMNS " FROM secrets WHERE id = ?",
            [&](sqlite::Query& q) { q.bind(1, id.value); }, read_secret);
    });
}

Result<std::vector<SecretRow>> Store::live_secrets(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND deleted_at IS NULL AND id > ? AND next_version > 1 ORDER BY id LIMIT ?",
            [&](sqlite::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_secret);
    });
}

Result<std::vector<SecretVersion>> Store::live_secrets_with_current(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s JOIN versions v ON v.id = (SELECT id FROM versions "
            "WHERE secret_id = s.id ORDER BY enabled DESC, version DESC LIMIT 1) "
            "WHERE s.vault_id = ? AND s.deleted_at IS NULL AND s.id > ? AND s.next_version > 1 ORDER BY s.id LIMIT ?",
            [&](sqlite::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_joined);
    });
}

Result<std::vector<SecretRow>> Store::deleted_secrets(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND deleted_at IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
            [&](sqlite::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_secret);
    });
}

Result<std::vector<SecretRow>> Store::purge_due(Micros now, std::size_t limit)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE purge_at IS NOT NULL AND purge_at <= ? ORDER BY purge_at LIMIT ?",
            [&](sqlite::Query& q) { q.bind(1, now).bind(2, static_cast<std::int64_t>(limit)); }, read_secret);
    });
}

Result<std::int64_t> Store::secret_count(VaultId vault)
{
    return with_reader([&](sqlite::Connection& c) -> Result<std::int64_t> {
        auto n = first<std::int64_t>(
            c, "SELECT (SELECT count(*) FROM secrets WHERE vault_id = ?1 AND next_version > 1) + "
            "(SELECT count(*) FROM objects WHERE vault_id = ?1)",
            [&](sqlite::Query& q) { q.bind(1, vault.value); }, [](const sqlite::Query& q) { return q.int64(0); });
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
    return with_reader([&](sqlite::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s JOIN versions v ON v.secret_id = s.id "
            "WHERE s.vault_id = ? AND s.name = ? AND v.version = ?",
            [&](sqlite::Query& q) {
                q.bind(1, vault.value).bind(2, name).bind(3, static_cast<std::int64_t>(*number));
            },
            read_joined);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_uncached(VaultId vault, std::string_view name)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s LEFT JOIN versions v ON v.secret_id = s.id "
            "WHERE s.vault_id = ? AND s.name = ? ORDER BY v.enabled DESC, v.version DESC LIMIT 1",
            [&](sqlite::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_joined);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_current(SecretId id)
{
    return cached(by_id_, id.value, [&] {
        return with_reader([&](sqlite::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s LEFT JOIN versions v ON v.secret_id = s.id "
            "WHERE s.id = ? ORDER BY v.enabled DESC, v.version DESC LIMIT 1",
            [&](sqlite::Query& q) { q.bind(1, id.value); }, read_joined);
        });
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_id(VersionId id)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<SecretVersion>(
            c, "SELECT " JOINED_COLUMNS " FROM versions v JOIN secrets s ON s.id = v.secret_id WHERE v.id = ?",
            [&](sqlite::Query& q) { q.bind(1, id.value); }, read_joined);
    });
}

Result<std::optional<SealedRead>> Store::sealed_for_read(VersionId id)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<SealedRead>(
            c,
            "SELECT " JOINED_COLUMNS ", v.kek_id, v.nonce, v.ciphertext, v.sealed_dek "
            "FROM versions v JOIN secrets s ON s.id = v.secret_id WHERE v.id = ?",
            [&](sqlite::Query& q) { q.bind(1, id.value); },
            [](const sqlite::Query& q) {
                constexpr int c = secret_column_count + 11;  // after the version's columns
                return SealedRead{read_secret(q), SealedVersion{read_version_at(q, secret_column_count), q.text(c),
                                                                q.blob(c + 1), q.blob(c + 2), q.blob(c + 3)}};
            });
    });
}

Result<std::optional<VersionRow>> Store::version(SecretId secret, std::uint64_t number)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? AND version = ?",
            [&](sqlite::Query& q) { q.bind(1, secret.value).bind(2, static_cast<std::int64_t>(number)); },
            read_version);
    });
}

Result<std::optional<VersionRow>> Store::version_by_id(VersionId id)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE id = ?",
            [&](sqlite::Query& q) { q.bind(1, id.value); }, read_version);
    });
}

Result<std::optional<VersionRow>> Store::current_version(SecretId secret)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? ORDER BY enabled DESC, version DESC LIMIT 1",
            [&](sqlite::Query& q) { q.bind(1, secret.value); }, read_version);
    });
}

Result<std::vector<VersionRow>> Store::versions_of(SecretId secret)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? ORDER BY version",
            [&](sqlite::Query& q) { q.bind(1, secret.value); }, read_version);
    });
}

Result<std::vector<VersionEntry>> Store::versions_in_vault(VaultId vault, VersionId after, std::size_t limit)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<VersionEntry>(
            c,
            "SELECT v.id, s.name, v.version FROM versions v JOIN secrets s ON s.id = v.secret_id "
            "WHERE s.vault_id = ? AND s.deleted_at IS NULL AND v.id > ? ORDER BY v.id LIMIT ?",
            [&](sqlite::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            [](const sqlite::Query& q) {
                return VersionEntry{VersionId{q.int64(0)}, q.text(1), static_cast<std::uint64_t>(q.int64(2))};
            });
    });
}

Result<std::optional<SealedVersion>> Store::sealed_version(VersionId id)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<SealedVersion>(
            c, "SELECT " VERSION_COLUMNS ", kek_id, nonce, ciphertext, sealed_dek FROM versions WHERE id = ?",
            [&](sqlite::Query& q) { q.bind(1, id.value); },
            [](const sqlite::Query& q) {
                return SealedVersion{read_version(q), q.text(11), q.blob(12), q.blob(13), q.blob(14)};
            });
    });
}

Result<std::vector<Tag>> Store::tags(VersionId version)
{
    return with_reader([&](sqlite::Connection& c) {
        return collect<Tag>(
            c, "SELECT name, value FROM tags WHERE version_id = ? ORDER BY name",
            [&](sqlite::Query& q) { q.bind(1, version.value); },
            [](const sqlite::Query& q) { return Tag{q.text(0), q.text(1)}; });
    });
}

Result<std::optional<std::string>> Store::setting(std::string_view key)
{
    return with_reader([&](sqlite::Connection& c) {
        return first<std::string>(
            c, "SELECT value FROM settings WHERE key = ?", [&](sqlite::Query& q) { q.bind(1, key); },
            [](const sqlite::Query& q) { return q.text(0); });
    });
}

Result<std::optional<AuditAnchor>> Store::audit_anchor()
{
    return with_reader([&](sqlite::Connection& c) {
        return first<AuditAnchor>(
            c, "SELECT seq, hash, clean_shutdown, time, file_start, sig FROM audit_anchor WHERE id = 1",
            [](sqlite::Query&) {},
            [](const sqlite::Query& q) {
                return AuditAnchor{static_cast<std::uint64_t>(q.int64(0)), q.text(1), q.int64(2) != 0, q.int64(3),
                                   static_cast<std::uint64_t>(q.int64(4)), q.blob(5)};
            });
    });
}

Result<void> Store::integrity_check()
{
    return with_reader([&](sqlite::Connection& c) { return check_database(c, path_, "PRAGMA integrity_check"); });
}

// ---- writes ------------------------------------------------------------------

Result<void> Store::write(const Work& work)
{
    if (read_only_)
        return fail(Errc::storage, "database " + path_ + " is open read-only");
    PendingWrite mine{&work, {}, false};
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
    sqlite::Connection& c = *writer_;
    // Transaction control through cached statements: parsing these on every
    // commit showed up in profiles.
    const auto control = [&](const char* sql) -> Result<void> {
        auto q = c.query(sql);
        if (!q)
            return tl::unexpected(q.error());
        return q->run();
    };
    if (auto r = control("BEGIN IMMEDIATE"); !r)
        return fail(r.error().code, "cannot start a write transaction: " + r.error().message);
    Transaction tx(c);
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
        // Some errors (SQLITE_FULL, IOERR, NOMEM) roll the whole transaction
        // back by themselves: nothing of this batch can commit any more.
        if (sqlite3_get_autocommit(c.get()) != 0)
            return fail(p->result ? Errc::storage : p->result.error().code,
                        "the write transaction was rolled back: " +
                            (p->result ? std::string("by SQLite") : p->result.error().message));
    }
    if (!any_ok) {
        (void)control("ROLLBACK");
        return {};  // every unit carries its own error
    }
    if (auto r = control("COMMIT"); !r) {
        (void)control("ROLLBACK");
        return fail(r.error().code, "commit failed: " + r.error().message);
    }
    return {};
}

Result<VaultId> Store::Transaction::insert_vault(const VaultRow& row, const PolicyRow& policy)
{
    auto r = run(conn_,
                 "INSERT INTO vaults (name, kek_id, retention_days, purge_protection, created, created_by, "
                 "default_owner, default_group, default_mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [&](sqlite::Query& q) {
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
    const VaultId id{sqlite3_last_insert_rowid(conn_.get())};
    if (auto p = set_policy(id, policy); !p)
        return tl::unexpected(p.error());
    return id;
}

Result<void> Store::Transaction::delete_vault(VaultId vault)
{
    if (auto r = remove_empty_secrets(vault); !r)
        return r;
    return run(conn_, "DELETE FROM vaults WHERE id = ?", [&](sqlite::Query& q) { q.bind(1, vault.value); });
}

Result<void> Store::Transaction::update_vault_settings(VaultId vault, int retention_days, bool purge_protection)
{
    return run(conn_, "UPDATE vaults SET retention_days = ?, purge_protection = ? WHERE id = ?",
               [&](sqlite::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(retention_days))
                       .bind(2, static_cast<std::int64_t>(purge_protection))
                       .bind(3, vault.value);
               });
}

Result<void> Store::Transaction::set_vault_defaults(VaultId vault, const Ownership& d)
{
    return run(conn_, "UPDATE vaults SET default_owner = ?, default_group = ?, default_mode = ? WHERE id = ?",
               [&](sqlite::Query& q) {
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
    return run(conn_, "UPDATE secrets SET owner = ?, grp = ?, mode = ? WHERE id = ?", [&](sqlite::Query& q) {
        q.bind(1, wide(owner)).bind(2, wide(group)).bind(3, wide(mode)).bind(4, secret.value);
    });
}

Result<void> Store::Transaction::set_policy(VaultId vault, const PolicyRow& policy)
{
    return run(conn_,
               "INSERT INTO policies (vault_id, text, updated, updated_by) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (vault_id) DO UPDATE SET text = excluded.text, updated = excluded.updated, "
               "updated_by = excluded.updated_by",
               [&](sqlite::Query& q) {
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
        [&](sqlite::Query& q) { q.bind(1, id.value); }, read_secret);
}

Result<std::optional<SecretRow>> Store::Transaction::secret_by_name(VaultId vault, std::string_view name)
{
    return first<SecretRow>(
        conn_,
        "SELECT " SECRET_COLUMNS " FROM secrets "
        "WHERE vault_id = ? AND name = ?",
        [&](sqlite::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
}

Result<std::optional<VersionRow>> Store::Transaction::version_by_id(VersionId id)
{
    return first<VersionRow>(
        conn_, "SELECT " VERSION_COLUMNS " FROM versions WHERE id = ?", [&](sqlite::Query& q) { q.bind(1, id.value); },
        read_version);
}

Result<std::optional<VersionRow>> Store::Transaction::version(SecretId secret, std::uint64_t number)
{
    return first<VersionRow>(
        conn_, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? AND version = ?",
        [&](sqlite::Query& q) { q.bind(1, secret.value).bind(2, static_cast<std::int64_t>(number)); }, read_version);
}

Result<std::vector<Tag>> Store::Transaction::tags(VersionId version)
{
    return collect<Tag>(
        conn_, "SELECT name, value FROM tags WHERE version_id = ? ORDER BY name",
        [&](sqlite::Query& q) { q.bind(1, version.value); },
        [](const sqlite::Query& q) { return Tag{q.text(0), q.text(1)}; });
}

Result<SecretRow> Store::Transaction::ensure_secret(VaultId vault, std::string_view name, Micros now)
{
    // A certificate owns its name among secrets too (store.hpp, ObjectKind).
    auto certificate = first<std::int64_t>(
        conn_,
        "SELECT 1 FROM objects o WHERE o.vault_id = ?1 AND o.name = ?2 AND o.kind = 2 "
        "AND NOT EXISTS (SELECT 1 FROM secrets s WHERE s.vault_id = ?1 AND s.name = ?2)",
        [&](sqlite::Query& q) { q.bind(1, vault.value).bind(2, name); },
        [](const sqlite::Query& q) { return q.int64(0); });
    if (!certificate)
        return tl::unexpected(certificate.error());
    if (*certificate)
        return fail(Errc::already_exists, "a certificate in this vault is named " + std::string(name));
    auto r = run(conn_, "INSERT INTO secrets (vault_id, name, created) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                 [&](sqlite::Query& q) { q.bind(1, vault.value).bind(2, name).bind(3, now); });
    if (!r)
        return tl::unexpected(r.error());
    auto row = first<SecretRow>(
        conn_,
        "SELECT " SECRET_COLUMNS " FROM secrets "
        "WHERE vault_id = ? AND name = ?",
        [&](sqlite::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row)
        return fail(Errc::storage, "secret row vanished inside its transaction");
    return std::move(**row);
}

Result<void> Store::Transaction::raise_next_version(SecretId secret, std::uint64_t next)
{
    return run(conn_, "UPDATE secrets SET next_version = max(next_version, ?) WHERE id = ?",
               [&](sqlite::Query& q) { q.bind(1, static_cast<std::int64_t>(next)).bind(2, secret.value); });
}

Result<VersionId> Store::Transaction::insert_version(const SealedVersion& v)
{
    auto r = run(conn_,
                 "INSERT INTO versions (secret_id, version, kek_id, nonce, ciphertext, sealed_dek, size, created, "
                 "created_by, updated, enabled, not_before, expires, content_type) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [&](sqlite::Query& q) {
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
    return VersionId{sqlite3_last_insert_rowid(conn_.get())};
}

Result<void> Store::Transaction::update_version(const VersionRow& v)
{
    return run(conn_,
               "UPDATE versions SET updated = ?, enabled = ?, not_before = ?, expires = ?, content_type = ? "
               "WHERE id = ?",
               [&](sqlite::Query& q) {
                   q.bind(1, v.updated)
                       .bind(2, static_cast<std::int64_t>(v.enabled))
                       .bind(3, v.not_before)
                       .bind(4, v.expires)
                       .bind(5, v.content_type)
                       .bind(6, v.id.value);
               });
}

Result<void> Store::Transaction::replace_tags(VersionId version, const std::vector<Tag>& tags)
{
    if (auto r = run(conn_, "DELETE FROM tags WHERE version_id = ?", [&](sqlite::Query& q) { q.bind(1, version.value); });
        !r)
        return r;
    for (const auto& t : tags) {
        if (auto r = run(conn_, "INSERT INTO tags (version_id, name, value) VALUES (?, ?, ?)",
                         [&](sqlite::Query& q) { q.bind(1, version.value).bind(2, t.name).bind(3, t.value); });
            !r)
            return r;
    }
    return {};
}

Result<void> Store::Transaction::set_deleted(SecretId secret, std::optional<Micros> deleted_at,
                                             std::optional<Micros> purge_at)
{
    return run(conn_, "UPDATE secrets SET deleted_at = ?, purge_at = ? WHERE id = ?",
               [&](sqlite::Query& q) { q.bind(1, deleted_at).bind(2, purge_at).bind(3, secret.value); });
}

Result<void> Store::Transaction::purge_secret(SecretId secret)
{
    // Tags and versions go by ON DELETE CASCADE; secure_delete zeroes the pages.
    return run(conn_, "DELETE FROM secrets WHERE id = ?", [&](sqlite::Query& q) { q.bind(1, secret.value); });
}

Result<std::int64_t> Store::Transaction::secret_count(VaultId vault)
{
    auto n = first<std::int64_t>(
        conn_, "SELECT (SELECT count(*) FROM secrets WHERE vault_id = ?1 AND next_version > 1) + "
            "(SELECT count(*) FROM objects WHERE vault_id = ?1)",
        [&](sqlite::Query& q) { q.bind(1, vault.value); }, [](const sqlite::Query& q) { return q.int64(0); });
    if (!n)
        return tl::unexpected(n.error());
    return n->value_or(0);
}

Result<void> Store::Transaction::remove_empty_secrets(VaultId vault)
{
    return run(conn_, "DELETE FROM secrets WHERE vault_id = ? AND next_version = 1",
               [&](sqlite::Query& q) { q.bind(1, vault.value); });
}

Result<SecretId> Store::Transaction::insert_secret(VaultId vault, std::string_view name, Micros created,
                                                   std::uint64_t next_version)
{
    auto r = run(conn_, "INSERT INTO secrets (vault_id, name, created, next_version) VALUES (?, ?, ?, ?)",
                 [&](sqlite::Query& q) {
                     q.bind(1, vault.value).bind(2, name).bind(3, created).bind(4,
                                                                              static_cast<std::int64_t>(next_version));
                 });
    if (!r)
        return tl::unexpected(r.error());
    return SecretId{sqlite3_last_insert_rowid(conn_.get())};
}

Result<void> Store::Transaction::set_setting(std::string_view key, std::string_view value)
{
    return run(conn_, "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
               [&](sqlite::Query& q) { q.bind(1, key).bind(2, value); });
}

Result<void> Store::Transaction::set_audit_anchor(const AuditAnchor& a)
{
    return run(conn_,
               "INSERT OR REPLACE INTO audit_anchor (id, seq, hash, clean_shutdown, time, file_start, sig) "
               "VALUES (1, ?, ?, ?, ?, ?, ?)",
               [&](sqlite::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(a.seq))
                       .bind(2, a.hash)
                       .bind(3, static_cast<std::int64_t>(a.clean_shutdown))
                       .bind(4, a.time)
                       .bind(5, static_cast<std::int64_t>(a.file_start))
                       .bind_blob(6, a.sig);
               });
}

}  // namespace vaultfs::vault
