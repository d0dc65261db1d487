#include "fs/daemon/restart/device_io.hpp"

#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <sys/epoll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <sstream>

namespace vaultfs::fs::restart {

namespace {

std::atomic<DeviceIo*> active{nullptr};

// Whether this worker thread took a request it has not finished: its next
// read means it has answered it.
thread_local bool taken = false;

// This worker's clone of the connection, made non-blocking, and the epoll
// set it waits in (see the header).
struct WorkerWait {
    int fd = -1;
    int epoll = -1;
    WorkerWait() = default;
    WorkerWait(const WorkerWait&) = delete;
    WorkerWait& operator=(const WorkerWait&) = delete;
    ~WorkerWait()
    {
        if (epoll >= 0)
            ::close(epoll);
    }
    // False when the set cannot be made (the worker then polls).
    bool watch(int device, int wake)
    {
        if (fd == device)
            return epoll >= 0;
        fd = device;
        const int flags = ::fcntl(device, F_GETFL);
        if (flags >= 0)
            ::fcntl(device, F_SETFL, flags | O_NONBLOCK);
        if (epoll >= 0)
            ::close(epoll);
        epoll = ::epoll_create1(EPOLL_CLOEXEC);
        epoll_event dev{};
        dev.events = EPOLLIN | EPOLLEXCLUSIVE;
        dev.data.fd = device;
        epoll_event woken{};
        woken.events = EPOLLIN;
        woken.data.fd = wake;
        if (epoll >= 0 && (::epoll_ctl(epoll, EPOLL_CTL_ADD, device, &dev) != 0 ||
                           ::epoll_ctl(epoll, EPOLL_CTL_ADD, wake, &woken) != 0)) {
            ::close(epoll);
            epoll = -1;
        }
        return epoll >= 0;
    }
};
thread_local WorkerWait waiting;

}  // namespace

std::string init_difference(const std::vector<std::uint8_t>& was, const std::vector<std::uint8_t>& now)
{
    const std::size_t header = sizeof(fuse_out_header);
    fuse_init_out a{}, b{};
    std::memcpy(&a, was.data() + header, std::min(sizeof a, was.size() > header ? was.size() - header : 0));
    std::memcpy(&b, now.data() + header, std::min(sizeof b, now.size() > header ? now.size() - header : 0));
    std::ostringstream out;
    const auto field = [&](const char* name, std::uint64_t x, std::uint64_t y) {
        if (x != y)
            out << (out.tellp() > 0 ? ", " : "") << name << " " << x << " -> " << y;
    };
    field("protocol minor", a.minor, b.minor);
    field("flags", a.flags | (std::uint64_t{a.flags2} << 32), b.flags | (std::uint64_t{b.flags2} << 32));
    field("max_readahead", a.max_readahead, b.max_readahead);
    field("max_write", a.max_write, b.max_write);
    field("max_background", a.max_background, b.max_background);
    field("congestion_threshold", a.congestion_threshold, b.congestion_threshold);
    field("time_gran", a.time_gran, b.time_gran);
    field("max_pages", a.max_pages, b.max_pages);
    field("reply size", was.size(), now.size());
    const std::string d = out.str();
    return d.empty() ? "the replies differ" : d;
}

DeviceIo::DeviceIo() : wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

DeviceIo::~DeviceIo()
{
    DeviceIo* self = this;
    active.compare_exchange_strong(self, nullptr);
    if (wake_ >= 0)
        ::close(wake_);
}

bool DeviceIo::install(fuse_session* se, int fd)
{
    if (wake_ < 0)
        return false;
    session_ = se;
    active.store(this);
    fuse_custom_io io{};
    io.read = &DeviceIo::read_thunk;
    io.writev = &DeviceIo::writev_thunk;
    return fuse_session_custom_io(se, &io, fd) == 0;
}

ssize_t DeviceIo::read_thunk(int fd, void* buf, size_t len, void*)
{
    return active.load()->read(fd, buf, len);
}

ssize_t DeviceIo::writev_thunk(int fd, struct iovec* iov, int count, void*)
{
    return active.load()->writev(fd, iov, count);
}

bool DeviceIo::ended() const
{
    return gate_.load() == Gate::closed || fuse_session_exited(session_) != 0;
}

void DeviceIo::release()
{
    // pause() stores the gate, then reads the count; this decrements the
    // count, then reads the gate: one of the two sees the other's write.
    if (busy_.fetch_sub(1) == 1 && gate_.load() != Gate::open) {
        std::lock_guard lock(mutex_);
        cv_.notify_all();
    }
}

void DeviceIo::wait_while_paused()
{
    // SIGTERM ends the session without a word to this object: look again
    // every `look`.
    constexpr auto look = std::chrono::milliseconds(200);
    std::unique_lock lock(mutex_);
    while (gate_.load() == Gate::paused && fuse_session_exited(session_) == 0)
        cv_.wait_for(lock, look);
}

ssize_t DeviceIo::read(int fd, void* buf, size_t len)
{
    // libfuse ends its loop by cancelling the workers that are still
    // reading. A cancellation here would unwind through these frames (and
    // their locks); so none acts here, and a worker looks at the session
    // every `look` instead and leaves by returning.
    struct NoCancel {
        int old = 0;
        NoCancel() { ::pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old); }
        ~NoCancel() { ::pthread_setcancelstate(old, nullptr); }
    } no_cancel;
    constexpr int look_ms = 200;
    const bool epoll = waiting.watch(fd, wake_);
    for (;;) {
        if (taken) {
            taken = false;
            release();
        }
        if (gate_.load() == Gate::paused)
            wait_while_paused();
        if (ended()) {
            errno = EINTR;  // libfuse sees the session exited, and the worker leaves
            return -1;
        }
        busy_.fetch_add(1);
        if (gate_.load() != Gate::open) {  // pause() began meanwhile
            release();
            continue;
        }
        const ssize_t n = ::read(fd, buf, len);
        const int err = errno;
        if (n > 0) {
            taken = true;
            const auto* in = static_cast<const fuse_in_header*>(buf);
            if (static_cast<size_t>(n) >= sizeof(fuse_in_header) && in->opcode == FUSE_INIT) {
                std::lock_guard lock(mutex_);
                init_unique_ = in->unique;
                init_request_.assign(static_cast<const std::uint8_t*>(buf), static_cast<const std::uint8_t*>(buf) + n);
                init_pending_ = !init_reply_;
            }
            return n;
        }
        release();
        if (n == 0 || err != EAGAIN) {
            errno = err;
            return n;
        }
        // Nothing queued: wait for a request, or for pause() or close().
        int r;
        if (epoll) {
            epoll_event events[2];
            r = ::epoll_wait(waiting.epoll, events, 2, look_ms);
        } else {
            pollfd fds[2] = {{fd, POLLIN, 0}, {wake_, POLLIN, 0}};
            r = ::poll(fds, 2, look_ms);
        }
        if ((r < 0 && errno == EINTR) || (r == 0 && fuse_session_exited(session_) != 0)) {
            errno = EINTR;  // a signal (SIGTERM), or the loop ends: libfuse looks at the session
            return -1;
        }
    }
}

ssize_t DeviceIo::writev(int fd, struct iovec* iov, int count)
{
    const auto* out = static_cast<const fuse_out_header*>(iov[0].iov_base);
    std::function<void(const InitExchange&)> report;
    InitExchange seen;
    if (init_pending_.load()) {
        std::lock_guard lock(mutex_);
        if (init_unique_ && !init_reply_ && iov[0].iov_len >= sizeof(fuse_out_header) && out->unique == *init_unique_) {
            std::vector<std::uint8_t> reply;
            for (int i = 0; i < count; ++i)
                reply.insert(reply.end(), static_cast<const std::uint8_t*>(iov[i].iov_base),
                             static_cast<const std::uint8_t*>(iov[i].iov_base) + iov[i].iov_len);
            init_reply_ = std::move(reply);
            init_pending_ = false;
            if (replaying_)
                return static_cast<ssize_t>(init_reply_->size());  // the kernel has its reply already
            report = on_init_;
            seen = InitExchange{init_request_, *init_reply_};
        }
    }
    const ssize_t n = ::writev(fd, iov, count);
    if (report)
        report(seen);
    return n;
}

std::optional<InitExchange> DeviceIo::init() const
{
    std::lock_guard lock(mutex_);
    if (!init_reply_)
        return std::nullopt;
    return InitExchange{init_request_, *init_reply_};
}

std::vector<std::uint8_t> DeviceIo::replay_init(const InitExchange& saved)
{
    if (saved.request.size() < sizeof(fuse_in_header))
        return {};
    {
        std::lock_guard lock(mutex_);
        replaying_ = true;
        init_unique_ = reinterpret_cast<const fuse_in_header*>(saved.request.data())->unique;
        init_request_ = saved.request;
        init_reply_.reset();
        init_pending_ = true;
    }
    std::vector<std::uint8_t> request = saved.request;
    fuse_buf buf{};
    buf.size = request.size();
    buf.mem = request.data();
    fuse_session_process_buf(session_, &buf);
    std::lock_guard lock(mutex_);
    replaying_ = false;
    return init_reply_.value_or(std::vector<std::uint8_t>{});
}

bool DeviceIo::pause()
{
    std::unique_lock lock(mutex_);
    if (loop_ended_ || gate_.load() == Gate::closed)
        return false;
    gate_ = Gate::paused;
    const std::uint64_t one = 1;
    (void)!::write(wake_, &one, sizeof one);
    cv_.wait(lock, [&] { return loop_ended_ || busy_.load() == 0; });
    return !loop_ended_;
}

void DeviceIo::resume()
{
    std::lock_guard lock(mutex_);
    std::uint64_t count = 0;
    (void)!::read(wake_, &count, sizeof count);
    if (gate_.load() == Gate::paused)
        gate_ = Gate::open;
    cv_.notify_all();
}

bool DeviceIo::close()
{
    std::lock_guard lock(mutex_);
    if (loop_ended_)
        return false;
    fuse_session_exit(session_);
    gate_ = Gate::closed;
    const std::uint64_t one = 1;
    (void)!::write(wake_, &one, sizeof one);
    cv_.notify_all();
    return true;
}

bool DeviceIo::loop_ended()
{
    std::lock_guard lock(mutex_);
    loop_ended_ = true;
    cv_.notify_all();
    return gate_.load() == Gate::closed;
}

}  // namespace vaultfs::fs::restart
