// daemon/mountpoint: the directory a daemon mounts on -- a stale mount left
// by a crash lifted, a directory that holds something refused, the mount
// itself (as fusermount3 would), in another mount namespace when asked.
#pragma once

#include <functional>
#include <string>

namespace vaultfs::fs {

// Whether a directory holds anything (mounting over it would hide it).
bool has_entries(const std::string& dir);

// A mount left by a crashed daemon answers ENOTCONN; lift it lazily. False
// (and `error` says what to do) when the mountpoint cannot be used.
bool clean_stale_mount(const std::string& mountpoint, std::string& error);

// Runs `action` in a child process that first joins the mount namespace at
// `ns_path` (when not empty): a sandboxed service (systemd's ProtectSystem=
// gives it a private mount namespace) mounts and unmounts where the rest of
// the host sees it. The child is single-threaded, as setns(CLONE_NEWNS)
// requires. Returns 0 or the errno that stopped the action.
int in_mount_namespace(const std::string& ns_path, const std::function<int()>& action);

// Mounts the FUSE connection `fd` at `mountpoint` (as fusermount3 would).
int mount_fuse_fd(int fd, const std::string& mountpoint, bool allow_other);

}  // namespace vaultfs::fs
