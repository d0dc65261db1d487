// supervisor: the small process that `vaultfs mount` leaves holding the
// FUSE connection, so that the process serving it can be replaced without
// unmounting (docs/operations.md "Restarting and upgrading").
//
//   vaultfs mount ─ supervisor ── server (serves the mount)
//                  holds: the /dev/fuse fd, the INIT exchange, the state's lock
//
// The kernel keeps a FUSE connection while any process holds its fd. The
// supervisor never reads it: servers read through per-thread clones
// (clone_fd), so that when a server dies the kernel fails exactly the
// requests that server had taken, and the rest wait in the queue for the
// next one.
//
// - Graceful restart (`vaultfs restart`, through STATE/supervisor.sock): the
//   supervisor starts the binary now on disk (`vaultfs takeover`), which
//   replays the saved INIT to its own session and must make the same reply
//   (else it refuses: another binary or other FUSE options), and opens the
//   state with its audit log not yet started. Then the old server stops
//   taking requests, answers those it has, and hands over its open readers
//   (export_handles) — or refuses while anything is being written — writes
//   its signed `shutdown` record and exits; the new one writes its signed
//   `start` record (restart=graceful) and serves. The old one never
//   unmounts. A refusal leaves the old server serving, unaware.
// - Crash: when the server dies otherwise, a new one takes over at once
//   (restart=crash in its `start` record); what the dead one held open is
//   gone (EBADF). Servers that keep failing (3 in 10 s) end the mount.
// - The supervisor's own death ends the servers (PR_SET_PDEATHSIG), so
//   killing the daemon's pid still ends the whole daemon.
//
// Signals to the supervisor (SIGTERM, SIGINT, SIGHUP) go on to the server.
#pragma once

#include <sys/types.h>

#include <string>

#include "vault/state/lock.hpp"

namespace vaultfs::fs::restart {

struct SupervisorOptions {
    std::string state_dir;
    std::string mountpoint;
    std::string mount_namespace;
    std::string binary;  // what a restart starts: the path this one was started from
    unsigned threads = 0;
    bool debug = false;
    bool foreground = false;
    int server_socket = -1;  // the first server's end of a socket pair is its child's
    pid_t server = -1;       // the first server
};

// Runs until the mount ends; returns the process exit status.
int supervise(SupervisorOptions options, vault::StateLock lock);

// Unmounts lazily as libfuse would: umount2 where this process may, else
// fusermount3 -u -z.
void detach_mount(const std::string& mountpoint);
// Whether the FUSE connection `fd` is still up (not unmounted or aborted).
bool connection_alive(int fd);

// The socket `vaultfs restart` talks to.
std::string supervisor_socket_path(const std::string& state_dir);

// `vaultfs restart`: asks the supervisor of `state_dir` to restart its
// server, waiting up to `wait_ms` for open writes to finish; with `force`,
// it then goes on, failing only the writes still open (their write() and
// close() fail: what they held never committed). Prints the outcome;
// returns the exit status.
int request_restart(const std::string& state_dir, unsigned wait_ms, bool force = false);

}  // namespace vaultfs::fs::restart
