// poll_waiters: the FUSE poll operation on readers of `S`. A reader pins
// the version it opened; poll(), select() or epoll on its descriptor report
// POLLPRI | POLLERR (beside POLLIN | POLLRDNORM, as sysfs does for
// attribute files) once S stands for another version than that one: a new
// version committed (through this mount, the CLI, or on another host) or
// the pinned one disabled. The reader then reopens S to read the new value.
//
// A waiter's poll handle is kept until then. A thread looks again within
// 20 ms of every change the store reports (its generation, raised by every
// write and every change the feed brings) and of every new waiter, and
// notifies (fuse_lowlevel_notify_poll); it looks once a second anyway.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

namespace vaultfs::fs {

class PollWaiters {
public:
    // The version (id) secret `secret` stands for now; `gone` when it has
    // none (deleted); nullopt when that cannot be said now (no event).
    using Current = std::function<std::optional<std::int64_t>(std::int64_t secret)>;
    static constexpr std::int64_t gone = 0;  // no version has id 0
    // A number that changes whenever the store may have changed.
    using Generation = std::function<std::uint64_t()>;

    PollWaiters(Current current, Generation generation);
    ~PollWaiters();
    PollWaiters(const PollWaiters&) = delete;
    PollWaiters& operator=(const PollWaiters&) = delete;

    void start(fuse_session* session);
    void stop();  // before the session goes; destroys the handles kept
    // Whether S stands for another version than `version` now.
    bool changed(std::int64_t secret, std::int64_t version) const;
    // Keeps `ph` (owned from here) for file handle `fh` until S changes;
    // an earlier one of the same fh is destroyed.
    void wait(std::uint64_t fh, std::int64_t secret, std::int64_t version, fuse_pollhandle* ph);
    // File handle `fh` was released: its poll handle goes.
    void forget(std::uint64_t fh);
    // A restart: every waiter is woken, so that the kernel polls again and
    // the next process keeps the new handles.
    void wake_all();

private:
    struct Waiter {
        std::int64_t secret;
        std::int64_t version;
        fuse_pollhandle* ph;
    };
    void run();

    const Current current_;
    const Generation generation_;
    fuse_session* session_ = nullptr;
    std::mutex mutex_;
    std::condition_variable cv_;
    std::unordered_map<std::uint64_t, Waiter> waiters_;  // by file handle
    bool added_ = false;  // a waiter came since the last round looked
    bool stop_ = false;
    std::thread thread_;
};

}  // namespace vaultfs::fs
