// daemon/process: the daemon as a process -- detaching from the terminal
// with a channel that tells the waiting parent how start-up went, the
// operational log, signals, and hardening (no core dumps).
#pragma once

#include <string>

namespace vaultfs::vault::audit {
class Log;
}

namespace vaultfs::fs {

// Tells the parent of a daemonizing process how start-up went. Without a
// parent (-f) it only logs.
class StartupChannel {
public:
    StartupChannel() = default;
    explicit StartupChannel(int fd) : fd_(fd) {}

    void failed(const std::string& message);
    void ready() { send("R"); }
    // Leaves the reporting to another process (the one that inherited it).
    void abandon();

private:
    void send(const std::string& msg);
    int fd_ = -1;
};

// Forks; the parent waits for the child's start-up verdict and exits with
// it. Returns the channel in the child.
StartupChannel daemonize();

// stdin, stdout and stderr to /dev/null; the working directory to /.
void detach_stdio();

// The daemon's operational log: stderr in the foreground; syslog (and so
// journald) when one listens; else STATE/vaultfs.log (5 MiB, 3 kept), so
// that nothing -- a refused policy's reason included -- is lost. Returns
// where it goes, for the start-up line.
std::string setup_logging(bool foreground, const std::string& state_dir);

// SIGHUP reopens the audit file (logrotate). Installed before libfuse's
// handlers, which then leave it alone (they would end the session on it).
void install_sighup();
// The audit log SIGHUP reopens (nullptr: none, while not serving).
void reopen_on_sighup(vault::audit::Log* log);

}  // namespace vaultfs::fs
