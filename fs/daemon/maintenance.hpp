// daemon/maintenance: the serving daemon's periodic housekeeping.
#pragma once

#include <condition_variable>
#include <mutex>
#include <thread>

namespace vaultfs::vault {
class State;
namespace hooks {
class Runner;
}
}  // namespace vaultfs::vault

namespace vaultfs::fs {

class Filesystem;

// Periodic housekeeping: expired DEKs out of locked memory and idle
// staging files (every second), the automatic purge of soft-deleted
// secrets whose retention has ended (every purge_interval), and key
// rotation and certificate renewal policies (every object_policy_interval),
// expiry warnings (every expiry_check_interval), and the metrics textfile
// (every metrics_interval).
class Maintenance {
public:
    // Starts the housekeeping thread; `hooks` (may be null) get the expiry
    // events.
    Maintenance(vault::State& state, Filesystem& filesystem, vault::hooks::Runner* hooks);
    ~Maintenance();
    Maintenance(const Maintenance&) = delete;
    Maintenance& operator=(const Maintenance&) = delete;

private:
    void run();
    vault::State& state_;
    Filesystem& filesystem_;
    bool textfile_failing_ = false;  // said once, until it works again
    std::mutex mutex_;
    std::condition_variable cv_;
    bool stop_ = false;
    std::thread thread_;
};

}  // namespace vaultfs::fs
