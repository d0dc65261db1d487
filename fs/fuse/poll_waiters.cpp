#include "fs/fuse/poll_waiters.hpp"

#include <chrono>
#include <utility>
#include <vector>

namespace vaultfs::fs {

PollWaiters::PollWaiters(Current current, Generation generation)
    : current_(std::move(current)), generation_(std::move(generation))
{
}

PollWaiters::~PollWaiters() { stop(); }

void PollWaiters::start(fuse_session* session)
{
    session_ = session;
    thread_ = std::thread([this] { run(); });
}

void PollWaiters::stop()
{
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable())
        thread_.join();
    std::lock_guard lock(mutex_);
    for (auto& [fh, w] : waiters_)
        fuse_pollhandle_destroy(w.ph);
    waiters_.clear();
}

bool PollWaiters::changed(std::int64_t secret, std::int64_t version) const
{
    const auto now = current_(secret);
    return now && *now != version;
}

void PollWaiters::wait(std::uint64_t fh, std::int64_t secret, std::int64_t version, fuse_pollhandle* ph)
{
    std::lock_guard lock(mutex_);
    if (stop_) {
        fuse_pollhandle_destroy(ph);
        return;
    }
    auto [it, added] = waiters_.try_emplace(fh, Waiter{secret, version, ph});
    if (!added) {
        fuse_pollhandle_destroy(it->second.ph);
        it->second = Waiter{secret, version, ph};
    }
    // Its poll() looked before it got here: a change since may already
    // have been counted as seen, so the next round looks regardless.
    added_ = true;
    cv_.notify_one();
}

void PollWaiters::forget(std::uint64_t fh)
{
    std::lock_guard lock(mutex_);
    if (const auto it = waiters_.find(fh); it != waiters_.end()) {
        fuse_pollhandle_destroy(it->second.ph);
        waiters_.erase(it);
    }
}

void PollWaiters::wake_all()
{
    std::lock_guard lock(mutex_);
    for (auto& [fh, w] : waiters_) {
        fuse_lowlevel_notify_poll(w.ph);
        fuse_pollhandle_destroy(w.ph);
    }
    waiters_.clear();
}

void PollWaiters::run()
{
    using namespace std::chrono_literals;
    std::unique_lock lock(mutex_);
    std::uint64_t seen = generation_();
    auto last_look = std::chrono::steady_clock::now();
    for (;;) {
        if (waiters_.empty())
            cv_.wait(lock, [&] { return stop_ || !waiters_.empty(); });
        else
            cv_.wait_for(lock, 20ms, [&] { return stop_; });
        if (stop_)
            return;
        // Sampled before looking: a change made while looking is seen next time.
        const std::uint64_t generation = generation_();
        const auto now = std::chrono::steady_clock::now();
        if (generation == seen && !added_ && now - last_look < 1s)
            continue;
        added_ = false;
        seen = generation;
        last_look = now;
        std::vector<std::pair<std::uint64_t, Waiter>> looking(waiters_.begin(), waiters_.end());
        lock.unlock();
        std::vector<std::uint64_t> woken;
        for (const auto& [fh, w] : looking)
            if (changed(w.secret, w.version))
                woken.push_back(fh);
        lock.lock();
        for (const auto fh : woken) {
            const auto it = waiters_.find(fh);
            if (it == waiters_.end())
                continue;  // released (or replaced and released) meanwhile
            fuse_lowlevel_notify_poll(it->second.ph);
            fuse_pollhandle_destroy(it->second.ph);
            waiters_.erase(it);
        }
    }
}

}  // namespace vaultfs::fs
