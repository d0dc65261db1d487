// Store: the vaults, secrets, versions, policies, keys and certificates,
// on one of two engines. The only place in vaultfs that speaks SQL
// (vault/store/db.hpp is the interface both engines implement).
//
// - Engines. SQLite (a file: one host, the default) or PostgreSQL (a
//   connection string: several hosts sharing one database). The same
//   schema (vault/store/schema.hpp), the same SQL, the same contract; the
//   store's tests run on both.
// - Durability. A write returns success once it is committed: SQLite in
//   WAL mode with synchronous=FULL (survives kill -9 and power loss);
//   PostgreSQL with the server's synchronous_commit (with a synchronous
//   standby, once the standby has it too).
// - One writer connection per process; writes are group-committed: callers
//   queue a unit of work, one of them runs every queued unit in a single
//   transaction (each inside its own savepoint, so one failing unit does
//   not undo the others) and pays one commit for all. Numbers (ids,
//   versions) are allocated inside that transaction, so writers on several
//   hosts never collide.
// - Readers borrow a connection from a pool; each sees the last commit.
// - The change feed. Every committed batch raises `feed.rev` (and logs it in
//   `changes`) in its own transaction. On PostgreSQL a listener
//   (vault/store/feed.hpp) follows it by LISTEN/NOTIFY and by polling, and
//   every change another host commits drops this store's caches.
// - Caches. What every open reads -- a secret by name and by id with the
//   version `S` stands for, a version by id with its secret, and the sealed
//   row of the version opened (sealed_for_read) -- is cached in memory,
//   bounded, and dropped by every write this store commits and every change
//   the feed reports, so that an open makes no database read (no SQLite
//   transaction, no PostgreSQL round trip). Rows hold ciphertext, sealed
//   DEKs and metadata only; a value is authenticated again at every
//   decryption, and a row altered in the database behind the daemon's back
//   fails authentication once it is read (at the latest after the next
//   write, or a restart).
// - Freshness (PostgreSQL). Reads are served only while the feed has
//   confirmed, within the staleness bound, that nothing newer exists:
//   otherwise they fail with Errc::not_fresh (EIO) until it has again.
// - Hosts. Settings and the audit anchor belong to this process's host
//   (hosts.id; 1 on SQLite).
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "vault/model/error.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {

namespace db {
class Connection;
class Query;
}
class Feed;

struct VaultRow {
    VaultId id;
    std::string name;
    std::string kek_id;
    int retention_days = 90;
    bool purge_protection = false;
    Micros created = 0;
    uid_t created_by = 0;
    Ownership defaults;  // what a new secret's stat shows until a manager changes it
    // KEK rotation (vault/kek/rekey.hpp): a new KEK every this many days
    // (0: only when asked), and when the KEK in use was made (the vault's
    // creation until its first rekey).
    int rekey_after_days = 0;
    Micros kek_created = 0;
};

struct PolicyRow {
    std::string text;  // canonical policy text
    Micros updated = 0;
    uid_t updated_by = 0;
};

// What a listing shows of a secret (readdir without attributes).
struct SecretName {
    SecretId id;
    std::string name;
};

struct SecretRow {
    SecretId id;
    VaultId vault;
    std::string name;
    Micros created = 0;
    std::uint64_t next_version = 1;  // versions are 1..next_version-1
    std::optional<Micros> deleted_at;
    std::optional<Micros> purge_at;
    // Set by a manager (chown, chmod); nullopt: the vault's default.
    std::optional<uid_t> owner;
    std::optional<gid_t> group;
    std::optional<std::uint32_t> mode;
    // When what `S` serves last changed (schema 6; 0: not recorded).
    Micros changed = 0;
    // The uid whose open made the row (schema 8; nullopt: made before, or
    // restored from a backup).
    std::optional<uid_t> created_by;

    Ownership ownership(const Ownership& defaults) const
    {
        return Ownership{owner.value_or(defaults.owner), group.value_or(defaults.group), mode.value_or(defaults.mode)};
    }

    // A row is created when a writer opens a new name; it becomes a secret
    // once its first version commits.
    bool has_versions() const { return next_version > 1; }
    bool deleted() const { return deleted_at.has_value(); }
};

struct VersionRow {
    VersionId id;
    SecretId secret;
    std::uint64_t number = 0;
    std::uint64_t size = 0;  // plaintext bytes
    Micros created = 0;
    Micros updated = 0;
    uid_t created_by = 0;
    bool enabled = true;
    std::optional<Micros> not_before;
    std::optional<Micros> expires;
    std::optional<std::string> content_type;
};

struct SealedVersion {
    VersionRow meta;
    std::string kek_id;
    std::vector<std::uint8_t> nonce;
    std::vector<std::uint8_t> ciphertext;
    std::vector<std::uint8_t> sealed_dek;
};

struct Tag {
    std::string name;
    std::string value;
    bool operator==(const Tag&) const = default;
};

// A secret with one of its versions (none while its first is being written).
struct SecretVersion {
    SecretRow secret;
    std::optional<VersionRow> version;
};

// What a read needs, in one query: the version as stored, and its secret.
// What S serves changed (secrets.changed), or a certificate got a new
// version: what on_change hooks fire on (vault/hooks/hooks.hpp).
struct Change {
    std::int64_t id = 0;  // the secret's or the certificate's
    bool certificate = false;
    std::string vault;
    std::string name;
    std::uint64_t version = 0;  // the certificate's new version; for a secret, 0
    Micros at = 0;
};

// An object whose current version has an expiry: a secret's highest
// enabled version, a key's or a certificate's (monitor/expiry.hpp).
struct Expiring {
    enum class Kind { secret = 0, key = 1, certificate = 2 };
    Kind kind = Kind::secret;
    std::string vault;
    std::string name;
    std::uint64_t version = 0;
    std::int64_t version_id = 0;  // versions.id or object_versions.id
    Micros expires = 0;
};

struct SealedRead {
    SecretRow secret;
    SealedVersion sealed;
};

// One entry of a vault's `.versions` listing.
struct VersionEntry {
    VersionId id;
    std::string secret;
    std::uint64_t number = 0;
};

// The anchor of the audit chain: the last record known to be durable,
// signed by the token's audit key over audit::anchor_digest() so that an
// edited row is caught (an older signed row put back is not: see SECURITY.md).
struct AuditAnchor {
    std::uint64_t seq = 0;
    std::string hash;
    bool clean_shutdown = false;
    Micros time = 0;
    // seq of the first record of the audit file that holds `seq`: a file
    // replaced, emptied or cut from the front does not begin there.
    std::uint64_t file_start = 0;
    std::vector<std::uint8_t> sig;  // empty: not signed (a schema-1 row)
};

// Keys and certificates (docs/keys-and-certificates.md "Certificates and keys"): named objects of
// a vault with numbered versions, like secrets, in their own tables. A name
// is unique among a vault's keys and certificates, and a certificate's also
// among its secrets (as in Azure Key Vault, where a certificate owns a key
// and a secret of its name).
enum class ObjectKind : int { key = 1, certificate = 2 };
using ObjectId = Id<struct ObjectTag>;
using ObjectVersionId = Id<struct ObjectVersionTag>;

struct ObjectRow {
    ObjectId id;
    VaultId vault;
    ObjectKind kind = ObjectKind::key;
    std::string name;
    Micros created = 0;
    uid_t created_by = 0;
    std::string spec;  // JSON: a key's type, operations and rotation policy; a certificate's policy
    std::uint64_t next_version = 1;
};

struct ObjectVersionRow {
    ObjectVersionId id;
    ObjectId object;
    std::uint64_t number = 0;
    Micros created = 0;
    uid_t created_by = 0;
    bool enabled = true;
    std::optional<Micros> not_before;
    std::optional<Micros> expires;
    std::string token_key;                // CKA_ID (hex) of a token-held private key; empty if none
    std::vector<std::uint8_t> public_der;  // SubjectPublicKeyInfo
    std::string body;                     // JSON: certificate chain, CSR, status, tags
    // An exportable private key, envelope-encrypted like a secret's value
    // (empty when the key is in the token).
    std::string kek_id;
    std::vector<std::uint8_t> nonce;
    std::vector<std::uint8_t> sealed_key;
    std::vector<std::uint8_t> sealed_dek;
    Micros notified = 0;  // the lead time of the last near-expiry event sent for it (0: none)
};

// A sealed DEK with what it is bound to (envelope.hpp, Binding), wherever
// it is stored: a secret's version, or an object version's exportable key.
struct SealedDek {
    enum class Table { versions = 0, object_versions = 1 };  // as the undo log stores them
    Table table;
    std::int64_t row = 0;
    VaultId vault;
    std::string name;           // the secret's or the object's name
    std::uint64_t version = 0;
    std::string kek_id;
    std::vector<std::uint8_t> sealed_dek;
    std::string body;           // object versions: the JSON body (its key_ref binds the key)
};

// A sealed row of a vault with its ciphertext: a secret's version (the
// value), or an object version's exportable key (sealed_key).
struct SealedRow {
    SealedDek::Table table = SealedDek::Table::versions;
    std::int64_t row = 0;
    std::string name;           // the secret's or the object's name
    std::uint64_t version = 0;
    std::string kek_id;
    std::vector<std::uint8_t> nonce;
    std::vector<std::uint8_t> ciphertext;
    std::vector<std::uint8_t> sealed_dek;
    std::string body;           // object versions: the JSON body (its key_ref binds the key)
};

// An enrolled host, or one that asked to be (docs/hosts.md "Several hosts").
struct HostRow {
    std::int64_t id = 0;
    std::string name;
    std::string status;  // "requested" or "enrolled"
    std::string transport_key;               // CKA_ID (hex) of its transport key, in its own token
    std::vector<std::uint8_t> transport_public;  // SubjectPublicKeyInfo, RSA-3072
    std::vector<std::uint8_t> signing_public;    // its audit signing key's
    Micros requested = 0;
    std::optional<Micros> enrolled;
    std::optional<std::string> enrolled_by;  // the host that granted it
    // enrolled_by's audit key's signature over the row (hosts::enrolment_text):
    // a row written into the database by anyone else does not check.
    std::vector<std::uint8_t> enrolment_sig;
};

// A vault KEK wrapped for one host's transport key (hsm::WrappedKey).
struct KekGrantRow {
    std::string kek_id;
    std::int64_t host = 0;
    std::vector<std::uint8_t> wrapped_key;
    std::vector<std::uint8_t> wrapped_kek;
    std::string granted_by;
    Micros granted = 0;
};

struct StoreOptions {
    // This process's host in hosts (PostgreSQL); empty: the host named 1.
    std::string host;
    // Reads fail closed when the feed has not confirmed freshness for this long.
    std::chrono::milliseconds staleness_bound{2000};
    // Follow the change feed (PostgreSQL): daemons do; one-shot commands,
    // which read once and exit, need not.
    bool follow = true;
    // Bring an older SQLite schema up to date. A restart's new process may
    // not (fs/daemon/restart/): the old one still serves the file.
    bool migrate = true;
};

class Store {
public:
    enum class Mode { create, open_existing, read_only };

    // Opens the store at `location`: a SQLite file, or a PostgreSQL
    // connection string (pg::is_conninfo). `create` makes a new one (and
    // fails if the file exists or the database already holds a store); the
    // others require an existing vaultfs store that passes its checks.
    // Errors name the file or server and what to do.
    static Result<std::unique_ptr<Store>> open(const std::string& location, Mode mode,
                                               const StoreOptions& options = {});
    ~Store();
    Store(const Store&) = delete;
    Store& operator=(const Store&) = delete;

    // The file, or the connection string without its password.
    const std::string& path() const { return path_; }
    // Several hosts share it (PostgreSQL).
    bool shared() const { return shared_; }
    // This process's host (1 on SQLite; 0 on PostgreSQL until it is in hosts).
    std::int64_t host_id() const { return host_id_; }
    const std::string& host_name() const { return host_; }
    // Looks the host up again (after it was added or enrolled).
    Result<void> refresh_host();

    // The feed's revision as last confirmed, and whether reads are served.
    std::int64_t revision() const;
    Result<void> fresh() const;
    // How long since the feed last confirmed freshness; nullopt without a feed.
    std::optional<std::chrono::milliseconds> feed_age() const;
    std::chrono::milliseconds staleness_bound() const { return options_.staleness_bound; }
    // Whether this process runs the background rounds (purge, rotation,
    // renewal): always on SQLite; on PostgreSQL the one host holding the
    // store's advisory lock, so that two hosts never rotate one key twice.
    bool background_leader();

    // Called on the feed's thread when another host's change has been seen
    // (before reads see it as fresh): the daemon imports KEKs granted to it.
    void on_change(std::function<void()> f);

    // Moves on with every write batch (committed or not): what was read
    // under an older generation may be stale.
    std::uint64_t generation() const { return generation_.load(); }

    // ---- reads -------------------------------------------------------------
    Result<std::optional<VaultRow>> vault_by_name(std::string_view name);
    Result<std::optional<VaultRow>> vault_by_id(VaultId id);
    Result<std::vector<VaultRow>> vaults();
    Result<std::optional<PolicyRow>> policy(VaultId vault);

    Result<std::optional<SecretRow>> secret_by_name(VaultId vault, std::string_view name);
    Result<std::optional<SecretRow>> secret_by_id(SecretId id);
    // Secrets with at least one version, ordered by id, after `after`.
    Result<std::vector<SecretRow>> live_secrets(VaultId vault, SecretId after, std::size_t limit);
    // Their ids and names only (a plain listing reads two columns, not all).
    Result<std::vector<SecretName>> live_names(VaultId vault, SecretId after, std::size_t limit);
    // The same page with the version each secret stands for (a listing
    // with attributes: readdirplus).
    Result<std::vector<SecretVersion>> live_secrets_with_current(VaultId vault, SecretId after, std::size_t limit);
    Result<std::vector<SecretRow>> deleted_secrets(VaultId vault, SecretId after, std::size_t limit);
    // Secrets past their purge date, across all vaults.
    Result<std::vector<SecretRow>> purge_due(Micros now, std::size_t limit);
    // Live or soft-deleted secrets, keys and certificates in a vault (what
    // keeps rmdir from working).
    Result<std::int64_t> secret_count(VaultId vault);

    // The hot path: one query each. `number` nullopt means the version `S`
    // stands for: the highest enabled one, else the highest.
    Result<std::optional<SecretVersion>> secret_with_version(VaultId vault, std::string_view name,
                                                             std::optional<std::uint64_t> number);
    Result<std::optional<SecretVersion>> secret_with_current(SecretId id);
    Result<std::optional<SecretVersion>> secret_with_version_id(VersionId id);
    Result<std::optional<SealedRead>> sealed_for_read(VersionId id);

    Result<std::optional<VersionRow>> version(SecretId secret, std::uint64_t number);
    Result<std::optional<VersionRow>> version_by_id(VersionId id);
    // Changes at or after `since`, oldest first, at most `limit`.
    Result<std::vector<Change>> changes_since(Micros since, std::size_t limit);
    // Every current version with an expiry, soonest first.
    Result<std::vector<Expiring>> expiring();
    // The version `S` stands for: the highest enabled one, else the highest.
    Result<std::optional<VersionRow>> current_version(SecretId secret);
    Result<std::vector<VersionRow>> versions_of(SecretId secret);
    Result<std::vector<VersionEntry>> versions_in_vault(VaultId vault, VersionId after, std::size_t limit);
    Result<std::optional<SealedVersion>> sealed_version(VersionId id);
    Result<std::vector<Tag>> tags(VersionId version);

    // ---- keys and certificates (vault/store/store_objects.cpp) ---------------------
    Result<std::optional<ObjectRow>> object_by_name(VaultId vault, ObjectKind kind, std::string_view name);
    Result<std::optional<ObjectRow>> object_by_id(ObjectId id);
    Result<std::vector<ObjectRow>> objects(VaultId vault, ObjectKind kind);
    // Every key and certificate of every vault (the background task's round).
    Result<std::vector<ObjectRow>> all_objects();
    // `number` nullopt: the version the object's name stands for, the
    // highest enabled one, else the highest.
    Result<std::optional<ObjectVersionRow>> object_version(ObjectId object, std::optional<std::uint64_t> number);
    Result<std::optional<ObjectVersionRow>> object_version_by_id(ObjectVersionId id);
    Result<std::vector<ObjectVersionRow>> object_versions(ObjectId object);

    // This host's setting.
    Result<std::optional<std::string>> setting(std::string_view key);
    // The setting's value on every host that has it (several hosts share
    // what one of them did: monitor/expiry.hpp).
    Result<std::vector<std::string>> setting_on_all_hosts(std::string_view key);
    // The same, with the host each value belongs to.
    Result<std::vector<std::pair<std::int64_t, std::string>>> setting_by_host(std::string_view key);
    // This host's audit anchor.
    Result<std::optional<AuditAnchor>> audit_anchor();

    // ---- hosts (vault/store/store_hosts.cpp) ---------------------------------
    Result<std::vector<HostRow>> hosts();
    Result<std::optional<HostRow>> host_by_name(std::string_view name);
    Result<std::vector<KekGrantRow>> kek_grants_for(std::int64_t host);
    // Each vault KEK an enrolled host other than this one has no grant of.
    struct MissingGrant {
        std::string kek_id;
        std::int64_t host = 0;
    };
    Result<std::vector<MissingGrant>> missing_grants();
    Result<std::optional<std::vector<std::uint8_t>>> kek_check(std::string_view kek_id);

    // Runs `sql` (a whole-table SELECT) and hands every row to `f`
    // (vault/store/copy.hpp).
    Result<void> each_row(const std::string& sql, const std::function<Result<void>(const db::Query&)>& f);

    // SQLite: PRAGMA integrity_check; Errc::storage naming the first
    // problem. PostgreSQL: the schema is there (the server checks its own).
    Result<void> integrity_check();
    // SQLite: whether the open read every page (quick_check), or found the
    // file as its last clean close left it (integrity_stamp.hpp).
    bool pages_read_at_open() const { return pages_read_at_open_; }
    // A restart hands the database to a process that has it open already:
    // this store's close leaves no stamp (the other may change the file),
    // and the other drops whatever it cached before it took over.
    void leave_unstamped() { stamp_at_close_ = false; }
    void drop_caches() { changed(); }

    // ---- writes ------------------------------------------------------------
    class Transaction;
    using Work = std::function<Result<void>(Transaction&)>;

    // Runs `work` inside a write transaction, possibly together with other
    // callers' work (group commit). Returns when the transaction holding it
    // has committed (durably) or failed. If `work` fails, its changes are
    // rolled back and its error returned; others' work is unaffected.
    //
    // On a shared store a write is `bounded` by its request's deadline
    // (request_deadline): a server that does not answer by then fails it
    // with Errc::storage, or with Errc::in_doubt if it stopped answering at
    // COMMIT; the outcome of such a commit is looked up once the server
    // answers again and reported to on_in_doubt_resolved. Unbounded writes
    // (a rekey's one large transaction) wait as long as they take.
    Result<void> write(const Work& work, bool bounded = true);

    // Called, from the change feed's thread, with the outcome of a commit
    // that was in doubt: its transaction id, "committed", "rolled back" or
    // "unknown" (the server no longer knows it), and the message its write
    // failed with.
    using InDoubtResolved =
        std::function<void(std::int64_t xid, const std::string& outcome, const std::string& failed_with)>;
    void on_in_doubt_resolved(InDoubtResolved f);
    // Commits whose outcome is not known yet.
    std::size_t in_doubt() const;

    // Units queued behind the running batch (tests use it to build a batch).
    std::size_t pending_writes();

    struct Engine;  // how to connect, and what is the engine's own

private:
    Store(std::string path, std::unique_ptr<Engine> engine, std::unique_ptr<db::Connection> writer, bool read_only,
          StoreOptions options);
    // A new session; on a shared store, connecting gives up at `deadline`.
    Result<std::unique_ptr<db::Connection>> connect(
        bool read_only, std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);
    // When a request that starts now must have its answer from a shared
    // store: the staleness bound from now (nullopt: SQLite, no deadline).
    std::optional<std::chrono::steady_clock::time_point> request_deadline() const;
    // Raised when another host's change is seen: every cache is dropped.
    void changed();
    // Looks up the outcome of in-doubt commits on `c` (the feed's session,
    // after it confirmed the server answers).
    void resolve_in_doubt(db::Connection& c);
    // `bounded`: the request's deadline applies (request_deadline); bulk
    // reads (export, copy, integrity checks) wait as long as they take.
    template <class F>
    auto with_reader(F&& f, bool bounded = true) -> decltype(f(std::declval<db::Connection&>()));
    Result<std::optional<SecretVersion>> secret_with_version_uncached(VaultId vault, std::string_view name);
    Result<std::optional<SealedRead>> sealed_for_read_uncached(VersionId id);
    Result<std::optional<SecretVersion>> secret_with_version_id_uncached(VersionId id);
    // Runs `f` on a pooled reader connection (for vault/store/store_objects.cpp).
    Result<void> read(const std::function<Result<void>(db::Connection&)>& f);
    // What `f` (a query returning Result<T>) answers on a reader connection.
    template <class T, class F>
    Result<T> read_one(F&& f)
    {
        T out{};
        auto r = read([&](db::Connection& c) -> Result<void> {
            auto v = f(c);
            if (!v)
                return tl::unexpected(v.error());
            out = std::move(*v);
            return {};
        });
        if (!r)
            return tl::unexpected(r.error());
        return out;
    }
    Result<void> run_batch(std::deque<struct PendingWrite*>& batch);

    const std::string path_;
    const bool read_only_;
    // SQLite, read-write: stamp the file at close (integrity_stamp.hpp).
    bool stamp_at_close_ = false;
    bool pages_read_at_open_ = true;
    const StoreOptions options_;
    std::unique_ptr<Engine> engine_;
    const bool shared_;
    std::string host_;
    std::int64_t host_id_ = 0;
    std::unique_ptr<db::Connection> writer_;
    std::unique_ptr<Feed> feed_;
    std::mutex change_mutex_;
    std::function<void()> on_change_;
    struct InDoubt {
        std::int64_t xid;
        std::string failed_with;
    };
    mutable std::mutex in_doubt_mutex_;
    std::mutex in_doubt_report_mutex_;  // held while on_in_doubt_resolved_ runs
    std::vector<InDoubt> in_doubt_;
    InDoubtResolved on_in_doubt_resolved_;
    std::mutex leader_mutex_;
    std::unique_ptr<db::Connection> leader_;  // holds the advisory lock while this host leads
    std::chrono::steady_clock::time_point next_leader_try_{};

    std::mutex readers_mutex_;
    std::vector<std::unique_ptr<db::Connection>> idle_readers_;

    // The lookup cache: entries are valid while their generation is current.
    struct Cached {
        std::uint64_t generation = 0;
        std::optional<SecretVersion> value;
    };
    std::atomic<std::uint64_t> generation_{1};
    std::mutex cache_mutex_;
    std::unordered_map<std::string, Cached> by_name_;
    std::unordered_map<std::int64_t, Cached> by_id_;
    std::unordered_map<std::int64_t, Cached> by_version_;
    static constexpr std::size_t cache_limit = 4096;
    // The sealed rows opens read (sealed_for_read), bounded in bytes.
    std::unordered_map<std::int64_t, std::pair<std::uint64_t, SealedRead>> sealed_;
    std::size_t sealed_bytes_ = 0;
    static constexpr std::size_t sealed_limit = 32u << 20;
    template <class Map, class Key, class Load>
    Result<std::optional<SecretVersion>> cached(Map& map, const Key& key, Load&& load);

    std::mutex queue_mutex_;
    std::condition_variable queue_cv_;
    std::deque<struct PendingWrite*> queue_;
    bool leader_active_ = false;
};

// The writer's view inside Store::write(). Valid only during that call.
class Store::Transaction {
public:
    Transaction(db::Connection& conn, std::int64_t host, bool postgresql = false)
        : conn_(conn), host_(host), postgresql_(postgresql)
    {
    }

    Result<VaultId> insert_vault(const VaultRow& row, const PolicyRow& policy);
    Result<void> delete_vault(VaultId vault);
    Result<void> update_vault_settings(VaultId vault, int retention_days, bool purge_protection);
    Result<void> set_rekey_after(VaultId vault, int days);
    // The vault's KEK as this transaction sees it, the row locked until it
    // ends (PostgreSQL: FOR UPDATE when `exclusive`, else FOR SHARE; SQLite
    // has one writer): a version sealed under it cannot meet a rekey
    // half-way. Errc::not_found when the vault is gone.
    Result<std::string> vault_kek(VaultId vault, bool exclusive);
    Result<void> set_vault_kek(VaultId vault, std::string_view kek_id, Micros created);
    Result<void> set_vault_defaults(VaultId vault, const Ownership& defaults);
    // A secret's owner, group and mode (nullopt: the vault's default).
    Result<void> set_ownership(SecretId secret, std::optional<uid_t> owner, std::optional<gid_t> group,
                               std::optional<std::uint32_t> mode);
    Result<void> set_policy(VaultId vault, const PolicyRow& policy);

    // The row for `name`, created (without versions, by `by`) if missing.
    Result<SecretRow> ensure_secret(VaultId vault, std::string_view name, Micros now, uid_t by);
    // Reads inside the transaction (they see its own and its batch's writes).
    Result<std::optional<SecretRow>> secret(SecretId id);
    Result<std::optional<SecretRow>> secret_by_name(VaultId vault, std::string_view name);
    Result<std::optional<VersionRow>> version_by_id(VersionId id);
    Result<std::optional<VersionRow>> version(SecretId secret, std::uint64_t number);
    Result<std::vector<Tag>> tags(VersionId version);
    // The secret's next version number, taken in this transaction (so two
    // hosts writing one secret get two numbers, and a rollback gives it back).
    Result<std::uint64_t> allocate_version(SecretId secret);
    // Errc::busy when the vault's KEK is no longer version.kek_id.
    Result<VersionId> insert_version(const SealedVersion& version);
    Result<void> update_version(const VersionRow& row);
    Result<void> replace_tags(VersionId version, const std::vector<Tag>& tags);
    Result<void> set_deleted(SecretId secret, std::optional<Micros> deleted_at, std::optional<Micros> purge_at);
    // Removes a secret with all its versions and tags.
    Result<void> purge_secret(SecretId secret);
    // Live or soft-deleted secrets in a vault, as this transaction sees them.
    Result<std::int64_t> secret_count(VaultId vault);
    // Removes rows of names that never got a version (abandoned creates).
    Result<void> remove_empty_secrets(VaultId vault);
    // Inserts a restored secret row with its next_version counter.
    Result<SecretId> insert_secret(VaultId vault, std::string_view name, Micros created, std::uint64_t next_version);

    Result<void> set_setting(std::string_view key, std::string_view value);
    Result<void> set_audit_anchor(const AuditAnchor& anchor);

    // ---- keys and certificates (vault/store/store_objects.cpp) ---------------------
    // Errc::already_exists when the name is taken (see ObjectKind).
    Result<ObjectId> insert_object(const ObjectRow& row);
    Result<void> update_object_spec(ObjectId object, std::string_view spec);
    // Numbers the version in this transaction (the object's next_version)
    // and fills row.id and row.number.
    Result<void> insert_object_version(ObjectVersionRow& row);
    // Everything but the object and the number.
    Result<void> update_object_version(const ObjectVersionRow& row);
    Result<std::optional<ObjectVersionRow>> object_version(ObjectId object, std::optional<std::uint64_t> number);
    // Removes the object with all its versions.
    Result<void> delete_object(ObjectId object);

    // ---- every sealed DEK (vault/store/store_sealed.cpp), for moving to another token
    // or to a new KEK (vault/kek/rekey.hpp)
    Result<std::vector<SealedDek>> sealed_deks();
    // A page of one vault's sealed rows in `table`, by id after `after`,
    // with their ciphertext (a rekey encrypts each again).
    Result<std::vector<SealedRow>> sealed_rows(VaultId vault, SealedDek::Table table, std::int64_t after,
                                               std::size_t limit);
    // Writes `row` back: its KEK id, nonce, ciphertext and sealed DEK.
    Result<void> replace_sealed_row(const SealedRow& row);
    // Replaces a sealed DEK, keeping the one it replaces in an undo log
    // (the table migration_undo) in the same transaction.
    Result<void> replace_sealed_dek(const SealedDek& row, std::span<const std::uint8_t> sealed);
    // Puts back every sealed DEK the undo log holds, and empties it.
    Result<void> undo_sealed_deks();
    // Drops the undo log (the migration is finished).
    Result<void> forget_sealed_deks();
    Result<void> delete_setting(std::string_view key);
    // Every KEK id the rows name.
    Result<std::vector<std::string>> kek_ids();
    // "vault/.keys/NAME@N" of each version whose private key lives in the token.
    Result<std::vector<std::string>> token_key_holders();

    // ---- hosts and key transfer (vault/store/store_hosts.cpp) ----------------
    // Errc::already_exists when the name is taken.
    Result<std::int64_t> insert_host(const HostRow& row);
    Result<std::optional<HostRow>> host_by_name(std::string_view name);
    Result<std::vector<HostRow>> hosts();
    Result<void> enrol_host(std::int64_t host, Micros when, std::string_view by, std::span<const std::uint8_t> sig);
    // Removes the host with its grants, settings and audit anchor.
    Result<void> remove_host(std::int64_t host);
    Result<void> put_kek_grant(const KekGrantRow& row);
    Result<void> put_kek_check(std::string_view kek_id, std::span<const std::uint8_t> sealed);
    // A KEK no vault uses any more: its check value goes, and one host's
    // grant of it (each host drops its own once it destroyed the KEK).
    Result<void> delete_kek_check(std::string_view kek_id);
    Result<void> delete_kek_grant(std::string_view kek_id, std::int64_t host);
    Result<std::optional<std::vector<std::uint8_t>>> kek_check(std::string_view kek_id);
    // Every KEK vaults name (not the older ones versions may still use).
    Result<std::vector<std::string>> vault_kek_ids();

    // ---- raw rows, for copying a whole store to another engine (vault/store/copy.cpp)
    db::Connection& connection() { return conn_; }
    std::int64_t host() const { return host_; }

private:
    // What S serves at `at`: the version it stands for, and whether it is
    // readable then (enabled, within not_before and expires).
    struct Served {
        std::int64_t version = 0;
        bool readable = false;
        bool operator==(const Served&) const = default;
    };
    Result<Served> served(SecretId secret, Micros at);
    // Errc::busy unless the vault of the secret (or, `object`, the key or
    // certificate) `owner` uses `kek`: no row is ever sealed under a KEK
    // its vault no longer has (vault/kek/rekey.hpp).
    Result<void> require_vault_kek(bool object, std::int64_t owner, std::string_view kek);
    // secrets.changed = at, never backwards.
    Result<void> mark_changed(SecretId secret, Micros at);

    db::Connection& conn_;
    const std::int64_t host_;
    const bool postgresql_;
};

}  // namespace vaultfs::vault
