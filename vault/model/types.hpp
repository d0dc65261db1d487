// Small value types shared across vault/: strong ids, the caller, times.
#pragma once

#include <sys/types.h>

#include <compare>
#include <cstdint>

#include "policy/policy.hpp"

namespace vaultfs::vault {

// An id that cannot be mixed up with another kind of id or a size.
template <class Tag>
struct Id {
    std::int64_t value = 0;
    auto operator<=>(const Id&) const = default;
};

using VaultId = Id<struct VaultTag>;
using SecretId = Id<struct SecretTag>;
using VersionId = Id<struct VersionTag>;  // a version row, unique across all secrets

// Microseconds since the Unix epoch, UTC.
using Micros = std::int64_t;
Micros now_micros();

// Who is asking. `who` comes from the kernel (or SO_PEERCRED); the pid is
// recorded in audit records but never decides anything.
struct Caller {
    policy::Subject who;
    pid_t pid = 0;
};

// What `stat` shows of a secret: its owner, group and permission bits, the
// same for every caller. Metadata for the consumers that check it (ssh,
// PostgreSQL): the vault's policy alone decides who may do what.
struct Ownership {
    uid_t owner = 0;
    gid_t group = 0;
    std::uint32_t mode = 0400;  // permission bits only (0777)
    bool operator==(const Ownership&) const = default;
};

// Values above this are refused (docs/design.md §1).
inline constexpr std::size_t max_value_size = 25 * 1024;

}  // namespace vaultfs::vault
