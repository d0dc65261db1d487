#include "fs/fuse/errno_map.hpp"

#include <cerrno>

namespace vaultfs::fs {

// Keep in step with vault::result_name(), which names these same values in
// audit records (a unit test compares the two for every code).
int to_errno(vault::Errc code)
{
    using vault::Errc;
    switch (code) {
    case Errc::not_found:
        return ENOENT;
    case Errc::already_exists:
        return EEXIST;
    case Errc::invalid_argument:
        return EINVAL;
    case Errc::too_large:
        return EFBIG;
    case Errc::access_denied:
    case Errc::disabled:
        return EACCES;
    case Errc::not_valid_now:
        return EKEYEXPIRED;
    case Errc::not_permitted:
        return EPERM;
    case Errc::read_only:
        return EROFS;
    case Errc::not_empty:
        return ENOTEMPTY;
    case Errc::integrity:
    case Errc::key_unavailable:
    case Errc::storage:
    case Errc::not_fresh:
    case Errc::in_doubt:
    case Errc::audit_unavailable:
        return EIO;
    case Errc::no_space:
        return ENOSPC;
    case Errc::out_of_memory:
        return ENOMEM;
    case Errc::busy:
        return EBUSY;
    case Errc::too_many_open:
        return EMFILE;
    case Errc::stale:
        return ESTALE;
    case Errc::no_attribute:
        return ENODATA;
    }
    return EIO;
}

}  // namespace vaultfs::fs
