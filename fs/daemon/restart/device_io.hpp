// device_io: how this daemon reads and writes /dev/fuse (libfuse's custom
// io), so that a restart can hand the connection to another process
// without unmounting (docs/operations.md "Restarting and upgrading").
//
// - The gate. Workers read the device without blocking and wait between
//   requests in an epoll set of their own, so pause() can stop them taking
//   new requests: it returns once every request already taken has been
//   answered. resume() lets them read again; close() makes them leave
//   libfuse's loop.
// - One worker woken per request. Each worker's epoll set holds its clone
//   of the device with EPOLLEXCLUSIVE, so the kernel wakes one idle worker
//   for a request, as a blocking read() would (poll() woke them all); and
//   the wake eventfd without it, so pause() and close() wake every one.
//   What a request costs the gate is two atomic counts: no lock, no
//   broadcast (the lock is taken only while paused, and for INIT).
// - INIT. The kernel sends FUSE_INIT once per connection. The process that
//   mounted keeps the request and its reply (init()); a process that takes
//   the connection over replays the same request to its own session
//   (replay_init()), whose reply goes nowhere: the kernel had it already.
//   The two replies must be equal byte for byte, or the new process would
//   serve with other options than the kernel agreed to.
//
// One session per process: the io functions find this object through a
// process-wide pointer, set by install().
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace vaultfs::fs::restart {

// FUSE_INIT as the kernel sent it, and the reply it was given.
struct InitExchange {
    std::vector<std::uint8_t> request;
    std::vector<std::uint8_t> reply;
};

// How two INIT replies differ (the fields of fuse_init_out), for a refusal.
std::string init_difference(const std::vector<std::uint8_t>& was, const std::vector<std::uint8_t>& now);

class DeviceIo {
public:
    DeviceIo();
    ~DeviceIo();
    DeviceIo(const DeviceIo&) = delete;
    DeviceIo& operator=(const DeviceIo&) = delete;

    // Makes `se` use this io on the connection `fd` (the device fd, which
    // the session then owns). Call before the loop starts.
    bool install(fuse_session* se, int fd);

    // Called once, from a worker, when the INIT exchange has been seen (not
    // for a replay).
    void on_init(std::function<void(const InitExchange&)> f) { on_init_ = std::move(f); }
    std::optional<InitExchange> init() const;

    // Runs `saved.request` through the session as if the kernel had sent
    // it, and returns the reply the session made (not sent).
    std::vector<std::uint8_t> replay_init(const InitExchange& saved);

    // Stops workers taking requests; returns true once none is being
    // served, false when the loop has ended meanwhile (unmount, SIGTERM).
    bool pause();
    void resume();
    // Every worker leaves the loop (fuse_session_exit): the end of a
    // hand-over, after pause(). False when the loop had ended already.
    bool close();
    // Called when libfuse's loop has returned; true when close() ended it
    // (a hand-over), false when something else did.
    bool loop_ended();

private:
    enum class Gate { open, paused, closed };

    static ssize_t read_thunk(int fd, void* buf, size_t len, void* userdata);
    static ssize_t writev_thunk(int fd, struct iovec* iov, int count, void* userdata);
    ssize_t read(int fd, void* buf, size_t len);
    ssize_t writev(int fd, struct iovec* iov, int count);
    bool ended() const;
    // Waits while the gate is paused (the loop may end meanwhile).
    void wait_while_paused();
    // A worker is no longer reading or serving: tells pause() when it was
    // the last.
    void release();

    fuse_session* session_ = nullptr;
    int wake_ = -1;  // eventfd: readable while paused or closed

    std::atomic<Gate> gate_{Gate::open};
    // Workers inside read(2), or between taking a request and their next
    // read (answering it).
    std::atomic<unsigned> busy_{0};
    // An INIT reply is awaited: the only reply writev() looks at.
    std::atomic<bool> init_pending_{false};

    mutable std::mutex mutex_;  // pause(), resume(), close(), INIT
    std::condition_variable cv_;
    bool loop_ended_ = false;   // libfuse's loop returned

    // INIT: what was seen, and whether replies are being swallowed (replay).
    std::optional<std::uint64_t> init_unique_;
    std::vector<std::uint8_t> init_request_;
    std::optional<std::vector<std::uint8_t>> init_reply_;
    bool replaying_ = false;
    std::function<void(const InitExchange&)> on_init_;
};

}  // namespace vaultfs::fs::restart
