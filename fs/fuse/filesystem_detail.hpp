// The FUSE adapter's own constants and helpers, shared by the files of
// Filesystem (filesystem.cpp, attributes.cpp, files.cpp, directories.cpp,
// xattrs.cpp). Not part of the interface.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>

#include "fs/fuse/inode.hpp"
#include "policy/policy.hpp"

namespace vaultfs::fs::detail {

using policy::Permission;
using policy::PermissionSet;

// How long the kernel may keep a node's entry and attributes (see the
// header's note on caching). Only S as it stands for a version is cached:
// `secret` nodes name a first version being written (it changes with every
// write, and S names another inode once it commits).
inline double cache_seconds(NodeKind kind) { return kind == NodeKind::current ? 1.0 : 0.0; }

// Offsets in directory listings (see list_dir).
constexpr off_t row_offset = 16;
constexpr off_t staging_offset = off_t{1} << 62;  // beyond every row id
constexpr std::size_t page_rows = 256;
// The largest .policy text accepted (1000 rules of generous length).
constexpr std::size_t max_policy_size = 256 * 1024;

// Directories show the same for everyone; what a caller may do is the
// policy's to say (access(), and every operation).
constexpr mode_t dir_mode = S_IFDIR | 0755;

// Whether `mask` (R_OK, W_OK, X_OK) is within what `p` grants on a file
// (read: get; write: set) or a directory (read: list; write: set; search:
// anything at all).
inline bool permits(PermissionSet p, int mask, bool directory)
{
    const bool r = directory ? p.contains(Permission::list) : p.contains(Permission::get);
    const bool w = p.contains(Permission::set);
    const bool x = directory && !p.empty();
    return (!(mask & R_OK) || r) && (!(mask & W_OK) || w) && (!(mask & X_OK) || x);
}

}  // namespace vaultfs::fs::detail
