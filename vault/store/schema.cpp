// The store's schema on each engine: SQLite's forward migrations (PRAGMA
// user_version) and PostgreSQL's one script, kept table for table alike.
#include "vault/store/schema.hpp"

#include "vault/store/postgresql.hpp"
#include "vault/store/sqlite.hpp"

namespace vaultfs::vault::schema {

using db::collect;
using db::first;

namespace {

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



// Version 5: several hosts (docs/hosts.md "Several hosts"). Settings and the audit
// anchor belong to one host (hosts.id; on SQLite always 1); the change feed
// numbers every committed write batch; enrolled hosts, the KEKs wrapped for
// them, and a check value per KEK that proves an imported KEK is the one
// that sealed this store's DEKs. migration_undo (token migrate) is part of
// the schema now rather than made on demand.
constexpr const char* schema_v5 = R"sql(
CREATE TABLE settings_v5 (
  host  INTEGER NOT NULL DEFAULT 1,
  key   TEXT NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (host, key)
) WITHOUT ROWID;
INSERT INTO settings_v5 (host, key, value) SELECT 1, key, value FROM settings;
DROP TABLE settings;
ALTER TABLE settings_v5 RENAME TO settings;
CREATE TABLE IF NOT EXISTS migration_undo (
  tbl        INTEGER NOT NULL,
  row        INTEGER NOT NULL,
  sealed_dek BLOB NOT NULL,
  PRIMARY KEY (tbl, row)
);
CREATE TABLE hosts (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  name             TEXT NOT NULL UNIQUE,
  status           TEXT NOT NULL CHECK (status IN ('requested', 'enrolled')),
  transport_key    TEXT NOT NULL,
  transport_public BLOB NOT NULL,
  signing_public   BLOB NOT NULL,
  requested        INTEGER NOT NULL,
  enrolled         INTEGER,
  enrolled_by      TEXT,
  enrolment_sig    BLOB NOT NULL DEFAULT X''
);
CREATE TABLE kek_grants (
  kek_id      TEXT NOT NULL,
  host        INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
  wrapped_key BLOB NOT NULL,
  wrapped_kek BLOB NOT NULL,
  granted_by  TEXT NOT NULL,
  granted     INTEGER NOT NULL,
  PRIMARY KEY (kek_id, host)
);
CREATE TABLE kek_checks (
  kek_id TEXT PRIMARY KEY,
  sealed BLOB NOT NULL
);
CREATE TABLE feed (
  id  INTEGER PRIMARY KEY CHECK (id = 1),
  rev INTEGER NOT NULL
);
INSERT INTO feed (id, rev) VALUES (1, 0);
CREATE TABLE changes (
  rev  INTEGER PRIMARY KEY,
  host INTEGER NOT NULL,
  at   INTEGER NOT NULL
);
)sql";

// Version 6: when the content `S` serves last changed (docs/lifecycle.md "Reacting to
// rotation"): a new version, or an enable, disable or validity change that
// changes what S serves. 0 for rows written before: their current
// version's creation time stands.
constexpr const char* schema_v6 = R"sql(
ALTER TABLE secrets ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX secrets_changed ON secrets (changed);
)sql";

// Version 7: KEK rotation (vault/kek/rekey.hpp): each vault's rotation
// period in days (0: only when asked) and when its KEK was made (0: when
// the vault was). The same on PostgreSQL (postgresql_v7).
constexpr const char* schema_v7 = R"sql(
ALTER TABLE vaults ADD COLUMN rekey_after_days INTEGER NOT NULL DEFAULT 0 CHECK (rekey_after_days BETWEEN 0 AND 36500);
ALTER TABLE vaults ADD COLUMN kek_created INTEGER NOT NULL DEFAULT 0;
)sql";

// Version 8: who made a secret's row (NULL for rows made before, or
// restored), which decides whether a name is the caller's own fresh file
// (vault/secrets/replace.cpp). The same on PostgreSQL (postgresql_v8).
constexpr const char* schema_v8 = R"sql(
ALTER TABLE secrets ADD COLUMN created_by INTEGER;
)sql";

// Forward migrations: migrations[i] takes user_version i to i + 1.
constexpr const char* migrations[] = {schema_v1, schema_v2, schema_v3, schema_v4,
                                      schema_v5, schema_v6, schema_v7, schema_v8};
static_assert(std::size(migrations) == version);

// PostgreSQL: the same tables as SQLite's schema 8, in its types (every
// integer BIGINT, every blob BYTEA; sequences never hand an id out twice,
// as AUTOINCREMENT does not). `schema` holds the version.
constexpr const char* postgresql_schema = R"sql(
CREATE TABLE schema (version BIGINT NOT NULL);
INSERT INTO schema (version) VALUES (8);
CREATE TABLE vaults (
  id               BIGSERIAL PRIMARY KEY,
  name             TEXT NOT NULL UNIQUE,
  kek_id           TEXT NOT NULL,
  retention_days   BIGINT NOT NULL DEFAULT 90 CHECK (retention_days BETWEEN 7 AND 90),
  purge_protection BIGINT NOT NULL DEFAULT 0 CHECK (purge_protection IN (0, 1)),
  created          BIGINT NOT NULL,
  created_by       BIGINT NOT NULL,
  default_owner    BIGINT NOT NULL DEFAULT 0,
  default_group    BIGINT NOT NULL DEFAULT 0,
  default_mode     BIGINT NOT NULL DEFAULT 256 CHECK (default_mode BETWEEN 0 AND 511),
  rekey_after_days BIGINT NOT NULL DEFAULT 0 CHECK (rekey_after_days BETWEEN 0 AND 36500),
  kek_created      BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE policies (
  vault_id   BIGINT PRIMARY KEY REFERENCES vaults(id) ON DELETE CASCADE,
  text       TEXT NOT NULL,
  updated    BIGINT NOT NULL,
  updated_by BIGINT NOT NULL
);
CREATE TABLE secrets (
  id           BIGSERIAL PRIMARY KEY,
  vault_id     BIGINT NOT NULL REFERENCES vaults(id),
  name         TEXT NOT NULL,
  created      BIGINT NOT NULL,
  next_version BIGINT NOT NULL DEFAULT 1,
  changed      BIGINT NOT NULL DEFAULT 0,
  deleted_at   BIGINT,
  purge_at     BIGINT,
  owner        BIGINT,
  grp          BIGINT,
  mode         BIGINT CHECK (mode BETWEEN 0 AND 511),
  created_by   BIGINT,
  UNIQUE (vault_id, name)
);
CREATE INDEX secrets_live ON secrets (vault_id, id) WHERE deleted_at IS NULL;
CREATE INDEX secrets_deleted ON secrets (vault_id, id) WHERE deleted_at IS NOT NULL;
CREATE INDEX secrets_purge ON secrets (purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX secrets_changed ON secrets (changed);
CREATE TABLE versions (
  id           BIGSERIAL PRIMARY KEY,
  secret_id    BIGINT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
  version      BIGINT NOT NULL,
  kek_id       TEXT NOT NULL,
  nonce        BYTEA NOT NULL,
  ciphertext   BYTEA NOT NULL,
  sealed_dek   BYTEA NOT NULL,
  size         BIGINT NOT NULL,
  created      BIGINT NOT NULL,
  created_by   BIGINT NOT NULL,
  updated      BIGINT NOT NULL,
  enabled      BIGINT NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  not_before   BIGINT,
  expires      BIGINT,
  content_type TEXT,
  UNIQUE (secret_id, version)
);
CREATE INDEX versions_current ON versions (secret_id, enabled, version);
CREATE TABLE tags (
  version_id BIGINT NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
  name       TEXT NOT NULL,
  value      TEXT NOT NULL,
  PRIMARY KEY (version_id, name)
);
CREATE TABLE hosts (
  id               BIGSERIAL PRIMARY KEY,
  name             TEXT NOT NULL UNIQUE,
  status           TEXT NOT NULL CHECK (status IN ('requested', 'enrolled')),
  transport_key    TEXT NOT NULL,
  transport_public BYTEA NOT NULL,
  signing_public   BYTEA NOT NULL,
  requested        BIGINT NOT NULL,
  enrolled         BIGINT,
  enrolled_by      TEXT,
  enrolment_sig    BYTEA NOT NULL DEFAULT ''
);
CREATE TABLE settings (
  host  BIGINT NOT NULL,
  key   TEXT NOT NULL,
  value TEXT NOT NULL,
  PRIMARY KEY (host, key)
);
CREATE TABLE audit_anchor (
  id             BIGINT PRIMARY KEY,
  seq            BIGINT NOT NULL,
  hash           TEXT NOT NULL,
  clean_shutdown BIGINT NOT NULL,
  time           BIGINT NOT NULL DEFAULT 0,
  file_start     BIGINT NOT NULL DEFAULT 0,
  sig            BYTEA
);
CREATE TABLE objects (
  id           BIGSERIAL PRIMARY KEY,
  vault_id     BIGINT NOT NULL REFERENCES vaults(id),
  kind         BIGINT NOT NULL CHECK (kind IN (1, 2)),
  name         TEXT NOT NULL,
  created      BIGINT NOT NULL,
  created_by   BIGINT NOT NULL,
  spec         TEXT NOT NULL,
  next_version BIGINT NOT NULL DEFAULT 1,
  UNIQUE (vault_id, name)
);
CREATE TABLE object_versions (
  id          BIGSERIAL PRIMARY KEY,
  object_id   BIGINT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
  version     BIGINT NOT NULL,
  created     BIGINT NOT NULL,
  created_by  BIGINT NOT NULL,
  enabled     BIGINT NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
  not_before  BIGINT,
  expires     BIGINT,
  token_key   TEXT NOT NULL,
  public_der  BYTEA NOT NULL,
  body        TEXT NOT NULL,
  kek_id      TEXT NOT NULL,
  nonce       BYTEA NOT NULL,
  sealed_key  BYTEA NOT NULL,
  sealed_dek  BYTEA NOT NULL,
  notified    BIGINT NOT NULL DEFAULT 0,
  UNIQUE (object_id, version)
);
CREATE TABLE migration_undo (
  tbl        BIGINT NOT NULL,
  row        BIGINT NOT NULL,
  sealed_dek BYTEA NOT NULL,
  PRIMARY KEY (tbl, row)
);
CREATE TABLE kek_grants (
  kek_id      TEXT NOT NULL,
  host        BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
  wrapped_key BYTEA NOT NULL,
  wrapped_kek BYTEA NOT NULL,
  granted_by  TEXT NOT NULL,
  granted     BIGINT NOT NULL,
  PRIMARY KEY (kek_id, host)
);
CREATE TABLE kek_checks (
  kek_id TEXT PRIMARY KEY,
  sealed BYTEA NOT NULL
);
CREATE TABLE feed (
  id  BIGINT PRIMARY KEY CHECK (id = 1),
  rev BIGINT NOT NULL
);
INSERT INTO feed (id, rev) VALUES (1, 0);
CREATE TABLE changes (
  rev  BIGINT PRIMARY KEY,
  host BIGINT NOT NULL,
  at   BIGINT NOT NULL
);
)sql";

// PostgreSQL's forward migrations, from the first schema it had (6):
// postgresql_migrations[i] takes version 6 + i to 7 + i. Only columns are
// added, so hosts still on the older binary go on working until they are
// restarted with the new one.
constexpr int postgresql_first = 6;
constexpr const char* postgresql_v7 = R"sql(
ALTER TABLE vaults ADD COLUMN rekey_after_days BIGINT NOT NULL DEFAULT 0 CHECK (rekey_after_days BETWEEN 0 AND 36500);
ALTER TABLE vaults ADD COLUMN kek_created BIGINT NOT NULL DEFAULT 0;
UPDATE schema SET version = 7;
)sql";
constexpr const char* postgresql_v8 = R"sql(
ALTER TABLE secrets ADD COLUMN created_by BIGINT;
UPDATE schema SET version = 8;
)sql";
constexpr const char* postgresql_migrations[] = {postgresql_v7, postgresql_v8};
static_assert(postgresql_first + std::size(postgresql_migrations) == version);

Result<void> check_database(db::Connection& c, const std::string& path, const char* pragma)
{
    auto rows = collect<std::string>(
        c, pragma, [](auto&) {}, [](const db::Query& q) { return q.text(0); });
    if (!rows)
        return fail(Errc::storage, "database " + path + " cannot be checked (" + rows.error().message +
                                       "); restore it from a backup");
    if (rows->size() != 1 || (*rows)[0] != "ok")
        return fail(Errc::storage, "database " + path + " is damaged (" +
                                       (rows->empty() ? std::string("no result") : (*rows)[0]) +
                                       "); restore it from a backup");
    return {};
}

Result<int> user_version(db::Connection& c)
{
    auto v = first<std::int64_t>(
        c, "PRAGMA user_version", [](auto&) {}, [](const db::Query& q) { return q.int64(0); });
    if (!v)
        return tl::unexpected(v.error());
    return static_cast<int>(v->value_or(0));
}

Result<void> migrate(db::Connection& c, const std::string& path, int from)
{
    for (int v = from; v < version; ++v) {
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

Result<void> check_sqlite(db::Connection& c, const std::string& path, bool full)
{
    return check_database(c, path, full ? "PRAGMA integrity_check" : "PRAGMA quick_check");
}

Result<void> prepare_sqlite(db::Connection& c, const std::string& path, bool create, bool read_only,
                            bool check_pages, bool may_migrate)
{
    auto v = user_version(c);
    if (!v)
        return fail(Errc::storage, "database " + path + " is not a SQLite database vaultfs can read (" +
                                       v.error().message + "); restore it from a backup");
    if (*v > version)
        return fail(Errc::storage, "database " + path + " has schema " + std::to_string(*v) +
                                       ", newer than this vaultfs understands (" + std::to_string(version) +
                                       "); upgrade vaultfs");
    if (*v == 0 && !create)
        return fail(Errc::storage, "database " + path + " is not a vaultfs database (no schema)");
    if (check_pages)
        if (auto r = check_database(c, path, "PRAGMA quick_check"); !r)
            return r;
    if (!may_migrate && *v != version)
        return fail(Errc::storage, "database " + path + " has schema " + std::to_string(*v) + ", this binary's is " +
                                       std::to_string(version) + ": a restart cannot change the state's format; "
                                       "unmount, then mount with the new binary (it upgrades the database)");
    if (read_only) {
        if (*v < version)
            return fail(Errc::storage, "database " + path + " has schema " + std::to_string(*v) +
                                           "; open it once read-write (start the daemon) to upgrade it");
        return {};
    }
    return migrate(c, path, *v);
}

Result<void> prepare_postgresql(db::Connection& c, const std::string& where, bool create, bool may_migrate)
{
    auto present = db::integer(c, "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND "
                                  "tablename = 'schema'",
                               [](db::Query&) {});
    if (!present)
        return fail(Errc::storage, "PostgreSQL at " + where + " cannot be read: " + present.error().message);
    if (create) {
        if (*present != 0)
            return fail(Errc::already_exists, "PostgreSQL at " + where +
                                                  " already holds a vaultfs store; give an empty database");
        if (auto r = c.exec("BEGIN"); !r)
            return r;
        auto r = c.exec(postgresql_schema);
        if (r)
            r = c.exec("COMMIT");
        if (!r) {
            (void)c.exec("ROLLBACK");
            return fail(r.error().code, "creating the schema in PostgreSQL at " + where + " failed: " +
                                            r.error().message);
        }
        return {};
    }
    if (*present == 0)
        return fail(Errc::not_found, "PostgreSQL at " + where +
                                         " holds no vaultfs store; run `vaultfs init --store URL` or "
                                         "`vaultfs migrate --to URL`");
    auto v = db::integer(c, "SELECT version FROM schema", [](db::Query&) {});
    if (!v)
        return fail(Errc::storage, "PostgreSQL at " + where + ": " + v.error().message);
    for (std::int64_t at = *v; may_migrate && at >= postgresql_first && at < version; ++at) {
        // One host upgrades; the others, starting at once, wait on the lock
        // and find the work done.
        auto r = c.exec("BEGIN");
        if (r)
            r = c.exec("LOCK TABLE schema IN EXCLUSIVE MODE");
        auto now = r ? db::integer(c, "SELECT version FROM schema", [](db::Query&) {}) : Result<std::int64_t>(0);
        if (r && !now)
            r = tl::unexpected(now.error());
        if (r && *now == at)
            r = c.exec(postgresql_migrations[at - postgresql_first]);
        if (r)
            r = c.exec("COMMIT");
        if (!r) {
            (void)c.exec("ROLLBACK");
            return fail(r.error().code, "upgrading the store in PostgreSQL at " + where + " to schema " +
                                            std::to_string(at + 1) + " failed: " + r.error().message);
        }
        *v = at + 1;
    }
    if (*v != version)
        return fail(Errc::storage, "PostgreSQL at " + where + " has schema " + std::to_string(*v) +
                                       ", this vaultfs understands " + std::to_string(version) +
                                       "; run the same vaultfs version on every host");
    return {};
}

}  // namespace vaultfs::vault::schema
