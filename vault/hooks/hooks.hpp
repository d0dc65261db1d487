// hooks: what vaultfs.conf's `on_change` lines run when what a secret
// serves changes, or a certificate gets a new version (docs/lifecycle.md "Reacting
// to rotation").
//
//   on_change = VAULT/GLOB signal USER PIDFILE SIGNAL   SIGNAL to USER's process in PIDFILE
//   on_change = VAULT/GLOB exec USER COMMAND         /bin/sh -c COMMAND as USER
//   on_change = VAULT/GLOB systemd-reload UNIT       systemctl reload UNIT
//
// VAULT and GLOB are fnmatch(3) patterns for the vault's name and the
// secret's (or the certificate's) name. Hooks live only in vaultfs.conf:
// root's, in the 0700 state directory, never reachable through the mount.
//
// The runner watches the store (a commit here, or on another host through
// the change feed) for changes recorded in secrets.changed and for new
// certificate versions, and fires every matching hook once per change, on
// its own thread: a commit never waits for a hook, and a failing hook
// changes nothing but its own audit record. Each firing is audited (`hook`,
// with the hook as written and its outcome); a command gets 30 s, then
// SIGKILL. It runs with a minimal environment: PATH, and VAULTFS_VAULT,
// VAULTFS_NAME, VAULTFS_KIND (secret, key or certificate), VAULTFS_VERSION,
// VAULTFS_EVENT (change, near_expiry or expired).
//
// `on_expiry` lines (same syntax) are fired by the expiry watch's events
// (monitor/expiry.hpp), handed to the runner with expiry_event().
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "vault/model/error.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {
class Store;
struct Change;
namespace audit {
class Log;
}
}  // namespace vaultfs::vault

namespace vaultfs::vault::hooks {

struct Hook {
    enum class Action { signal, exec, systemd_reload };
    std::string spec;  // as written after `on_change =`
    std::string vault_glob;
    std::string name_glob;
    Action action = Action::signal;
    std::string pid_file;  // signal
    int signal = 0;
    std::string user;      // signal (whose process), exec (who runs it)
    std::string command;
    std::string unit;      // systemd-reload

    bool matches(std::string_view vault, std::string_view name) const;
};

// Errc::invalid_argument with what is wrong, for the config's error; the
// signal form without a USER (vaultfs 0.1's) is refused, showing the new one.
Result<Hook> parse(std::string_view spec);

// A signal hook's firing: the signal sent, and what was done; or why not
// (the pidfile not root's or the user's, or writable by others; the
// process not the user's, pid 1, or vaultfs's own; gone). Never a pid
// recycled meanwhile: the signal goes through a pidfd.
Result<std::string> send_signal(const Hook& hook);

class Runner {
public:
    // Fires `hooks` for changes made after `since` (a restart passes on
    // where the previous process was).
    Runner(std::vector<Hook> hooks, std::vector<Hook> expiry_hooks, Store& store, audit::Log& audit, Micros since);
    ~Runner();
    Runner(const Runner&) = delete;
    Runner& operator=(const Runner&) = delete;
    // Changes up to here have been fired (for the next process of a restart).
    Micros seen() const { return seen_.load(); }

    // Fires the `on_expiry` hooks matching an expiry event, on the runner's
    // thread. `name` as the mount shows it (.certs/NAME for a certificate).
    struct Event {
        std::string vault, name, kind, event;
        std::uint64_t version = 0;
    };
    void expiry_event(Event event);

private:
    struct Running {
        pid_t pid;
        std::string spec;
        std::string vault;
        std::string name;
        std::uint64_t version;
        std::chrono::steady_clock::time_point started;
    };
    void run();
    void look();
    void fire(const Hook& hook, const Event& event);
    void fire_expiry(const std::vector<Event>& events);
    void reap(bool all);
    void record(const std::string& spec, const std::string& vault, const std::string& name, std::uint64_t version,
                bool ok, const std::string& outcome);

    const std::vector<Hook> hooks_;
    const std::vector<Hook> expiry_hooks_;
    std::vector<Event> pending_;  // expiry events to fire
    Store& store_;
    audit::Log& audit_;
    std::atomic<Micros> seen_;
    // Changes fired within the look-back window (commits become visible out
    // of their time order): (kind, id, at).
    std::set<std::tuple<bool, std::int64_t, Micros>> fired_;
    std::vector<Running> running_;
    std::mutex mutex_;
    std::condition_variable cv_;
    bool stop_ = false;
    std::thread thread_;
};

}  // namespace vaultfs::vault::hooks
