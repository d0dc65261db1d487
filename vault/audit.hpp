// audit: the tamper-evident trail of every access (DESIGN §5).
//
// One JSON object per line in STATE/audit.jsonl. Each record carries `seq`,
// `prev` (the previous record's hash) and `hash` = SHA-256 over the
// canonical JSON of the record without `hash` (keys sorted, no spaces), so
// editing, deleting or reordering a line breaks the chain. Records that
// mark the life of the log — `init`, `start`, `checkpoint` (every N records
// or T seconds), `rotate` and `shutdown` — also carry `sig`: an ECDSA P-256
// signature by a key that never leaves the token, over the SHA-256 of the
// record without `hash` and `sig`. The public half is in
// STATE/audit-signing.pub.pem, so verification needs no token.
//
// The chain head is anchored in the database (seq + hash) after each sync,
// and at shutdown; `verify` compares the file against it, which is how a
// cut-off tail is caught. What a crash leaves: every record whose operation
// was answered was written to the file (the write comes before the reply);
// with audit_sync=interval the last interval's records may be lost on power
// loss, and a record being written at the moment of a crash can be torn.
// The next start truncates a torn tail and says so in its `start` record.
//
// Fail closed: append() returns Errc::audit_unavailable when the record
// cannot be written (disk full, I/O error, file gone and not re-creatable);
// the caller must then fail the operation without serving any secret byte.
// The writer keeps trying on later appends and serves again once writable.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "hsm/key_service.hpp"
#include "vault/config.hpp"
#include "vault/error.hpp"
#include "vault/types.hpp"

namespace vaultfs::vault {

class Store;

// One operation to record. Secret values never appear here.
struct AuditEvent {
    std::string_view op;                 // "get", "set", "commit", "list", "delete", ...
    const Caller* caller = nullptr;      // nullptr: the daemon itself
    std::string_view vault;              // empty: not about a vault
    std::string_view secret;             // empty: not about a secret
    std::optional<std::uint64_t> version;
    bool allowed = false;
    std::string_view rule;               // the policy line that decided, or "admin", "default-deny"
    std::string_view result;             // "ok" or an errno name
    std::optional<std::uint64_t> bytes;  // plaintext bytes served or stored
    std::string_view reason;             // why it failed, when that is not obvious from `result`
    std::string_view attribute;          // for xattr and settings operations
};

// Signs checkpoint digests; implemented over the token.
struct AuditSigner {
    hsm::KeyService* keys = nullptr;
    hsm::KeyId key;
};

class AuditLog {
public:
    struct Options {
        std::string path;
        AuditSync sync = AuditSync::interval;
        std::chrono::milliseconds sync_interval{1000};
        std::uint64_t checkpoint_records = 1000;
        std::chrono::seconds checkpoint_interval{60};
    };

    // Creates a new log whose first record is a signed `init` record.
    static Result<void> create(const std::string& path, const AuditSigner& signer);

    // Opens an existing log for appending: finds the chain head from the
    // file's last complete record (truncating a torn tail), and writes a
    // signed `start` record. `anchor_store` receives the chain head after
    // each sync (may be null in tests).
    static Result<std::unique_ptr<AuditLog>> open(Options options, AuditSigner signer, Store* anchor_store);

    ~AuditLog();
    AuditLog(const AuditLog&) = delete;
    AuditLog& operator=(const AuditLog&) = delete;

    // Writes one record before returning. Errc::audit_unavailable if it
    // could not be written; the log is then left as it was.
    Result<void> append(const AuditEvent& event);

    // Asks for the file to be reopened at its path (SIGHUP, logrotate). Safe
    // to call from a signal handler.
    void request_reopen() { reopen_requested_.store(true, std::memory_order_relaxed); }

    // Writes a signed `shutdown` record, syncs, and anchors it as a clean
    // end. Called once at unmount.
    Result<void> close();

    // True while records are being written.
    bool healthy() const { return healthy_.load(std::memory_order_relaxed); }

    std::uint64_t last_seq() const;

private:
    explicit AuditLog(Options options, AuditSigner signer, Store* anchor_store);
    using ExtraFields = std::vector<std::pair<std::string, std::variant<std::int64_t, bool>>>;
    Result<void> append_locked(const AuditEvent& event, bool signed_record, const ExtraFields& extra);
    Result<void> append_fields_locked(struct RecordFields fields, bool signed_record, const ExtraFields& extra);
    Result<void> write_line_locked(const std::string& line);
    Result<void> reopen_locked();
    Result<void> reopen_if_needed_locked();
    Result<void> checkpoint_locked();
    void background();
    void sync_and_anchor(bool clean);

    Options options_;
    AuditSigner signer_;
    Store* anchor_store_;

    mutable std::mutex mutex_;
    int fd_ = -1;
    off_t size_ = 0;  // bytes of complete records in the file
    std::uint64_t seq_ = 0;
    std::string head_;  // hash of the last record
    std::uint64_t since_checkpoint_ = 0;
    std::chrono::steady_clock::time_point last_checkpoint_;
    std::uint64_t synced_seq_ = 0;
    std::string synced_head_;
    bool dirty_ = false;

    std::atomic<bool> reopen_requested_{false};
    std::atomic<bool> healthy_{true};

    std::mutex stop_mutex_;
    std::condition_variable stop_cv_;
    bool stopping_ = false;
    std::thread worker_;
};

// ---- verification -------------------------------------------------------------

struct VerifyReport {
    bool ok = false;
    std::uint64_t records = 0;
    std::uint64_t checkpoints = 0;
    // When !ok: the file and 1-based line of the first bad record, and why.
    std::string file;
    std::uint64_t line = 0;
    std::string problem;
    std::vector<std::string> warnings;  // e.g. a torn last record after a crash
};

// Checks files given oldest first: sequence, chain, signatures and the links
// between rotated files. `public_key_pem` verifies signatures. When
// `anchor` is given, the chain must reach it (tail truncation).
VerifyReport verify_audit(const std::vector<std::string>& files, const std::string& public_key_pem,
                          const std::optional<struct AuditAnchor>& anchor);

// PEM (SubjectPublicKeyInfo) for an uncompressed P-256 point.
Result<std::string> p256_public_key_pem(const std::vector<std::uint8_t>& point);

}  // namespace vaultfs::vault
