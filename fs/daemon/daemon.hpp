// daemon: `vaultfs mount` — the life of the FUSE daemon.
//
// Start-up order: (fork, unless -f) → logging → locked heap → stale-mount
// cleanup → refuse a non-empty mountpoint (unless --nonempty) → open the state (token login, database quick_check, audit start
// record) → mount → tell the waiting parent → serve. Anything that fails
// before the mount is reported on the terminal (through the parent when
// daemonizing) with a message that says what to do, and the exit status is
// non-zero.
//
// SIGINT and SIGTERM unmount cleanly and write the audit shutdown record;
// SIGHUP reopens the audit file (logrotate). The daemon never touches paths
// under its own mountpoint.
#pragma once

#include <string>

namespace vaultfs::fs {

struct MountOptions {
    std::string state_dir;
    std::string mountpoint;
    bool foreground = false;
    unsigned threads = 0;  // 0: the config's `threads`
    bool debug = false;    // log every FUSE request (libfuse -d)
    // Mount (and unmount) in this mount namespace (e.g. /proc/1/ns/mnt)
    // instead of the daemon's own: for a sandboxed service.
    std::string mount_namespace;
    bool nonempty = false;  // mount over a directory that holds something
};

// Runs the daemon; returns the process exit status.
int run_mount(const MountOptions& options);

// `vaultfs takeover` (started by a mount's supervisor, never by hand): takes
// the mount over from the running server, or after its crash
// (fs/daemon/restart/supervisor.hpp). `socket`: the supervisor's.
int run_takeover(int socket);

// Makes the process non-dumpable and disables core dumps (docs/design.md §3).
void harden_process();

}  // namespace vaultfs::fs
