#include "fs/fuse/filesystem.hpp"

#include <poll.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <variant>

#include "fs/fuse/errno_map.hpp"
#include "fs/fuse/filesystem_detail.hpp"
#include "fs/fuse/reply.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::fs {

using policy::Permission;
using policy::PermissionSet;
using vault::Errc;

using namespace detail;

namespace {

// Sends the reply; returns libfuse's result (nonzero: the kernel did not
// take it, e.g. the request was interrupted).
int send(fuse_req_t req, const Reply& r)
{
    return std::visit(
        [&](const auto& x) -> int {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, Reply::Error>)
                return fuse_reply_err(req, x.code);
            else if constexpr (std::is_same_v<T, Reply::None>)
                return fuse_reply_none(req), 0;
            else if constexpr (std::is_same_v<T, Reply::Entry>)
                return fuse_reply_entry(req, &x.e);
            else if constexpr (std::is_same_v<T, Reply::Attr>)
                return fuse_reply_attr(req, &x.st, x.timeout);
            else if constexpr (std::is_same_v<T, Reply::Open>)
                return fuse_reply_open(req, &x.fi);
            else if constexpr (std::is_same_v<T, Reply::Create>)
                return fuse_reply_create(req, &x.e, &x.fi);
            else if constexpr (std::is_same_v<T, Reply::Buffer>)
                return fuse_reply_buf(req, static_cast<const char*>(x.data), x.size);
            else if constexpr (std::is_same_v<T, Reply::Written>)
                return fuse_reply_write(req, x.count);
            else if constexpr (std::is_same_v<T, Reply::Statfs>)
                return fuse_reply_statfs(req, &x.st);
            else if constexpr (std::is_same_v<T, Reply::XattrSize>)
                return fuse_reply_xattr(req, x.size);
            else if constexpr (std::is_same_v<T, Reply::Link>)
                return fuse_reply_readlink(req, x.target.c_str());
            else if constexpr (std::is_same_v<T, Reply::Poll>)
                return fuse_reply_poll(req, x.revents);
            else
                return 0;
        },
        r.v);
}

// The file handle a reply hands to the kernel, if any.
std::optional<std::uint64_t> handed_out(const Reply& r)
{
    if (const auto* o = std::get_if<Reply::Open>(&r.v))
        return o->fi.fh;
    if (const auto* c = std::get_if<Reply::Create>(&r.v))
        return c->fi.fh;
    return std::nullopt;
}

// One noexcept wrapper for every callback: calls the handler, sends its
// reply, and turns anything thrown into EIO.
template <auto Method>
struct Callback;

template <class... Args, Reply (Filesystem::*Method)(fuse_req_t, Args...)>
struct Callback<Method> {
    static void call(fuse_req_t req, Args... args) noexcept
    {
        auto* self = static_cast<Filesystem*>(fuse_req_userdata(req));
        try {
            const Reply reply = (self->*Method)(req, args...);
            // An open the kernel never took gets no RELEASE: drop its handle
            // (and the plaintext in it) now.
            if (send(req, reply) != 0)
                if (const auto fh = handed_out(reply))
                    self->drop_handle(*fh);
        } catch (const std::exception& e) {
            spdlog::error("internal error in a filesystem operation: {}", e.what());
            fuse_reply_err(req, EIO);
        } catch (...) {
            spdlog::error("internal error in a filesystem operation");
            fuse_reply_err(req, EIO);
        }
    }
};

void init_callback(void* userdata, fuse_conn_info* conn) noexcept
{
    try {
        static_cast<Filesystem*>(userdata)->init(conn);
    } catch (...) {
        spdlog::error("internal error in init");
    }
}

}  // namespace

const fuse_lowlevel_ops& Filesystem::operations()
{
    static const fuse_lowlevel_ops ops = [] {
        fuse_lowlevel_ops o{};
        o.init = init_callback;
        o.lookup = Callback<&Filesystem::lookup>::call;
        o.forget = Callback<&Filesystem::forget>::call;
        o.getattr = Callback<&Filesystem::getattr>::call;
        o.setattr = Callback<&Filesystem::setattr>::call;
        o.mknod = Callback<&Filesystem::refuse_mknod>::call;
        o.mkdir = Callback<&Filesystem::mkdir>::call;
        o.unlink = Callback<&Filesystem::unlink>::call;
        o.rmdir = Callback<&Filesystem::rmdir>::call;
        o.symlink = Callback<&Filesystem::symlink>::call;
        o.readlink = Callback<&Filesystem::readlink>::call;
        o.rename = Callback<&Filesystem::rename>::call;
        o.link = Callback<&Filesystem::refuse_link>::call;
        o.open = Callback<&Filesystem::open>::call;
        o.read = Callback<&Filesystem::read>::call;
        o.write = Callback<&Filesystem::write>::call;
        o.flush = Callback<&Filesystem::flush>::call;
        o.release = Callback<&Filesystem::release>::call;
        o.opendir = Callback<&Filesystem::opendir>::call;
        o.readdir = Callback<&Filesystem::readdir>::call;
        o.readdirplus = Callback<&Filesystem::readdirplus>::call;
        o.releasedir = Callback<&Filesystem::releasedir>::call;
        o.statfs = Callback<&Filesystem::statfs>::call;
        o.setxattr = Callback<&Filesystem::setxattr>::call;
        o.getxattr = Callback<&Filesystem::getxattr>::call;
        o.listxattr = Callback<&Filesystem::listxattr>::call;
        o.removexattr = Callback<&Filesystem::removexattr>::call;
        o.access = Callback<&Filesystem::access>::call;
        o.create = Callback<&Filesystem::create>::call;
        o.poll = Callback<&Filesystem::poll>::call;
        return o;
    }();
    return ops;
}

Filesystem::Filesystem(vault::SecretService& service, Limits limits, Objects objects)
    : service_(service),
      objects_(objects),
      quota_(limits.open_files_per_uid, limits.buffered_bytes_per_uid, limits.buffered_bytes_total),
      staging_(limits.staging_idle),
      polls_([this](std::int64_t secret) { return version_now(secret); },
             [this] { return service_.change_count(); })
{
    ::clock_gettime(CLOCK_REALTIME, &mounted_at_);
}

std::optional<std::int64_t> Filesystem::version_now(std::int64_t secret)
{
    const auto v = service_.version_now(vault::SecretId{secret});
    if (!v)
        return std::nullopt;  // the store cannot say now: no event
    return *v ? (*v)->value : PollWaiters::gone;
}

Filesystem::~Filesystem() { stop_invalidations(); }

void Filesystem::start_invalidations(fuse_session* session)
{
    session_ = session;
    inval_thread_ = std::thread([this] { run_invalidations(); });
    polls_.start(session);
}

void Filesystem::stop_invalidations()
{
    polls_.stop();
    {
        std::lock_guard lock(inval_mutex_);
        inval_stop_ = true;
    }
    inval_cv_.notify_all();
    if (inval_thread_.joinable())
        inval_thread_.join();
}

void Filesystem::invalidate_attributes(std::uint64_t ino)
{
    const auto node = from_ino(ino);
    if (!node || cache_seconds(node->kind) == 0.0)
        return;
    std::lock_guard lock(inval_mutex_);
    inval_queue_.push_back(ino);
    inval_cv_.notify_one();
}

void Filesystem::drop_page_cache(std::uint64_t ino)
{
    std::lock_guard lock(inval_mutex_);
    if (page_cache_drops_.empty())
        inval_cv_.notify_one();  // start the 100 ms clock
    page_cache_drops_.insert(ino);
}

void Filesystem::drop_handle(std::uint64_t fh)
{
    polls_.forget(fh);
    auto h = handles_.remove(fh);
    // An open the kernel never took may have filled the page cache.
    if (h && h->kind == Handle::Kind::value)
        if (const auto ino = static_cast<const ValueHandle&>(*h).reader.ino())
            drop_page_cache(*ino);
    if (h && h->kind == Handle::Kind::write)
        if (auto& w = static_cast<WriteHandle&>(*h); w.creating)
            creating(w.grant.secret.value, w.caller.who.uid, false);
}

// The kernel may need this daemon to answer while it invalidates, so this
// runs on its own thread, never inside a request handler. Entries (names)
// are never invalidated from here: that takes the directory's lock in the
// kernel, which a lookup in flight may hold while it waits for this daemon,
// and a daemon killed at that moment would leave the mount hung for good.
void Filesystem::run_invalidations()
{
    std::unique_lock lock(inval_mutex_);
    for (;;) {
        // Page-cache drops are gathered for up to 100 ms and sent once per
        // inode: a reader's close costs no kernel round trip of its own.
        const auto ready = [&] { return inval_stop_ || !inval_queue_.empty(); };
        if (page_cache_drops_.empty())
            inval_cv_.wait(lock, [&] { return ready() || !page_cache_drops_.empty(); });
        else
            inval_cv_.wait_for(lock, std::chrono::milliseconds(100), ready);
        if (inval_stop_)
            return;
        std::deque<std::uint64_t> work;
        work.swap(inval_queue_);
        std::set<std::uint64_t> drops;
        if (std::chrono::steady_clock::now() - last_drops_ >= std::chrono::milliseconds(100)) {
            drops.swap(page_cache_drops_);
            last_drops_ = std::chrono::steady_clock::now();
        }
        lock.unlock();
        for (const auto ino : work)
            fuse_lowlevel_notify_inval_inode(session_, ino, -1, 0);  // attributes only
        for (const auto ino : drops)
            fuse_lowlevel_notify_inval_inode(session_, ino, 0, 0);
        lock.lock();
    }
}

Reply Filesystem::init(fuse_conn_info* conn)
{
    // O_TRUNC arrives with OPEN rather than as a separate SETATTR.
    if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
        conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
    // Never cache writes in the kernel: a version is what close() committed.
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    // The only cached pages are a version's (its content never changes) and
    // this daemon drops them: no GETATTR before cached reads to compare
    // mtimes.
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
    // Listings with attributes (`ls -l` without a lookup per name).
    if (conn->capable & FUSE_CAP_READDIRPLUS)
        conn->want |= FUSE_CAP_READDIRPLUS;
    return Reply{Reply::Init{}};
}

vault::Caller Filesystem::caller_of(fuse_req_t req)
{
    const fuse_ctx* ctx = fuse_req_ctx(req);
    vault::Caller c;
    c.who.uid = ctx->uid;
    c.who.gid = ctx->gid;
    c.pid = ctx->pid;
    // A caller without a pid in this daemon's pid namespace (the daemon in
    // a container of its own) has no /proc entry to read its groups from.
    auto groups = ctx->pid <= 0 ? std::nullopt
                                : callers_.groups(ctx->pid, ctx->uid, ctx->gid,
                                                  [req]() -> std::optional<std::vector<gid_t>> {
                                                      std::vector<gid_t> list(64);
                                                      int n = fuse_req_getgroups(
                                                          req, static_cast<int>(list.size()), list.data());
                                                      if (n > static_cast<int>(list.size())) {
                                                          list.resize(static_cast<std::size_t>(n));
                                                          n = fuse_req_getgroups(req, n, list.data());
                                                      }
                                                      if (n < 0 || n > static_cast<int>(list.size()))
                                                          return std::nullopt;
                                                      list.resize(static_cast<std::size_t>(n));
                                                      return list;
                                                  });
    c.who.groups_known = groups.has_value();
    if (groups)
        c.who.groups = std::move(*groups);
    return c;
}

}  // namespace vaultfs::fs
