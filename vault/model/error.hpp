// vault errors: domain outcomes as values. A denial or a missing secret is a
// normal outcome (audited like any other), not an exception. The fs layer
// turns these into errno values in exactly one place (fs/errno_map).
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include <tl/expected.hpp>

namespace vaultfs::vault {

enum class Errc {
    not_found,          // no such vault, secret or version (or not visible to the caller)
    already_exists,     // the name is taken, also by a soft-deleted secret
    invalid_argument,   // a malformed name, value, attribute or policy
    too_large,          // a value over 25 KiB
    access_denied,      // the policy does not grant the permission
    disabled,           // the version is disabled
    not_valid_now,      // before not_before or after expires
    not_permitted,      // the operation is never allowed (link, chmod...) or purge protection
    read_only,          // S@N and other read-only objects
    not_empty,          // a vault that still holds secrets
    integrity,          // ciphertext or sealed DEK failed authentication
    key_unavailable,    // the token could not be used
    storage,            // the database failed
    no_space,           // the database's disk is full
    audit_unavailable,  // the audit record could not be written: fail closed
    out_of_memory,      // the locked heap is exhausted
    busy,               // a resource is in use
    too_many_open,      // the caller's uid holds as many open files as it may
    stale,              // a name's inode stands for a version that is no longer current
    no_attribute,       // the attribute is not set
    not_fresh,          // a shared store this host cannot confirm it is current with (fail closed)
    in_doubt,           // the database stopped answering at COMMIT: the write may have committed
};

struct Error {
    Errc code;
    std::string message;  // for operational logs; never contains secret bytes
};

template <class T>
using Result = tl::expected<T, Error>;

inline tl::unexpected<Error> fail(Errc code, std::string message = {})
{
    return tl::unexpected<Error>(Error{code, std::move(message)});
}

// The errno name that the fs layer reports for `code` ("EACCES"), used in
// audit records, whose `result` field is an errno name or "ok".
std::string_view result_name(Errc code);

}  // namespace vaultfs::vault
