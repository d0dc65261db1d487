// audit/reader: reading the trail back, for `vaultfs audit tail` and
// `vaultfs audit export` (docs/audit.md "Reading the audit: `audit tail` and `audit export`").
//
// The trail is the live file and the files rotated away from it (logrotate's
// AUDIT.1, AUDIT.2, ... or AUDIT-DATE, uncompressed), which are put in chain
// order by the seq of their first record.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vault/audit/format.hpp"
#include "vault/model/error.hpp"

namespace vaultfs::vault::audit {

// The rotated files beside `live`, oldest first, then `live`.
std::vector<std::string> trail_files(const std::string& live);

struct Filter {
    std::optional<Micros> since, until;
    std::vector<std::string> vaults;
    std::vector<uid_t> uids;
    std::vector<std::string> ops;
    bool matches(const Record& r) const;
};

// One record for people: time, seq, op, decision and result, who, what.
std::string human(const Record& r);

// The records of `files` (chain order) from the last signature at or before
// the first record at or after `since` through the first signature at or
// after the last record at or before `until`: every record of the range with
// the signatures that cover it, which `audit verify --slice` checks.
struct Slice {
    std::vector<std::string> lines;  // without newlines
    std::uint64_t in_range = 0;      // records within since..until
    std::uint64_t first_seq = 0, last_seq = 0;
    // Records of the range after the last signature, left out: the next
    // checkpoint covers them (within the coverage bound).
    std::uint64_t uncovered = 0;
};
Result<Slice> export_slice(const std::vector<std::string>& files, std::optional<Micros> since,
                           std::optional<Micros> until);

// A time on the command line: what records carry (2026-12-04T10:00:00.000000Z),
// to the second (2026-12-04T10:00:00Z), a day (2026-12-04), or a duration ago
// (30s, 10m, 2h, 7d).
std::optional<Micros> parse_when(const std::string& text, Micros now);

}  // namespace vaultfs::vault::audit
