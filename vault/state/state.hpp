// state: a vaultfs state directory — creating one (`vaultfs init`) and
// opening one for the daemon or the management commands.
//
//   STATE/              mode 0700
//     vaultfs.conf      module path, token label, PIN source, tuning
//     softhsm2.conf     where the embedded SoftHSM2 keeps its token  } the embedded
//     tokens/           the SoftHSM2 token "vaultfs" (KEKs, audit     } default only;
//                       signing key)                                 } an adopted token
//     pin               the token's user PIN, mode 0600, random      } lives elsewhere
//     so-pin            its Security Officer PIN, mode 0400, random  } (move it offline)
//     vault.db          SQLite: vaults, policies, secrets, versions (ciphertext)
//     audit.jsonl       the audit trail
//     audit-signing.pub.pem  public half of the audit signing key
//     lock              held by the process that serves the state (its pid)
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"
#include "hsm/pkcs11/token_evp.hpp"
#include "vault/audit/log.hpp"
#include "vault/audit/shipping.hpp"
#include "vault/monitor/expiry.hpp"
#include "vault/monitor/metrics.hpp"
#include "vault/certificates/certificates.hpp"
#include "vault/keys/key_vault.hpp"
#include "vault/objects/object_backup.hpp"
#include "vault/state/config.hpp"
#include "vault/crypto/dek_cache.hpp"
#include "vault/model/error.hpp"
#include "vault/secrets/secret_service.hpp"
#include "vault/state/lock.hpp"
#include "vault/hosts/enrolment.hpp"
#include "vault/kek/rekey.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault {

struct InitOptions {
    std::string module_path = "/usr/lib/softhsm/libsofthsm2.so";
    std::optional<std::string> admin_group;
    // Both set: adopt this already-initialised token (its label, and a file
    // holding its user PIN, mode 0600) instead of making a SoftHSM2 token.
    std::optional<std::string> token_label;
    std::optional<std::string> pin_file;
    // A PostgreSQL store (docs/hosts.md "Several hosts"): `init` makes it and this
    // host its first; with `join`, the store exists and this host asks to
    // join it (vaultfs join request).
    std::optional<std::string> store;
    bool join = false;
    std::string host;  // this host's name in the store; empty: the system's host name
    // The embedded token's Security Officer PIN is random and written here
    // (mode 0400; empty: STATE/so-pin) for the admin to move offline: the
    // key ceremony needs it (docs/hosts.md "Several hosts"); the daemon never reads
    // it. An adopted token's SO PIN is its owner's, and never written.
    std::string so_pin_file;
};

// Creates a state in `dir` (made if missing, or empty): by default the
// embedded SoftHSM2 token in the directory; with a token label and PIN file,
// inside a token its owner already initialised. The token's mechanisms
// decide the constructions (hsm/pkcs11/mechanisms.hpp), recorded in vaultfs.conf.
// Refuses an existing state and changes nothing then. Returns what it made,
// one line per item, for the user.
// `request`: for a join, the join request document (to send to an enrolled host).
Result<std::vector<std::string>> init_state(const std::string& dir, const InitOptions& options,
                                            std::string* request = nullptr);

// Writes `path` whole or not at all (a new file, fsynced, renamed over it).
Result<void> replace_file(const std::string& path, const std::string& text, mode_t mode);

// How a state's config opens its store (one-shot commands do not follow the feed).
StoreOptions store_options(const Config& config, bool follow);

// A state directory opened for use. Members are destroyed in reverse order
// of declaration, so the service goes before what it uses.
class State {
public:
    // take_over: as serve, for the new process of a restart (fs/daemon/restart/),
    // with the audit log opened but not started: start_audit() starts it
    // once the old process has written its shutdown record.
    enum class Purpose { serve, take_over, inspect };

    // Takes the state's lock (state_lock.hpp), reads the config and PIN,
    // logs in to the token, opens the database (quick_check) and, for
    // `serve`, the audit log. Every failure comes with a one-line message
    // that says what to do.
    // `lock`: the state's lock when the caller took it already (to fail
    // fast, before other start-up work).
    static Result<std::unique_ptr<State>> open(const std::string& dir, Purpose purpose,
                                               std::optional<StateLock> lock = std::nullopt);
    ~State();

    // Writes the audit log's shutdown record. Call once before exit.
    void close();
    // take_over: the audit log's check and `start` record (with `notes`),
    // and caches dropped (the old process wrote until now).
    Result<void> start_audit(audit::Log::Notes notes);

    Config config;
    std::optional<StateLock> lock;
    std::optional<gid_t> admin_gid;
    std::unique_ptr<hsm::Pkcs11KeyService> keys;
    std::unique_ptr<Store> store;
    // Before the audit log, which feeds them (null for `inspect`):
    std::unique_ptr<monitor::Metrics> metrics;
    std::unique_ptr<audit::Shipper> shipper;  // null unless audit_syslog is set
    std::unique_ptr<audit::Log> audit;  // null for `inspect`
    std::unique_ptr<monitor::ExpiryWatch> expiry;  // null for `inspect`
    std::unique_ptr<DekCache> deks;
    SystemNameResolver names;
    std::unique_ptr<Core> core;              // null for `inspect`
    std::unique_ptr<ObjectBackup> object_backup;  // keys and certificates in backups; null for `inspect`
    std::unique_ptr<SecretService> service;  // null for `inspect`
    std::unique_ptr<hsm::TokenEvp> evp;      // libp11 over `keys`; null for `inspect`
    std::unique_ptr<keys::KeyVault> key_vault;                  // null for `inspect`
    std::unique_ptr<certificates::Certificates> certificates;  // null for `inspect`
    std::unique_ptr<hosts::Enrolment> enrolment;               // a PostgreSQL store's ceremony; else null
    std::unique_ptr<kek::Rekey> rekey;                         // null for `inspect`
    // Where this state's new KEKs may go: a shared store's token, when it
    // enforces CKA_WRAP_WITH_TRUSTED, makes them movable under trusted keys.
    hsm::KekReach kek_reach = hsm::KekReach::this_token;

private:
    State() = default;
    // KEKs granted to this host are imported whenever the feed moves, and
    // what it holds is granted to trusted hosts that lack it.
    void watch_grants();
    // At start (serve, or a take-over's audit start): the token's trusted
    // keys audited, grants imported and handed on, an interrupted rekey
    // finished, and the KEKs that need a rekey named.
    void start_keys();
    bool closed_ = false;
};

// The database setting naming the audit signing key's CKA_ID.
inline constexpr const char* audit_signing_key_setting = "audit_signing_key";

// The audit key's public half as the state's token holds it (PEM), for
// `audit verify --state`: the file in the state directory may have been
// replaced. Needs the PIN; the database is opened read-only.
Result<std::string> token_audit_public_key(const Config& config);

// The absolute, normalised form of a directory path (need not exist).
std::string absolute_path(const std::string& path);

}  // namespace vaultfs::vault
