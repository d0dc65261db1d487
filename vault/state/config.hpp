// config: the state directory's `vaultfs.conf`.
//
// Format: `key = value` lines; `#` starts a comment; blank lines are allowed;
// unknown keys and malformed values are errors naming the line. Relative
// paths are relative to the state directory. The token lines name where the
// keys live; moving to another token is `vaultfs token migrate`, which moves
// the keys and rewrites them (vault/state/token_migration.hpp).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "hsm/pkcs11/mechanisms.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/model/error.hpp"
#include "vault/audit/format.hpp"
#include "vault/audit/shipping.hpp"
#include "vault/hooks/hooks.hpp"

namespace vaultfs::vault {

using audit::AuditSync;

struct Config {
    std::string state_dir;  // absolute; not in the file

    std::string pkcs11_module;
    std::string token_label = "vaultfs";
    std::string pin_source = "file:pin";  // file:PATH | env:NAME | credential:NAME
    // Set in the environment before the module loads (SOFTHSM2_CONF=...),
    // as written: `${STATE}` stands for the state directory, wherever it is
    // now (environment() expands it), so a state directory can be moved or
    // copied whole.
    std::vector<std::pair<std::string, std::string>> module_env;
    std::vector<std::pair<std::string, std::string>> environment() const;
    // The constructions chosen from the token's mechanisms at init
    // (`token_seal`, `token_signature`; hsm/pkcs11/mechanisms.hpp). A state from
    // before they were recorded used the defaults, AES-GCM and ECDSA P-256.
    hsm::Schemes schemes;

    std::string database = "vault.db";
    // A PostgreSQL store shared by several hosts (postgresql://…; libpq's
    // multi-host form finds the primary); when set, `database` is unused.
    std::optional<std::string> store;
    // This host's name among them (hosts.name).
    std::string host;
    // Reads fail closed once the change feed has not confirmed freshness
    // for this long (vault/store/feed.hpp).
    std::chrono::milliseconds staleness_bound{2000};
    // Where the store is: the connection string, or the SQLite file's path.
    std::string store_location() const { return store ? *store : path_of(database); }
    std::string audit_file = "audit.jsonl";
    std::string audit_public_key = "audit-signing.pub.pem";
    // The management socket. The state directory is 0700, so by default only
    // root reaches it; put it elsewhere (e.g. /run/vaultfs/control.sock) to
    // let an admin group in. The daemon checks every caller (SO_PEERCRED).
    std::string control_socket = "control.sock";
    AuditSync audit_sync = AuditSync::interval;
    std::chrono::milliseconds audit_sync_interval{1000};
    // The signed coverage bound (audit/log.hpp): a checkpoint at least every
    // this many records and seconds; at most 10000 and 3600.
    std::uint64_t audit_checkpoint_records = 1000;
    std::chrono::seconds audit_checkpoint_interval{60};
    // Refusals of callers who hold nothing: one record per (uid, op,
    // result) per window, plus one counting the rest.
    std::chrono::seconds audit_coalesce_interval{10};
    // Below this much free space on the audit file's disk, those refusals
    // are counted, not written.
    std::uint64_t audit_reserve_mib = 64;

    // Per-uid limits on what open files hold in the daemon: EMFILE past the
    // handle limit, ENOMEM past the byte limit, for that uid only.
    std::size_t max_open_files_per_uid = 1024;
    std::size_t max_buffered_kib_per_uid = 1024;
    // Staging files (tools' temporary, swap and backup files, fs/fuse/staging.hpp)
    // nothing holds open are discarded after this long.
    std::chrono::seconds staging_idle{300};

    std::size_t dek_cache_entries = 4096;
    std::chrono::seconds dek_cache_ttl{300};  // 0 turns the cache off

    std::optional<std::string> admin_group;  // group name or gid; uid 0 is always an admin
    unsigned threads = 0;                    // FUSE worker threads; 0: "auto", by the CPUs (fs/daemon/daemon.cpp)
    std::size_t secure_heap_kib = 16 * 1024;  // locked memory for plaintext and DEKs

    // Retention is counted in days of this many milliseconds; tests shorten it.
    std::int64_t retention_day_ms = 86400000;
    std::chrono::seconds purge_interval{3600};  // how often the purge task runs
    // How often the background task runs key rotation policies and
    // certificate renewals (tests shorten it, with validities of seconds).
    std::chrono::seconds object_policy_interval{60};
    // `on_change` lines, in order (vault/hooks/hooks.hpp).
    std::vector<hooks::Hook> on_change;

    // Monitoring (docs/operations.md "Monitoring").
    // Every audit record also sent here (audit/shipping.hpp); unset: not shipped.
    std::optional<audit::SyslogTarget> audit_syslog;
    int audit_syslog_facility = 21;  // local5
    std::size_t audit_syslog_queue = 10000;
    // The metrics (monitor/metrics.hpp) written here every metrics_interval,
    // for node_exporter's textfile collector; empty: not written.
    std::string metrics_textfile;
    std::chrono::seconds metrics_interval{15};
    // Near-expiry events this many days before an expiry (monitor/expiry.hpp),
    // longest first; days of retention_day_ms, as retention is.
    std::vector<std::int64_t> expiry_warn_days{30, 7};
    std::chrono::seconds expiry_check_interval{60};
    // `on_expiry` lines: hooks fired by near-expiry and expired events.
    std::vector<hooks::Hook> on_expiry;

    // An absolute path for a file named in the config.
    std::string path_of(const std::string& name) const;
};

inline constexpr const char* config_file_name = "vaultfs.conf";

// Parses config text (pure; the fuzz target drives this).
Result<Config> parse_config(std::string_view text, const std::string& state_dir);
// Reads STATE/vaultfs.conf. The embedded token's softhsm2.conf (the one
// `vaultfs init` wrote, marked so) is kept pointing at STATE/tokens: SoftHSM2
// reads only absolute paths, and the state may have been moved.
Result<Config> load_config(const std::string& state_dir);
// The embedded token's softhsm2.conf for a state directory.
std::string embedded_softhsm_conf(const std::string& state_dir);
// The text `vaultfs init` writes.
std::string render_config(const Config& config);

// Reads the token PIN from the configured source into locked memory. A PIN
// file must be a regular file of mode 0600 (or stricter) owned by the
// current user. The trailing newline, if any, is not part of the PIN.
Result<hsm::SecureBuffer> read_pin(const Config& config);

}  // namespace vaultfs::vault
