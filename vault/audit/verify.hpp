// audit/verify: checks audit files, as `vaultfs audit verify` does and as the
// daemon does before it appends to a file it finds at start.
//
// What is checked, record by record, oldest first:
//  - each line is a record (audit/format.hpp) whose hash matches its bytes;
//  - seq rises by one and prev is the previous record's hash (a rotated file
//    begins with a signed `rotate` record linked to the file before it);
//  - every op is known, and signed exactly when it is one of the log's own;
//  - every signature verifies with the public key;
//  - coverage: between two signed records lie at most `bound_records`
//    unsigned records, none more than `bound_seconds` after the first of
//    them (the bound the opening signed record declares, never more than
//    audit::max_bound), and each signed record's `records` counts them. The
//    records after the last signature are the unsigned tail: reported with
//    its length, and a failure when it exceeds the bound. (The writer signs
//    before it would break the bound, running or not, so a longer tail is
//    never the daemon's.) After a `shutdown` only a signed `start` or
//    `rotate` may follow;
//  - the database anchor, when given: its signature, that the chain reaches
//    the anchored record with the anchored hash (a cut-off tail), and that
//    the file holding it begins where the anchor says (a replaced file);
//  - unproven records: records after the last signature and the last
//    anchor of a daemon that stopped uncleanly (kill -9, a crash) are
//    vouched for by nothing: anyone who can write the file could have
//    chained them. The next `start` names them (`unproven_from`,
//    `unproven_through`), and so does verify with `stopped` while the daemon
//    is down. Each range is a failure until a signed `acknowledge` record
//    (`through` >= its end) says an admin examined it;
//  - time never goes backwards from one record to the next;
//  - breaks: a signed `start` (or `rotate`) record carrying `break` says the
//    daemon found the chain broken when it started (or its file removed); it
//    is reported, always, as a failure.
//    Verification picks up again at such a record after a bad stretch, so
//    a later problem is still found.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vault/audit/format.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit {

struct VerifyOptions {
    std::optional<AuditAnchor> anchor;  // from the database
    bool anchor_expected = false;       // a state was given: no anchor is a failure
    // A slice `vaultfs audit export` wrote: it begins with a signed record,
    // where trust starts (its signature is checked), and must end with one:
    // every record in it lies between two signatures.
    bool slice = false;
    // The state's daemon is not running: with an anchor that is not clean,
    // the records after the last signature and the anchor are unproven.
    bool stopped = false;
};

struct VerifyReport {
    bool ok = false;
    std::uint64_t records = 0;
    std::uint64_t signed_records = 0;
    // The first problem: file, 1-based line (0: not about one line), and why.
    std::string file;
    std::uint64_t line = 0;
    std::string problem;
    std::vector<std::string> problems;  // every problem, the first included
    std::vector<std::string> warnings;  // e.g. a torn last record after a crash
    std::vector<std::string> breaks;    // breaks the daemon recorded at start
    // Records after the last signature, and how long after the first of them
    // the last one was written.
    std::uint64_t unsigned_tail = 0;
    std::uint64_t tail_seconds = 0;
    std::uint64_t last_signed_seq = 0;
    bool anchor_reached = false;
    // Ranges of seq no signature vouches for, written around an unclean
    // stop and not acknowledged (`vaultfs audit acknowledge`): failures.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> unproven;
};

// Checks files given oldest first.
VerifyReport verify_files(const std::vector<std::string>& files, const std::string& public_key_pem,
                          const VerifyOptions& options);

// The daemon's check before it appends: `lines` are the last lines of
// `file`, beginning with the last signed record, which starts the chain of
// trust (its signature is checked here). `first_line` is the line number of
// lines[0] in the file (0 when unknown).
VerifyReport verify_tail(const std::string& file, const std::vector<std::string>& lines, std::uint64_t first_line,
                         const std::string& public_key_pem, const VerifyOptions& options);

}  // namespace vaultfs::vault::audit
