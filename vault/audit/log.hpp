// audit/log: the writer of the tamper-evident trail of every access (docs/design.md §5).
//
// One record per line in STATE/audit.jsonl, in the form of audit/format.hpp:
// each record's hash covers its exact bytes and the previous record's hash,
// so editing, deleting or reordering a line breaks the chain.
//
// Signed coverage. The log's own records -- `init`, `start`, `checkpoint`,
// `rotate`, `shutdown` -- are signed by a key that never leaves the token,
// and the writer keeps every other record within a bounded distance of a
// signature: after `bound.records` unsigned records, or once the oldest
// unsigned record is `bound.seconds` old, a signed checkpoint is written
// before anything else. If that checkpoint cannot be signed, append() fails
// (fail closed) rather than write records no signature will cover. A
// rotated-away file ends with a checkpoint of its own.
//
// The anchor. After each sync the chain head (seq, hash, time) is signed by
// the token and stored in the database; at shutdown the signed `shutdown`
// record is anchored as a clean end. An edited anchor fails its signature;
// a file cut back behind the anchor is caught.
//
// Verify before continuing. open() checks the file from its last signature
// to its end, and against the anchor, before it appends: records are parsed
// and hashed, the chain and the coverage bound checked (audit/verify.hpp).
// If all holds, its signed `start` record covers the unsigned tail. If not,
// it does not bless the file: the `start` record opens a new signed segment
// and records the break (`break`, `break_line`, `trusted_seq`), which
// `audit verify` reports for ever. Either way the daemon serves.
//
// Every refusal is coalesced (audit/coalescer.hpp): a caller writes at most
// two records per (uid, vault, secret, op, result) per `coalesce_window`
// (the first at once, then a `repeats` count), and at most 32 such groups
// at once. Refusals a caller who holds nothing where it knocked can repeat
// at will (Event::coalesce) -- or a uid past its open-file limits -- are
// grouped by (uid, op, result) alone, their names cut to 64 bytes. When the
// audit file's disk has less than `reserve_bytes` free, refusals are not
// written but counted; the count goes into the next signed record
// (`dropped`), and allowed operations keep their room.
//
// What a crash leaves: every record whose operation was answered was written
// (the write comes before the reply); with audit_sync=interval the last
// interval's records may be lost on power loss, and a record being written
// at the moment of a crash can be torn. The next start truncates a torn tail
// and says so in its `start` record (`torn_bytes`).
//
// Fail closed: append() returns Errc::audit_unavailable when the record
// cannot be written (disk full, I/O error, file gone and not re-creatable,
// a due signature refused by the token); the caller must then fail the
// operation without serving any secret byte. The writer keeps trying on
// later appends and serves again once it can.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "hsm/key_service.hpp"
#include "vault/audit/coalescer.hpp"
#include "vault/audit/format.hpp"
#include "vault/model/error.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {
class Store;
}

namespace vaultfs::vault::audit {

// One operation to record. Secret values never appear here.
struct Event {
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
    std::string_view from;               // a rename's source name
    // A refusal the caller can repeat at will: it holds nothing where it
    // knocked (no permission in the vault; a non-admin at the mount root or
    // on the control socket), or its uid is past a per-uid limit. Coalesced;
    // see the header comment.
    bool coalesce = false;
};

// The token-held key that signs records and anchors.
struct Signer {
    hsm::KeyService* keys = nullptr;
    hsm::KeyId key;
};

class Log {
public:
    struct Options {
        std::string path;
        AuditSync sync = AuditSync::interval;
        std::chrono::milliseconds sync_interval{1000};
        Bound bound;
        std::chrono::seconds coalesce_window{10};
        std::uint64_t reserve_bytes = std::uint64_t{64} << 20;
        // The time records carry and the bound is kept in (tests set it).
        std::function<Micros()> clock;
        // open() only prepares: nothing is read or written until start().
        // A restart's new process opens its state while the old one still
        // writes the file (fs/daemon/restart/), and starts once it has stopped.
        bool defer_start = false;
        // Who else learns of the trail, neither of which may block: the
        // metrics count every event appended (written or coalesced), before
        // the writer's lock; shipping gets each record's line once it is in
        // the file, under that lock (monitor/metrics.hpp, audit/shipping.hpp).
        std::function<void(const Event&)> on_event;
        std::function<void(std::string_view line)> on_record;
    };
    // Fields a `start` record carries besides its own (a restart's kind).
    using Notes = std::vector<std::pair<std::string, Body::Value>>;

    // Creates a new log whose first record is a signed `init` record, and
    // anchors it in `anchor_store` (may be null in tests).
    static Result<void> create(const std::string& path, const Signer& signer, Bound bound, Store* anchor_store);

    // Opens an existing log for appending, after the check described above,
    // and writes its signed `start` record (`rotate` for an empty file,
    // continuing from the anchor). `anchor_store` receives the chain head
    // after each sync (may be null in tests: no anchor checks then).
    static Result<std::unique_ptr<Log>> open(Options options, Signer signer, Store* anchor_store);
    // The check and the `start` record of a log opened with defer_start.
    // Until then appends fail (fail closed), and close() writes nothing.
    Result<void> start(Notes notes);

    ~Log();
    Log(const Log&) = delete;
    Log& operator=(const Log&) = delete;

    // Records one event before returning. Errc::audit_unavailable if it
    // could not be written; the log is then left as it was. A coalesced
    // refusal that is only counted returns success.
    Result<void> append(const Event& event);

    // Asks for the file to be reopened at its path (SIGHUP, logrotate). Safe
    // to call from a signal handler.
    void request_reopen() { reopen_requested_.store(true, std::memory_order_relaxed); }

    // A signed `acknowledge` record: the admin `uid` examined the records
    // through seq `through` that an unclean stop left unproven (verify
    // reports them until such a record covers them). Errc::invalid_argument
    // for a seq this trail has not reached.
    Result<void> acknowledge(std::uint64_t through, std::uint32_t uid);

    // Writes pending `repeats` records and a signed `shutdown` record,
    // syncs, and anchors it as a clean end. Called once at unmount; later
    // appends fail.
    Result<void> close();

    // Hands signing over to `next` (`vaultfs token migrate`, the state moving
    // to another token): a `handover` record signed by the current key names
    // the old and new public keys and `token` (the new token); a checkpoint
    // signed by `next` confirms it; the database anchor is re-signed by
    // `next`. From then on `next` signs. `audit verify`, given the new key,
    // follows the hand-overs back (verify.hpp).
    Result<void> hand_over(Signer next, const std::string& token);

    // The background duties, now: closed coalescing windows, a checkpoint
    // that is due, sync and anchor. (The writer's own thread runs them
    // every sync interval; tests call this to step.)
    void tick();

    // True while records are being written.
    bool healthy() const { return healthy_.load(std::memory_order_relaxed); }
    // Whether the records of an operation could be written now: the log is
    // healthy and its disk has room for them. Errc::audit_unavailable (with
    // the reason) otherwise. A check ahead of the work, for write() to fail
    // early; append() still decides.
    Result<void> ready();

    struct Stats {
        std::uint64_t last_seq = 0;
        std::uint64_t coalesced = 0;  // coalesced refusals counted, not written
        std::uint64_t dropped = 0;    // such records not written for lack of space
        bool low_space = false;
    };
    Stats stats() const;
    std::uint64_t last_seq() const { return stats().last_seq; }

private:
    struct Fields;
    using Extras = Notes;

    Log(Options options, Signer signer, Store* anchor_store);
    Result<void> start_locked(Extras extras);
    Result<void> write_locked(const Fields& f, Micros now, bool signed_record, const Extras& extras);
    Result<void> covered_write_locked(const Fields& f, Micros now);
    Result<void> signed_locked(std::string_view op, Micros now, Extras extras = {});
    Result<void> ensure_covered_locked(Micros now);
    Result<void> summary_locked(const RefusalCoalescer::Summary& s, Micros now);
    bool low_on_space_locked(Micros now);
    Result<void> write_line_locked(const std::string& line);
    Result<void> append_fields(Fields& f, const Event& event);
    void write_summaries_locked(std::vector<RefusalCoalescer::Summary> more, Micros now);
    Result<void> reopen_if_needed_locked();
    Result<void> reopen_locked(bool removed);
    void duties_locked(Micros now);
    void background();
    void sync_and_anchor(bool clean);

    Options options_;
    Signer signer_;
    Store* anchor_store_;

    mutable std::mutex mutex_;
    int fd_ = -1;
    off_t size_ = 0;  // bytes of complete records in the file
    std::uint64_t seq_ = 0;
    std::string head_;  // hash of the last record
    std::uint64_t file_start_ = 1;  // seq of the first record of the current file
    std::uint64_t unsigned_ = 0;  // records since the last signature
    Micros first_unsigned_ = 0;   // time of the first of them
    std::uint64_t dropped_since_signed_ = 0;
    std::uint64_t dropped_total_ = 0;
    std::uint64_t coalesced_total_ = 0;
    RefusalCoalescer coalescer_;
    std::vector<RefusalCoalescer::Summary> unwritten_;  // summaries to try again
    bool low_space_ = false;
    Micros space_checked_ = 0;
    Micros last_time_ = 0;        // of the last record written: no record is older
    bool clock_behind_ = false;   // the clock is behind last_time_ (said once)
    Micros identity_checked_ = 0;  // when the path was last compared with the open file
    bool dirty_ = false;
    bool closed_ = false;
    bool started_ = false;

    std::mutex anchor_mutex_;  // one anchor write at a time, newest last
    std::uint64_t anchored_seq_ = 0;
    std::atomic<bool> anchor_due_{false};  // a new file's start to anchor at once

    std::atomic<bool> reopen_requested_{false};
    std::atomic<bool> healthy_{true};

    std::mutex stop_mutex_;
    std::condition_variable stop_cv_;
    bool stopping_ = false;
    std::thread worker_;
};

}  // namespace vaultfs::vault::audit
