// audit/coalescer: bounds what refusals can write. Any caller can loop on a
// refused operation as fast as the kernel lets it; each refusal must leave a
// trace, but not one record each.
//
// Refusals are grouped by (uid, vault, secret, op, result, reason) -- for callers
// who hold nothing where they knocked, whose names are their own invention,
// by (uid, op, result) alone. The first of a group is written at once and
// opens a window; repeats inside the window are only counted; when the
// window ends, one `repeats` record carries the count, and the next refusal
// of the group is written at once again. So a group writes at most two
// records per window, whatever the rate. A uid has at most `per_uid` groups
// open (more names are counted in its own overflow group: vault and secret
// "*"), and at most `capacity` groups are tracked in all (refusals of
// further groups are counted in one overflow group: uid -1, op "*", result
// "*").
//
// Pure bookkeeping: the caller supplies the time and writes the records.
// Not synchronised: the audit writer calls it under its own lock.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "vault/model/types.hpp"

namespace vaultfs::vault::audit {

class RefusalCoalescer {
public:
    struct Key {
        std::int64_t uid = 0;
        std::string op;
        std::string result;
        std::string vault;   // empty for callers who hold nothing
        std::string secret;
        std::string reason;  // why, where the result alone does not say
        auto operator<=>(const Key&) const = default;
    };
    // What a closed window held beyond its first refusal.
    struct Summary {
        Key key;
        std::int64_t gid = 0;
        std::uint64_t count = 0;
        Micros first = 0;
        Micros last = 0;
    };

    RefusalCoalescer(Micros window, std::size_t capacity = 4096, std::size_t per_uid = 32);

    // One refusal at `now`. `write` says whether to write it in full;
    // `flush` is a summary to write first (its window had ended).
    struct Verdict {
        bool write = false;
        std::optional<Summary> flush;
    };
    Verdict admit(const Key& key, std::int64_t gid, Micros now);

    // Summaries of windows that have ended by `now` (all of them when
    // `everything`, at shutdown); their groups are forgotten.
    std::vector<Summary> drain(Micros now, bool everything = false);

    std::size_t groups() const { return groups_.size(); }

private:
    struct Group {
        Micros opened = 0;
        std::int64_t gid = 0;
        std::uint64_t count = 0;  // repeats since the first
        Micros first = 0;
        Micros last = 0;
    };
    std::map<Key, Group>::iterator forget(std::map<Key, Group>::iterator it);

    const Micros window_;
    const std::size_t capacity_;
    const std::size_t per_uid_;
    std::map<Key, Group> groups_;
    std::map<std::int64_t, std::size_t> open_per_uid_;
};

}  // namespace vaultfs::vault::audit
