#include "fs/filesystem.hpp"

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

#include "fs/errno_map.hpp"
#include "fs/reply.hpp"
#include "vault/names.hpp"

namespace vaultfs::fs {

using policy::Permission;
using policy::PermissionSet;
using vault::Errc;

namespace {

// How long the kernel may keep a node's entry and attributes (see the
// header's note on caching). Only S as it stands for a version is cached:
// `secret` nodes name a first version being written (it changes with every
// write, and S names another inode once it commits).
double cache_seconds(NodeKind kind) { return kind == NodeKind::current ? 1.0 : 0.0; }

// Offsets in directory listings (see list_dir).
constexpr off_t row_offset = 16;
constexpr off_t staging_offset = off_t{1} << 62;  // beyond every row id
constexpr std::size_t page_rows = 256;
// The largest .policy text accepted (1000 rules of generous length).
constexpr std::size_t max_policy_size = 256 * 1024;

// Directories show the same for everyone; what a caller may do is the
// policy's to say (access(), and every operation).
constexpr mode_t dir_mode = S_IFDIR | 0755;

// Whether `mask` (R_OK, W_OK, X_OK) is within what `p` grants on a file
// (read: get; write: set) or a directory (read: list; write: set; search:
// anything at all).
bool permits(PermissionSet p, int mask, bool directory)
{
    const bool r = directory ? p.contains(Permission::list) : p.contains(Permission::get);
    const bool w = p.contains(Permission::set);
    const bool x = directory && !p.empty();
    return (!(mask & R_OK) || r) && (!(mask & W_OK) || w) && (!(mask & X_OK) || x);
}

}  // namespace


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

// ---- attributes -------------------------------------------------------------------

vault::Result<Filesystem::NodeAttr> Filesystem::stat_node(const vault::Caller& caller, Node node)
{
    NodeAttr attr;
    struct stat& st = attr.st;
    st.st_ino = to_ino(node);
    st.st_uid = 0;
    st.st_gid = 0;
    st.st_blksize = 4096;
    st.st_nlink = 1;

    const auto fill_dir = [&](const vault::VaultView& v) {
        st.st_mode = dir_mode;
        st.st_nlink = 2;
        st.st_mtim = st.st_ctim = st.st_atim = to_timespec(v.created);
        attr.generation = static_cast<std::uint64_t>(v.created);
    };
    // Owner, group and mode are the secret's own, whoever asks (S@N cannot
    // be written, so it never shows write bits).
    const auto fill_file = [&](const vault::SecretView& s, bool writable) {
        st.st_mode = S_IFREG | (s.ownership.mode & (writable ? 0777 : 0555));
        st.st_uid = s.ownership.owner;
        st.st_gid = s.ownership.group;
        st.st_size = static_cast<off_t>(s.version.size);
        st.st_blocks = (st.st_size + 511) / 512;
        if (s.pinned) {
            st.st_atim = st.st_mtim = to_timespec(s.version.created);
            st.st_ctim = to_timespec(s.version.updated);
        } else {
            st.st_atim = st.st_mtim = st.st_ctim = to_timespec(s.content_time(vault::now_micros()));
        }
        attr.generation = static_cast<std::uint64_t>(s.secret_created);
    };

    if (is_object_kind(node.kind))
        return object_stat(caller, node);
    switch (node.kind) {
    case NodeKind::root:
        st.st_mode = dir_mode;
        st.st_mtim = st.st_ctim = st.st_atim = mounted_at_;
        st.st_nlink = 2;
        return attr;
    case NodeKind::vault:
    case NodeKind::versions_dir:
    case NodeKind::deleted_dir:
    case NodeKind::policy_file: {
        auto v = service_.vault(caller, vault::VaultId{node.id});
        if (!v)
            return tl::unexpected(v.error());
        if (node.kind == NodeKind::policy_file) {
            if (v->permissions.empty())
                return vault::fail(Errc::access_denied);
            // Its size is the policy's for those who may read it (uncached).
            st.st_mode = S_IFREG | 0600;
            st.st_size = v->permissions.contains(Permission::manage) ? static_cast<off_t>(v->policy_size) : 0;
            st.st_mtim = st.st_ctim = st.st_atim = to_timespec(v->created);
            attr.generation = static_cast<std::uint64_t>(v->created);
        } else {
            if (node.kind != NodeKind::vault && v->permissions.empty() && !v->caller_is_admin)
                return vault::fail(Errc::access_denied);
            fill_dir(*v);
        }
        return attr;
    }
    case NodeKind::secret: {
        auto s = service_.secret_by_id(caller, vault::SecretId{node.id});
        if (!s)
            return tl::unexpected(s.error());
        fill_file(*s, true);
        return attr;
    }
    case NodeKind::version: {
        auto s = service_.version_by_id(caller, vault::VersionId{node.id});
        if (!s)
            return tl::unexpected(s.error());
        fill_file(*s, false);
        return attr;
    }
    case NodeKind::current: {
        auto s = service_.secret_at_version(caller, vault::VersionId{node.id});
        if (!s)
            return tl::unexpected(s.error());
        fill_file(*s, true);
        attr.generation = static_cast<std::uint64_t>(s->version.created);
        return attr;
    }
    case NodeKind::deleted_secret: {
        auto d = service_.deleted_by_id(caller, vault::SecretId{node.id});
        if (!d)
            return tl::unexpected(d.error());
        st.st_mode = S_IFREG;  // nothing to read or write until recovered
        st.st_uid = d->ownership.owner;
        st.st_gid = d->ownership.group;
        st.st_atim = st.st_mtim = st.st_ctim = to_timespec(d->deleted_at);
        attr.generation = static_cast<std::uint64_t>(d->secret_created);
        return attr;
    }
    case NodeKind::staging: {
        const auto file = staging_.by_id(node.id, caller.who.uid);
        if (!file)
            return vault::fail(Errc::not_found);
        std::lock_guard lock(file->mutex);
        attr.st = staging_stat(*file);
        attr.generation = static_cast<std::uint64_t>(file->id);
        return attr;
    }
    default:
        break;  // keys and certificates: object_stat, above
    }
    return vault::fail(Errc::not_found);
}

Reply Filesystem::entry_for(const vault::Caller& caller, Node node)
{
    auto attr = stat_node(caller, node);
    if (!attr)
        return Reply::err(attr.error());
    fuse_entry_param e{};
    e.ino = to_ino(node);
    e.attr = attr->st;
    e.generation = attr->generation;
    e.attr_timeout = cache_seconds(node.kind);
    e.entry_timeout = cache_seconds(node.kind);
    return Reply{Reply::Entry{e}};
}

Reply Filesystem::lookup(fuse_req_t req, fuse_ino_t parent, const char* name_c)
{
    const std::string_view name(name_c);
    const auto p = from_ino(parent);
    if (!p)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    switch (p->kind) {
    case NodeKind::root: {
        auto v = service_.find_vault(caller, name);
        if (!v)
            return Reply::err(v.error());
        return entry_for(caller, Node{NodeKind::vault, v->id.value});
    }
    case NodeKind::vault: {
        if (name == ".policy")
            return entry_for(caller, Node{NodeKind::policy_file, p->id});
        if (name == ".versions")
            return entry_for(caller, Node{NodeKind::versions_dir, p->id});
        if (name == ".deleted")
            return entry_for(caller, Node{NodeKind::deleted_dir, p->id});
        if (name == ".keys")
            return entry_for(caller, Node{NodeKind::keys_dir, p->id});
        if (name == ".certs")
            return entry_for(caller, Node{NodeKind::certs_dir, p->id});
        if (is_staging_name(name))
            return staging_lookup(caller, vault::VaultId{p->id}, std::string(name));
        auto s = service_.find_secret(caller, vault::VaultId{p->id}, name);
        if (!s && s.error().code == Errc::not_found) {
            // A name whose first version its caller is writing right now.
            auto pending = service_.find_pending(caller, vault::VaultId{p->id}, name);
            if (pending && is_creating(pending->id.value, caller.who.uid))
                return entry_for(caller, Node{NodeKind::secret, pending->id.value});
        }
        if (!s)
            return Reply::err(s.error());
        return entry_for(caller, Node{s->pinned ? NodeKind::version : NodeKind::current, s->version.id.value});
    }
    case NodeKind::versions_dir: {
        const auto path = vault::parse_secret_path(name);
        if (!path || !path->version)
            return Reply::err(ENOENT);
        auto s = service_.find_secret(caller, vault::VaultId{p->id}, name);
        if (!s)
            return Reply::err(s.error());
        return entry_for(caller, Node{NodeKind::version, s->version.id.value});
    }
    case NodeKind::deleted_dir: {
        auto d = service_.find_deleted(caller, vault::VaultId{p->id}, name);
        if (!d)
            return Reply::err(d.error());
        return entry_for(caller, Node{NodeKind::deleted_secret, d->id.value});
    }
    default:
        if (is_object_kind(p->kind))
            return object_lookup(caller, *p, name);
        return Reply::err(ENOENT);
    }
}

Reply Filesystem::forget(fuse_req_t, fuse_ino_t, uint64_t)
{
    // Inode numbers are computed from ids: there is nothing to forget.
    return Reply{Reply::None{}};
}

Reply Filesystem::getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    if (fi != nullptr) {
        // fstat on a file being written: its size is what was written so far.
        if (auto w = handles_.find_as<WriteHandle>(fi->fh, Handle::Kind::write)) {
            auto attr = stat_node(caller, Node{NodeKind::secret, w->grant.secret.value});
            struct stat st{};
            if (attr)
                st = attr->st;
            std::lock_guard lock(w->mutex);
            if (!attr) {
                st.st_mode = S_IFREG | 0600;
                st.st_nlink = 1;
                st.st_blksize = 4096;
            }
            st.st_ino = ino;
            st.st_size = static_cast<off_t>(w->buffer.size());
            st.st_blocks = (st.st_size + 511) / 512;
            return Reply{Reply::Attr{st, 0.0}};
        }
    }
    auto attr = stat_node(caller, *node);
    if (!attr)
        return Reply::err(gone_is_stale(*node, attr.error()));
    return Reply{Reply::Attr{attr->st, cache_seconds(node->kind)}};
}

Reply Filesystem::setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    if (node->kind == NodeKind::staging) {
        const auto file = staging_.by_id(node->id, caller.who.uid);
        if (!file)
            return Reply::err(ENOENT);
        return staging_setattr(caller, file, *attr, to_set);
    }
    auto w = fi != nullptr ? handles_.find_as<WriteHandle>(fi->fh, Handle::Kind::write) : nullptr;
    if (to_set & FUSE_SET_ATTR_SIZE) {
        // Only an open writer truncates: to empty (start over), or to what it
        // wrote already (rsync --inplace). A value is written whole, never patched.
        if (!w)
            return Reply::err(node->kind == NodeKind::version ? EROFS : EINVAL);
        std::lock_guard lock(w->mutex);
        if (attr->st_size != 0 && static_cast<std::size_t>(attr->st_size) != w->buffer.size())
            return Reply::err(EINVAL);
        if (attr->st_size == 0) {
            (void)w->buffer.resize(0);
            w->dirty = true;
        }
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        const std::optional<uid_t> owner = (to_set & FUSE_SET_ATTR_UID) ? std::optional<uid_t>(attr->st_uid) : std::nullopt;
        const std::optional<gid_t> group = (to_set & FUSE_SET_ATTR_GID) ? std::optional<gid_t>(attr->st_gid) : std::nullopt;
        const std::optional<std::uint32_t> mode =
            (to_set & FUSE_SET_ATTR_MODE) ? std::optional<std::uint32_t>(attr->st_mode & 07777) : std::nullopt;
        // The node being written may have no version yet (cp -a sets the
        // owner and mode before its close); S@N shares its secret's.
        auto target = w ? service_.secret_by_id(caller, w->grant.secret) : attribute_target(caller, *node);
        if (!target) {
            if (target.error().code != Errc::no_attribute)
                return Reply::err(target.error());
            // Directories and .policy: their owner and mode are fixed; setting
            // them as shown succeeds (cp -a, rsync -a of a tree).
            auto shown = stat_node(caller, *node);
            if (!shown)
                return Reply::err(shown.error());
            const bool same = (!owner || *owner == shown->st.st_uid) && (!group || *group == shown->st.st_gid) &&
                              (!mode || *mode == (shown->st.st_mode & 07777));
            if (!same)
                return Reply::err(EPERM);
        } else if (auto r = service_.set_ownership(caller, *target, owner, group, mode); !r) {
            return Reply::err(r.error());
        } else {
            invalidate_attributes(ino);
        }
    }
    // Times are the versions' own; touch and cp -p are accepted and ignored.
    return getattr(req, ino, fi);
}

Reply Filesystem::access(fuse_req_t req, fuse_ino_t ino, int mask)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    if (is_object_kind(node->kind))
        return object_access(caller, *node, mask);
    switch (node->kind) {
    case NodeKind::root:
        return Reply::err((mask & W_OK) && !service_.is_admin(caller) ? EACCES : 0);
    case NodeKind::vault:
    case NodeKind::versions_dir:
    case NodeKind::deleted_dir:
    case NodeKind::policy_file: {
        auto v = service_.vault(caller, vault::VaultId{node->id});
        if (!v)
            return Reply::err(v.error());
        if (node->kind == NodeKind::policy_file) {
            const bool manage = v->permissions.contains(Permission::manage);
            return Reply::err(manage && !(mask & X_OK) ? 0 : EACCES);
        }
        PermissionSet p = v->permissions;
        if (node->kind != NodeKind::vault)
            p = p.without(PermissionSet(Permission::set));
        const bool admin_x = v->caller_is_admin && !(mask & (R_OK | W_OK));
        return Reply::err(permits(p, mask, true) || admin_x ? 0 : EACCES);
    }
    case NodeKind::staging:
        return Reply::err(staging_.by_id(node->id, caller.who.uid) ? ((mask & X_OK) ? EACCES : 0) : ENOENT);
    case NodeKind::deleted_secret: {
        auto d = service_.deleted_by_id(caller, vault::SecretId{node->id});
        if (!d)
            return Reply::err(d.error());
        return Reply::err(mask == F_OK ? 0 : EACCES);
    }
    default: {
        auto target = attribute_target(caller, *node);
        if (!target)
            return Reply::err(target.error());
        PermissionSet p = target->permissions;
        if (node->kind == NodeKind::version)
            p = p.without(PermissionSet(Permission::set));
        return Reply::err(permits(p, mask, false) ? 0 : EACCES);
    }
    }
}

// ---- vaults -----------------------------------------------------------------------------

Reply Filesystem::mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t)
{
    if (parent != root_ino)
        return Reply::err(EPERM);
    const auto caller = caller_of(req);
    auto v = service_.create_vault(caller, name, vault::VaultSettings{});
    if (!v)
        return Reply::err(v.error());
    return entry_for(caller, Node{NodeKind::vault, v->id.value});
}

Reply Filesystem::rmdir(fuse_req_t req, fuse_ino_t parent, const char* name)
{
    if (parent != root_ino)
        return Reply::err(EPERM);
    auto r = service_.remove_vault(caller_of(req), name);
    return r ? Reply::ok() : Reply::err(r.error());
}

// ---- refusals ---------------------------------------------------------------------------

Reply Filesystem::unlink(fuse_req_t req, fuse_ino_t parent, const char* name_c)
{
    const auto p = from_ino(parent);
    const std::string_view name(name_c);
    if (!p)
        return Reply::err(ENOENT);
    if (p->kind == NodeKind::vault) {
        // Versions and the policy are not deleted one by one.
        if (name == ".policy" || name == ".versions" || name == ".deleted" ||
            vault::parse_secret_path(name).value_or(vault::SecretPath{}).version)
            return Reply::err(EPERM);
        if (is_staging_name(name)) {
            const auto caller = caller_of(req);
            return Reply::err(staging_.take(vault::VaultId{p->id}, std::string(name), caller.who.uid) ? 0 : ENOENT);
        }
        auto r = service_.delete_secret(caller_of(req), vault::VaultId{p->id}, name);
        // The kernel drops its own entry for a name it unlinked.
        return r ? Reply::ok() : Reply::err(r.error());
    }
    if (p->kind == NodeKind::deleted_dir) {
        auto r = service_.purge(caller_of(req), vault::VaultId{p->id}, name);
        return r ? Reply::ok() : Reply::err(r.error());
    }
    return Reply::err(EPERM);
}

Reply Filesystem::refuse_link(fuse_req_t, fuse_ino_t, fuse_ino_t, const char*) { return Reply::err(EPERM); }
Reply Filesystem::symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name)
{
    // Only lock files (emacs's `.#cfg`) under staging names: private, in memory.
    const auto p = from_ino(parent);
    if (!p || p->kind != NodeKind::vault || !is_staging_name(name))
        return Reply::err(EPERM);
    return staging_symlink(caller_of(req), vault::VaultId{p->id}, name, link);
}

Reply Filesystem::readlink(fuse_req_t req, fuse_ino_t ino)
{
    const auto node = from_ino(ino);
    if (!node || node->kind != NodeKind::staging)
        return Reply::err(EINVAL);
    const auto file = staging_.by_id(node->id, caller_of(req).who.uid);
    if (!file)
        return Reply::err(ENOENT);
    std::lock_guard lock(file->mutex);
    if (!file->link_target)
        return Reply::err(EINVAL);
    return Reply{Reply::Link{*file->link_target}};
}
Reply Filesystem::refuse_mknod(fuse_req_t, fuse_ino_t, const char*, mode_t, dev_t) { return Reply::err(EPERM); }

// ---- files ------------------------------------------------------------------------------

Reply Filesystem::open_value(const vault::Caller& caller, const vault::SecretView& view, fuse_file_info* fi,
                             std::optional<fuse_ino_t> cached)
{
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "get", view.vault_name, view.name, vault::Errc::too_many_open));
    // A reader through the page cache gets the value open_value
    // authenticated, to fill the pages with (wiped when this returns).
    hsm::SecureBuffer plain;
    auto value = service_.open_value(caller, view, cached ? &plain : nullptr);
    if (!value)
        return Reply::err(value.error());
    fi->noflush = 1;  // nothing to commit on close of a reader
    if (!cached) {
        fi->direct_io = 1;
        fi->keep_cache = 0;
        fi->fh = handles_.add(std::make_shared<ValueHandle>(std::move(*value), view, std::move(*charge)));
        return Reply{Reply::Open{*fi}};
    }
    // For the life of this open, the inode of the version `S` stands for
    // holds the value in the page cache: every read() of it, the one at EOF
    // included, is answered by the kernel without a round trip. That
    // inode's content never changes (it is one version's), so what an
    // earlier reader left is the same bytes; the first reader fills the
    // pages here, before the open is answered, and release drops them.
    // Another opener of the inode waits in enter() until this fill is done:
    // a read of its own would lock pages the fill then waits for.
    auto ticket = page_cache_readers_.enter(*cached);
    fi->direct_io = 0;
    fi->keep_cache = 1;
    if (ticket.first()) {
        if (!fill_page_cache(*cached, plain))
            fi->keep_cache = 0;  // the kernel clears the pages; reads come here
        ticket.filled();
    }
    fi->fh = handles_.add(std::make_shared<ValueHandle>(std::move(*value), view, std::move(*charge), std::move(ticket)));
    return Reply{Reply::Open{*fi}};
}

bool Filesystem::fill_page_cache(fuse_ino_t ino, const hsm::SecureBuffer& plain)
{
    if (plain.size() == 0)
        return true;
    fuse_bufvec bv = FUSE_BUFVEC_INIT(plain.size());
    bv.buf[0].mem = const_cast<std::uint8_t*>(plain.data());
    if (const int r = fuse_lowlevel_notify_store(session_, ino, 0, &bv, FUSE_BUF_NO_SPLICE); r != 0) {
        spdlog::warn("could not fill the page cache of inode {}: {} (reads go to the daemon)", ino, std::strerror(-r));
        return false;
    }
    return true;
}

Reply Filesystem::open_for_write(const vault::Caller& caller, vault::VaultId vault, const std::string& name,
                                 vault::SecretService::WriteIntent intent, fuse_file_info* fi, bool reply_create)
{
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "set", "", name, vault::Errc::too_many_open));
    auto grant = service_.open_for_write(caller, vault, name, intent);
    if (!grant)
        return Reply::err(grant.error());
    // Every writer starts from an empty value: it writes a whole new version.
    auto handle = std::make_shared<WriteHandle>(caller, std::move(*grant), (fi->flags & O_TRUNC) != 0 || intent.create,
                                                std::move(*charge));
    handle->readable = (fi->flags & O_ACCMODE) == O_RDWR;
    if (reply_create) {
        handle->creating = true;
        creating(handle->grant.secret.value, caller.who.uid, true);
    }
    fi->fh = handles_.add(handle);
    fi->direct_io = 1;
    fi->keep_cache = 0;
    if (!reply_create)
        return Reply{Reply::Open{*fi}};
    auto entry = entry_for(caller, Node{NodeKind::secret, handle->grant.secret.value});
    fuse_entry_param e{};
    if (const auto* found = std::get_if<Reply::Entry>(&entry.v)) {
        e = found->e;
    } else {
        e.ino = to_ino(Node{NodeKind::secret, handle->grant.secret.value});
        e.attr.st_ino = e.ino;
        e.attr.st_mode = S_IFREG | 0400;
        e.attr.st_nlink = 1;
        e.attr.st_blksize = 4096;
        e.generation = static_cast<std::uint64_t>(handle->grant.secret_created);
    }
    // What is being written changes with every write, and the name stands
    // for another inode once a version commits: the kernel asks again.
    e.attr_timeout = 0;
    e.entry_timeout = 0;
    return Reply{Reply::Create{e, *fi}};
}

Reply Filesystem::open_policy(const vault::Caller& caller, vault::VaultId vault, fuse_file_info* fi)
{
    const int mode = fi->flags & O_ACCMODE;
    if (mode == O_RDWR || (fi->flags & O_APPEND))
        return Reply::err(EINVAL);
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, mode == O_RDONLY ? "policy_get" : "policy_set", "", "",
                                                     vault::Errc::too_many_open));
    std::shared_ptr<PolicyHandle> handle;
    if (mode == O_RDONLY) {
        auto text = service_.read_policy(caller, vault);
        if (!text)
            return Reply::err(text.error());
        if (!charge->grow(text->size()))
            return Reply::err(service_.refuse_over_limit(caller, "policy_get", "", "", Errc::out_of_memory));
        handle = std::make_shared<PolicyHandle>(caller, vault, false, std::move(*text), std::move(*charge));
    } else {
        if (auto r = service_.authorize(caller, vault, Permission::manage, "policy_set"); !r)
            return Reply::err(r.error());
        handle = std::make_shared<PolicyHandle>(caller, vault, true, std::string(), std::move(*charge));
    }
    fi->fh = handles_.add(handle);
    fi->direct_io = 1;
    return Reply{Reply::Open{*fi}};
}

Reply Filesystem::create(fuse_req_t req, fuse_ino_t parent, const char* name_c, mode_t mode, fuse_file_info* fi)
{
    const auto p = from_ino(parent);
    if (!p || p->kind != NodeKind::vault)
        return Reply::err(EPERM);
    const std::string name(name_c);
    if (name == ".policy" || name == ".versions" || name == ".deleted" || name == ".keys" || name == ".certs")
        return Reply::err(EEXIST);
    const auto caller = caller_of(req);
    if (is_staging_name(name))
        return staging_create(caller, vault::VaultId{p->id}, name, mode, fi);
    if (const auto path = vault::parse_secret_path(name); path && path->version)
        return Reply::err(EROFS);
    // A new file: O_RDWR reads back what it wrote (mkstemp's files are O_RDWR).
    if (fi->flags & O_APPEND)
        return Reply::err(EINVAL);
    const vault::SecretService::WriteIntent intent{true, (fi->flags & O_EXCL) != 0};
    return open_for_write(caller, vault::VaultId{p->id}, name, intent, fi, true);
}

Reply Filesystem::open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    const int mode = fi->flags & O_ACCMODE;
    if (is_object_kind(node->kind))
        return object_open(caller, *node, fi);
    switch (node->kind) {
    case NodeKind::policy_file:
        return open_policy(caller, vault::VaultId{node->id}, fi);
    case NodeKind::staging: {
        const auto file = staging_.by_id(node->id, caller.who.uid);
        if (!file)
            return Reply::err(ESTALE);  // renamed or discarded: the kernel looks the name up again
        return staging_open(caller, file, fi, false);
    }
    case NodeKind::version: {
        if (mode != O_RDONLY)
            return Reply::err(EROFS);
        auto view = service_.version_by_id(caller, vault::VersionId{node->id});
        if (!view)
            return Reply::err(view.error());
        return open_value(caller, *view, fi);
    }
    case NodeKind::secret:
    case NodeKind::current: {
        // A value is written whole: O_APPEND never, O_RDWR only for a new
        // file. A readable writer of this inode could map it and see (or,
        // through its own reads, fill) the page cache its readers share.
        if (mode == O_RDWR || (fi->flags & O_APPEND))
            return Reply::err(EINVAL);
        if (mode != O_RDONLY) {
            auto view = node->kind == NodeKind::secret ? service_.secret_by_id(caller, vault::SecretId{node->id})
                                                       : service_.secret_at_version(caller, vault::VersionId{node->id});
            if (!view)
                return Reply::err(gone_is_stale(*node, view.error()));
            return open_for_write(caller, view->vault, view->name, {false, false}, fi, false);
        }
        // A reader gets what S stands for now: on the inode of an older
        // version (a name the kernel still caches), ESTALE makes the kernel
        // look S up again and open the inode of the version now.
        auto view = node->kind == NodeKind::secret ? service_.secret_by_id(caller, vault::SecretId{node->id})
                                                   : current_view(caller, node->id);
        if (!view)
            return Reply::err(gone_is_stale(*node, view.error()));
        return open_value(caller, *view, fi,
                          node->kind == NodeKind::current ? std::optional<fuse_ino_t>(ino) : std::nullopt);
    }
    case NodeKind::deleted_secret:
        return Reply::err(EACCES);  // no value until it is recovered
    default:
        return Reply::err(EISDIR);
    }
}

Reply Filesystem::read(fuse_req_t, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi)
{
    auto h = handles_.find(fi->fh);
    if (!h)
        return Reply::err(EBADF);
    if (off < 0)
        return Reply::err(EINVAL);
    const auto slice = [&](const void* data, std::size_t total) {
        const auto start = std::min<std::size_t>(static_cast<std::size_t>(off), total);
        const auto n = std::min(size, total - start);
        return Reply{Reply::Buffer{static_cast<const char*>(data) + start, n, h}};
    };
    // A locked copy of [off, off + size) of `bytes`, wiped once sent.
    const auto copy_out = [&](std::span<const std::uint8_t> bytes) -> Reply {
        const auto start = std::min(static_cast<std::size_t>(off), bytes.size());
        const auto n = std::min(size, bytes.size() - start);
        if (n == 0)
            return Reply{Reply::Buffer{nullptr, 0, nullptr}};
        auto copy = hsm::SecureBuffer::copy_of(bytes.subspan(start, n));
        if (!copy)
            return Reply::err(ENOMEM);
        auto owned = std::make_shared<const hsm::SecureBuffer>(std::move(*copy));
        return Reply{Reply::Buffer{owned->data(), owned->size(), owned}};
    };
    switch (h->kind) {
    case Handle::Kind::value: {
        const auto& v = static_cast<const ValueHandle&>(*h).value;
        if (static_cast<std::uint64_t>(off) >= v.size())
            return Reply{Reply::Buffer{nullptr, 0, nullptr}};  // end of file: nothing to decrypt
        // Decrypted for this read only, into locked memory wiped once the
        // reply is sent.
        auto plain = v.plaintext();
        if (!plain)
            return Reply::err(plain.error());
        auto owned = std::make_shared<const hsm::SecureBuffer>(std::move(*plain));
        const auto start = std::min(static_cast<std::size_t>(off), owned->size());
        const auto n = std::min(size, owned->size() - start);
        return Reply{Reply::Buffer{owned->data() + start, n, owned}};
    }
    case Handle::Kind::policy: {
        auto& p = static_cast<PolicyHandle&>(*h);
        if (p.writing)
            return Reply::err(EBADF);
        return slice(p.text.data(), p.text.size());
    }
    case Handle::Kind::write: {
        // O_RDWR: the writer's own bytes, nothing of any version.
        auto& w = static_cast<WriteHandle&>(*h);
        if (!w.readable)
            return Reply::err(EBADF);
        std::lock_guard lock(w.mutex);
        return copy_out(w.buffer.bytes());
    }
    case Handle::Kind::staging: {
        auto& file = *static_cast<StagingHandle&>(*h).file;
        std::lock_guard lock(file.mutex);
        return copy_out(file.data.bytes());
    }
    case Handle::Kind::object:
        return object_read(h, size, off);
    default:
        return Reply::err(EBADF);
    }
}

namespace {

// Copies `size` bytes from libfuse's buffer into `into` at `off`, growing it
// (charged to `charge`) up to `limit`; then wipes libfuse's copy (ordinary,
// reused heap). Returns 0 or the errno.
int write_into(hsm::SecureBuffer& into, UidQuota::Charge& charge, std::size_t limit, const char* buf,
               std::size_t size, std::size_t off)
{
    const std::size_t end = off + size;
    int err = 0;
    if (end > limit)
        err = EFBIG;
    else if (end > into.size() && !charge.grow(end - into.size()))
        err = ENOMEM;
    else if (end > into.size() && !into.resize(end))
        err = ENOMEM;
    if (err == 0)
        std::memcpy(into.data() + off, buf, size);
    OPENSSL_cleanse(const_cast<char*>(buf), size);
    return err;
}

}  // namespace

Reply Filesystem::write(fuse_req_t, fuse_ino_t, const char* buf, size_t size, off_t off, fuse_file_info* fi)
{
    auto h = handles_.find(fi->fh);
    if (!h)
        return Reply::err(EBADF);
    if (off < 0)
        return Reply::err(EINVAL);
    const auto end = static_cast<std::size_t>(off) + size;
    if (h->kind == Handle::Kind::object)
        return object_write(h, buf, size);
    if (h->kind == Handle::Kind::write) {
        auto& w = static_cast<WriteHandle&>(*h);
        std::lock_guard lock(w.mutex);
        // After a failed write nothing from this handle will ever commit,
        // and every later write says so (a shell's `printf > S` never sees
        // close()'s error, so write() must carry it).
        if (w.failed != 0) {
            OPENSSL_cleanse(const_cast<char*>(buf), size);
            return Reply::err(w.failed);
        }
        // What would fail the commit and is known now fails this write:
        // `set` revoked, the secret deleted, the audit or the token down.
        // Asked once per value (its first write), not for every piece of it;
        // the commit checks again.
        if (auto r = w.written ? vault::Result<void>{} : service_.check_commit(w.caller, w.grant); !r) {
            OPENSSL_cleanse(const_cast<char*>(buf), size);
            w.failed = to_errno(r.error().code);
            spdlog::warn("write to {}/{} by uid {} refused: {}", w.grant.vault_name, w.grant.name, w.caller.who.uid,
                         r.error().message);
            return Reply::err(w.failed);
        }
        if (const int err = write_into(w.buffer, w.charge, vault::max_value_size, buf, size,
                                       static_cast<std::size_t>(off));
            err != 0) {
            w.failed = err;
            if (err == ENOMEM)
                return Reply::err(service_.refuse_over_limit(w.caller, "commit", w.grant.vault_name, w.grant.name,
                                                             vault::Errc::out_of_memory));
            return Reply::err(err);
        }
        w.dirty = true;
        w.written = true;
        return Reply{Reply::Written{size}};
    }
    if (h->kind == Handle::Kind::staging) {
        auto& file = *static_cast<StagingHandle&>(*h).file;
        std::lock_guard lock(file.mutex);
        if (file.gone) {
            OPENSSL_cleanse(const_cast<char*>(buf), size);
            return Reply::err(ESTALE);  // renamed or removed: these bytes would reach nothing
        }
        if (const int err = write_into(file.data, file.charge, StagingArea::max_bytes, buf, size,
                                       static_cast<std::size_t>(off));
            err != 0)
            return Reply::err(err);
        file.modified = vault::now_micros();
        return Reply{Reply::Written{size}};
    }
    if (h->kind == Handle::Kind::policy) {
        auto& p = static_cast<PolicyHandle&>(*h);
        std::lock_guard lock(p.mutex);
        if (!p.writing)
            return Reply::err(EBADF);
        if (p.failed != 0)
            return Reply::err(p.failed);
        if (end > max_policy_size) {
            p.failed = EFBIG;
            return Reply::err(EFBIG);
        }
        if (end > p.text.size()) {
            if (!p.charge.grow(end - p.text.size())) {
                p.failed = ENOMEM;
                return Reply::err(service_.refuse_over_limit(p.caller, "policy_set", "", "", vault::Errc::out_of_memory));
            }
            p.text.resize(end, '\0');
        }
        p.text.replace(static_cast<std::size_t>(off), size, buf, size);
        p.written = true;
        // Each line is checked as it arrives, so that a shell's `printf >
        // .policy` -- which never sees close()'s error -- sees this write's.
        if (static_cast<std::size_t>(off) < p.checked) {
            p.failed = EINVAL;  // rewriting lines already checked: write the policy once, in order
            spdlog::warn("policy of vault {} by uid {}: rewritten in place", p.vault.value, p.caller.who.uid);
            return Reply::err(EINVAL);
        }
        for (std::size_t nl; (nl = p.text.find('\n', p.checked)) != std::string::npos && nl < end;) {
            const std::string_view line(p.text.data() + p.checked, nl - p.checked);
            ++p.checked_lines;
            if (auto r = service_.check_policy_line(p.caller, p.vault, line, p.checked_lines); !r) {
                p.failed = EINVAL;
                spdlog::warn("policy of vault {} refused from uid {}: {}", p.vault.value, p.caller.who.uid,
                             r.error().message);
                return Reply::err(EINVAL);
            }
            p.checked = nl + 1;
        }
        return Reply{Reply::Written{size}};
    }
    return Reply::err(EBADF);
}

Reply Filesystem::flush(fuse_req_t, fuse_ino_t ino, fuse_file_info* fi)
{
    auto h = handles_.find(fi->fh);
    // Only writers are flushed (readers and operation files are opened
    // noflush); one this process does not know was dropped by
    // `restart --force`, and what it held was never committed.
    if (!h)
        return Reply::err(EBADF);
    if (h->kind == Handle::Kind::write) {
        auto& w = static_cast<WriteHandle&>(*h);
        std::lock_guard lock(w.mutex);
        if (w.failed != 0)
            return Reply::err(w.failed);
        // A flush comes with every close(), including that of a shell's
        // temporary duplicate before anything is written; only a flush that
        // follows written bytes commits. One version per such flush, and
        // its failure is close()'s error. (A value left empty by O_TRUNC
        // with no writes commits at release.)
        if (!w.written)
            return Reply::ok();
        auto version = service_.commit(w.caller, w.grant, w.buffer);
        w.written = false;
        w.dirty = false;
        if (!version) {
            spdlog::warn("commit to {}/{} by uid {} failed: {}", w.grant.vault_name, w.grant.name, w.caller.who.uid,
                         version.error().message.empty() ? std::string(vault::result_name(version.error().code))
                                                         : version.error().message);
            return Reply::err(version.error());
        }
        invalidate_attributes(ino);
        staging_.expire_copies(w.grant.secret.value, w.caller.who.uid);
        return Reply::ok();
    }
    if (h->kind == Handle::Kind::policy) {
        auto& p = static_cast<PolicyHandle&>(*h);
        std::lock_guard lock(p.mutex);
        if (p.failed != 0)
            return Reply::err(p.failed);
        // As for secrets, only a close after written bytes swaps the policy
        // in; an empty write never replaces it.
        if (!p.writing || !p.written)
            return Reply::ok();
        auto r = service_.write_policy(p.caller, p.vault, p.text);
        p.written = false;
        if (!r) {
            // Whole-text checks (someone must manage) can only fail here.
            spdlog::warn("policy of vault {} refused from uid {}: {}", p.vault.value, p.caller.who.uid,
                         r.error().message);
            return Reply::err(r.error());
        }
        return Reply::ok();
    }
    return Reply::ok();
}

Reply Filesystem::release(fuse_req_t, fuse_ino_t ino, fuse_file_info* fi)
{
    polls_.forget(fi->fh);
    auto h = handles_.remove(fi->fh);
    // What a reader's open, read() or mmap left in the page cache is
    // dropped within 100 ms (also while other readers of it are open: their
    // reads then come here).
    if (h && h->kind == Handle::Kind::value)
        drop_page_cache(ino);
    if (h && h->kind == Handle::Kind::write) {
        auto& w = static_cast<WriteHandle&>(*h);
        std::lock_guard lock(w.mutex);
        // A flush normally committed already; this covers a writer whose
        // flush never came (there is no one left to report an error to).
        if (w.dirty && w.failed == 0) {
            if (auto r = service_.commit(w.caller, w.grant, w.buffer); !r) {
                if (r.error().code == Errc::not_found)
                    spdlog::info("{}/{} was removed before its writer closed: nothing committed", w.grant.vault_name,
                                 w.grant.name);
                else
                    spdlog::error("commit at release of {}/{} failed: {}", w.grant.vault_name, w.grant.name,
                                  r.error().message);
            } else {
                invalidate_attributes(ino);
                staging_.expire_copies(w.grant.secret.value, w.caller.who.uid);
            }
        }
        if (w.creating)
            creating(w.grant.secret.value, w.caller.who.uid, false);
    }
    return Reply::ok();  // the buffer is wiped as the handle goes
}

void Filesystem::creating(std::int64_t secret, uid_t uid, bool add)
{
    std::lock_guard lock(creating_mutex_);
    if (add) {
        creating_.emplace(secret, uid);
        return;
    }
    for (auto [it, end] = creating_.equal_range(secret); it != end; ++it)
        if (it->second == uid) {
            creating_.erase(it);
            return;
        }
}

bool Filesystem::is_creating(std::int64_t secret, uid_t uid)
{
    std::lock_guard lock(creating_mutex_);
    for (auto [it, end] = creating_.equal_range(secret); it != end; ++it)
        if (it->second == uid)
            return true;
    return false;
}

void Filesystem::sweep_staging()
{
    if (const auto n = staging_.sweep(std::chrono::steady_clock::now()); n > 0)
        spdlog::info("{} staging file(s) idle for {} s discarded", n, staging_.idle().count());
}

// ---- directories ----------------------------------------------------------------------

Reply Filesystem::opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "list", "", "", vault::Errc::too_many_open));
    std::shared_ptr<DirHandle> handle;
    switch (node->kind) {
    case NodeKind::root: {
        auto vaults = service_.list_vaults(caller);
        if (!vaults)
            return Reply::err(vaults.error());
        handle = std::make_shared<DirHandle>(NodeKind::root, caller, std::nullopt, std::move(*charge));
        for (const auto& v : *vaults)
            handle->vaults.emplace_back(v.name, Node{NodeKind::vault, v.id.value});
        break;
    }
    case NodeKind::vault:
    case NodeKind::versions_dir:
    case NodeKind::deleted_dir: {
        auto grant = service_.open_listing(caller, vault::VaultId{node->id});
        if (!grant)
            return Reply::err(grant.error());
        handle = std::make_shared<DirHandle>(node->kind, caller, std::move(*grant), std::move(*charge));
        break;
    }
    default: {
        if (!is_object_kind(node->kind))
            return Reply::err(ENOTDIR);
        if (node->kind == NodeKind::key_file || node->kind == NodeKind::cert_file)
            return Reply::err(ENOTDIR);
        auto entries = object_entries(caller, *node);
        if (!entries)
            return Reply::err(entries.error());
        handle = std::make_shared<DirHandle>(node->kind, caller, std::nullopt, std::move(*charge));
        handle->entries = std::move(*entries);
        break;
    }
    }
    fi->fh = handles_.add(handle);
    return Reply{Reply::Open{*fi}};
}

Reply Filesystem::readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi)
{
    return list_dir(req, ino, size, off, fi, false);
}

Reply Filesystem::readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi)
{
    return list_dir(req, ino, size, off, fi, true);
}

// Offsets in a listing: 1 and 2 follow "." and "..", 3..5 the special
// entries of a vault, rows continue from their id + row_offset, and the
// caller's staging files come last, from staging_offset.
Reply Filesystem::list_dir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi, bool plus)
{
    auto d = handles_.find_as<DirHandle>(fi->fh, Handle::Kind::directory);
    if (!d)
        return Reply::err(EBADF);
    auto buffer = std::make_shared<std::vector<char>>(size);
    std::size_t used = 0;
    // Adds one entry; false when the reply buffer is full. With `attr`
    // (readdirplus), the kernel caches the entry as a lookup would.
    const auto add = [&](const char* name, std::uint64_t entry_ino, mode_t type, off_t next,
                         const struct stat* attr = nullptr, std::uint64_t generation = 0) {
        if (!plus) {
            struct stat st{};
            st.st_ino = entry_ino;
            st.st_mode = type;
            const std::size_t need = fuse_add_direntry(req, nullptr, 0, name, nullptr, 0);
            if (used + need > size)
                return false;
            fuse_add_direntry(req, buffer->data() + used, size - used, name, &st, next);
            used += need;
            return true;
        }
        fuse_entry_param e{};
        if (attr != nullptr) {
            e.ino = entry_ino;
            e.attr = *attr;
            e.generation = generation;
            e.attr_timeout = e.entry_timeout = 1.0;
        } else {
            // No entry for the kernel to keep (nodeid 0): it looks the name up.
            e.attr.st_ino = entry_ino;
            e.attr.st_mode = type;
        }
        const std::size_t need = fuse_add_direntry_plus(req, nullptr, 0, name, nullptr, 0);
        if (used + need > size)
            return false;
        fuse_add_direntry_plus(req, buffer->data() + used, size - used, name, &e, next);
        used += need;
        return true;
    };
    const auto reply = [&] { return Reply{Reply::Buffer{buffer->data(), used, buffer}}; };

    if (off < 1 && !add(".", ino, S_IFDIR, 1))
        return reply();
    if (off < 2 && !add("..", root_ino, S_IFDIR, 2))
        return reply();

    if (d->node_kind == NodeKind::root) {
        // Taken at opendir; a vault the caller may no longer see is left out.
        for (std::size_t i = off < 2 ? 0 : static_cast<std::size_t>(off - 2); i < d->vaults.size(); ++i) {
            if (!service_.visible(d->caller, vault::VaultId{d->vaults[i].second.id}))
                continue;
            if (!add(d->vaults[i].first.c_str(), to_ino(d->vaults[i].second), S_IFDIR, static_cast<off_t>(i + 3)))
                break;
        }
        return reply();
    }

    if (is_object_kind(d->node_kind)) {
        // Taken at opendir, like the root's.
        for (std::size_t i = off < 2 ? 0 : static_cast<std::size_t>(off - 2); i < d->entries.size(); ++i) {
            const Node n = d->entries[i].second;
            const bool file = n.kind == NodeKind::key_file || n.kind == NodeKind::cert_file;
            if (!add(d->entries[i].first.c_str(), to_ino(n), file ? S_IFREG : S_IFDIR, static_cast<off_t>(i + 3)))
                break;
        }
        return reply();
    }

    const auto& grant = *d->grant;
    const std::int64_t vault_id = grant.vault.value;
    if (d->node_kind == NodeKind::vault) {
        struct Special {
            const char* name;
            NodeKind kind;
            mode_t type;
        };
        static const Special specials[] = {{".policy", NodeKind::policy_file, S_IFREG},
                                           {".versions", NodeKind::versions_dir, S_IFDIR},
                                           {".deleted", NodeKind::deleted_dir, S_IFDIR},
                                           {".keys", NodeKind::keys_dir, S_IFDIR},
                                           {".certs", NodeKind::certs_dir, S_IFDIR}};
        for (int i = 0; i < 5; ++i) {
            if (off < 3 + i && !add(specials[i].name, to_ino(Node{specials[i].kind, vault_id}), specials[i].type, 3 + i))
                return reply();
        }
    }
    // The caller's own staging files, after every row.
    const auto staged = [&]() -> Reply {
        const auto files = staging_.list(grant.vault, d->caller.who.uid);
        for (std::size_t i = 0; i < files.size(); ++i) {
            const off_t at = staging_offset + static_cast<off_t>(i);
            if (off > at)
                continue;
            std::string name;
            mode_t type;
            {
                std::lock_guard lock(files[i]->mutex);
                name = files[i]->name;
                type = files[i]->link_target ? S_IFLNK : S_IFREG;
            }
            if (!add(name.c_str(), to_ino(Node{NodeKind::staging, files[i]->id}), type, at + 1))
                break;
        }
        return reply();
    };
    if (off >= staging_offset)
        return d->node_kind == NodeKind::vault ? staged() : reply();
    // As many rows as can fit: a listing comes a page (4 KiB) at a time.
    const std::size_t rows_wanted = std::min<std::size_t>(page_rows, size / (plus ? 96 : 24) + 1);
    std::int64_t cursor = std::max<off_t>(off, row_offset) - row_offset;
    for (;;) {
        if (d->node_kind == NodeKind::vault && plus) {
            auto rows = service_.secrets_with_current(grant, vault::SecretId{cursor}, rows_wanted);
            if (!rows)
                return used > 0 ? reply() : Reply::err(rows.error());
            for (const auto& s : *rows) {
                const Node node{NodeKind::current, s.version.id.value};
                struct stat st{};
                st.st_ino = to_ino(node);
                st.st_mode = S_IFREG | (s.ownership.mode & 0777);
                st.st_uid = s.ownership.owner;
                st.st_gid = s.ownership.group;
                st.st_nlink = 1;
                st.st_blksize = 4096;
                st.st_size = static_cast<off_t>(s.version.size);
                st.st_blocks = (st.st_size + 511) / 512;
                st.st_atim = st.st_mtim = st.st_ctim = to_timespec(s.content_time(vault::now_micros()));
                if (!add(s.name.c_str(), st.st_ino, S_IFREG, s.id.value + row_offset, &st,
                         static_cast<std::uint64_t>(s.version.created)))
                    return reply();
                cursor = s.id.value;
            }
            if (rows->size() < rows_wanted)
                return staged();
        } else if (d->node_kind == NodeKind::vault) {
            auto rows = service_.secrets_page(grant, vault::SecretId{cursor}, rows_wanted);
            if (!rows)
                return used > 0 ? reply() : Reply::err(rows.error());
            for (const auto& s : *rows) {
                if (!add(s.name.c_str(), to_ino(Node{NodeKind::secret, s.id.value}), S_IFREG, s.id.value + row_offset))
                    return reply();
                cursor = s.id.value;
            }
            if (rows->size() < rows_wanted)
                return staged();
        } else if (d->node_kind == NodeKind::versions_dir) {
            auto rows = service_.versions_page(grant, vault::VersionId{cursor}, rows_wanted);
            if (!rows)
                return used > 0 ? reply() : Reply::err(rows.error());
            for (const auto& v : *rows) {
                const std::string name = v.secret + "@" + std::to_string(v.number);
                if (!add(name.c_str(), to_ino(Node{NodeKind::version, v.id.value}), S_IFREG, v.id.value + row_offset))
                    return reply();
                cursor = v.id.value;
            }
            if (rows->size() < rows_wanted)
                return reply();
        } else {
            auto rows = service_.deleted_page(grant, vault::SecretId{cursor}, rows_wanted);
            if (!rows)
                return used > 0 ? reply() : Reply::err(rows.error());
            for (const auto& s : *rows) {
                if (!add(s.name.c_str(), to_ino(Node{NodeKind::deleted_secret, s.id.value}), S_IFREG,
                         s.id.value + row_offset))
                    return reply();
                cursor = s.id.value;
            }
            if (rows->size() < rows_wanted)
                return reply();
        }
    }
}

Reply Filesystem::poll(fuse_req_t, fuse_ino_t, fuse_file_info* fi, fuse_pollhandle* ph)
{
    // What a regular file always is (the kernel's DEFAULT_POLLMASK); only
    // a reader of S has an event to wait for (poll_waiters.hpp).
    constexpr unsigned ready = POLLIN | POLLRDNORM;
    const auto h = handles_.find_as<ValueHandle>(fi->fh, Handle::Kind::value);
    if (!h || !h->follows_name) {
        if (ph != nullptr)
            fuse_pollhandle_destroy(ph);
        return Reply{Reply::Poll{h ? ready : ready | POLLOUT | POLLWRNORM}};
    }
    if (polls_.changed(h->secret.value, h->version.value)) {
        if (ph != nullptr)
            fuse_pollhandle_destroy(ph);
        return Reply{Reply::Poll{ready | POLLPRI | POLLERR}};
    }
    if (ph != nullptr)
        polls_.wait(fi->fh, h->secret.value, h->version.value, ph);
    return Reply{Reply::Poll{ready}};
}

Reply Filesystem::releasedir(fuse_req_t, fuse_ino_t, fuse_file_info* fi)
{
    handles_.remove(fi->fh);
    return Reply::ok();
}

Reply Filesystem::statfs(fuse_req_t, fuse_ino_t)
{
    struct statvfs st{};
    st.f_bsize = 4096;
    st.f_frsize = 4096;
    st.f_namemax = 127 + 1 + 20;  // S@N
    return Reply{Reply::Statfs{st}};
}

// ---- extended attributes -----------------------------------------------------------

namespace {

constexpr std::string_view xattr_prefix = "user.vault.";

// The attribute name inside vaultfs, or nullopt for names outside user.vault.*.
std::optional<std::string_view> vault_attribute(const char* xattr)
{
    const std::string_view n(xattr);
    if (n.substr(0, xattr_prefix.size()) != xattr_prefix || n.size() == xattr_prefix.size())
        return std::nullopt;
    return n.substr(xattr_prefix.size());
}

// Answers a getxattr of `value` for a buffer of `size` (0: size query).
Reply xattr_value(std::string value, size_t size)
{
    if (size == 0)
        return Reply{Reply::XattrSize{value.size()}};
    if (value.size() > size)
        return Reply::err(ERANGE);
    auto owned = std::make_shared<std::string>(std::move(value));
    return Reply{Reply::Buffer{owned->data(), owned->size(), owned}};
}

// Answers a listxattr of `names` (prefixed) for a buffer of `size`.
Reply xattr_list(const std::vector<std::string>& names, size_t size)
{
    std::string packed;
    for (const auto& n : names) {
        packed += xattr_prefix;
        packed += n;
        packed.push_back('\0');
    }
    return xattr_value(std::move(packed), size);
}

}  // namespace

// The secret or version a node stands for, for attribute calls.
vault::Result<vault::SecretView> Filesystem::attribute_target(const vault::Caller& caller, Node node)
{
    if (node.kind == NodeKind::secret)
        return service_.secret_by_id(caller, vault::SecretId{node.id});
    if (node.kind == NodeKind::current)
        return current_view(caller, node.id);
    if (node.kind == NodeKind::version)
        return service_.version_by_id(caller, vault::VersionId{node.id});
    return vault::fail(Errc::no_attribute);
}

vault::Result<vault::SecretView> Filesystem::current_view(const vault::Caller& caller, std::int64_t version_id)
{
    auto view = service_.secret_at_version(caller, vault::VersionId{version_id});
    if (!view)
        return view;
    auto now = service_.secret_by_id(caller, view->id);
    if (!now)
        return tl::unexpected(now.error());
    if (now->version.id != view->version.id)
        return vault::fail(Errc::stale);  // the kernel looks the name up again
    return view;
}

namespace {

bool is_value_node(NodeKind k) { return k == NodeKind::secret || k == NodeKind::current || k == NodeKind::version; }

}  // namespace

// The object behind an inode the kernel still holds is gone (deleted, or a
// tool's temporary file renamed over another name): ESTALE, so that the
// kernel looks the name up again and finds what it names now -- or ENOENT.
int Filesystem::gone_is_stale(Node node, const vault::Error& e)
{
    if (e.code == Errc::not_found && (is_value_node(node.kind) || node.kind == NodeKind::staging))
        return ESTALE;
    return to_errno(e.code);
}

namespace {

}  // namespace

// A vault's settings or a soft-deleted secret's dates.
vault::Result<std::vector<std::pair<std::string, std::string>>> Filesystem::fixed_attributes(
    const vault::Caller& caller, Node node)
{
    if (node.kind == NodeKind::vault)
        return service_.vault_attributes(caller, vault::VaultId{node.id});
    return service_.deleted_by_id(caller, vault::SecretId{node.id}).and_then([&](const vault::DeletedView& d) {
        return service_.deleted_attributes(caller, d);
    });
}

Reply Filesystem::getxattr(fuse_req_t req, fuse_ino_t ino, const char* name_c, size_t size)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto name = vault_attribute(name_c);
    // Other user.* names are simply not set; security.*, system.* (ACLs)
    // and trusted.* are not supported here at all. Saying so (ENOTSUP)
    // lets `ls -l`, cp and sed stop asking for the rest of the mount.
    if (!name)
        return Reply::err(std::string_view(name_c).substr(0, 5) == "user." ? ENODATA : EOPNOTSUPP);
    const auto caller = caller_of(req);
    if (node->kind == NodeKind::vault || node->kind == NodeKind::deleted_secret || is_object_kind(node->kind)) {
        auto attrs = is_object_kind(node->kind) ? object_attributes(caller, *node) : fixed_attributes(caller, *node);
        if (!attrs)
            return Reply::err(attrs.error().code == Errc::no_attribute ? ENODATA : to_errno(attrs.error().code));
        for (auto& [key, value] : *attrs)
            if (key == *name)
                return xattr_value(value, size);
        return Reply::err(ENODATA);
    }
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto value = service_.get_attribute(caller, *target, *name);
    if (!value)
        return Reply::err(value.error());
    return xattr_value(std::move(*value), size);
}

Reply Filesystem::listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    if (node->kind == NodeKind::vault || node->kind == NodeKind::deleted_secret ||
        (is_object_kind(node->kind) && node->kind != NodeKind::key_file && node->kind != NodeKind::cert_file &&
         node->kind != NodeKind::keys_dir && node->kind != NodeKind::certs_dir)) {
        auto attrs = is_object_kind(node->kind) ? object_attributes(caller, *node) : fixed_attributes(caller, *node);
        if (!attrs)
            return Reply::err(attrs.error());
        std::vector<std::string> names;
        for (const auto& [key, value] : *attrs)
            names.push_back(key);
        return xattr_list(names, size);
    }
    if (!is_value_node(node->kind))
        return xattr_list({}, size);
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto names = service_.list_attributes(caller, *target);
    if (!names)
        return Reply::err(names.error());
    return xattr_list(*names, size);
}

Reply Filesystem::setxattr(fuse_req_t req, fuse_ino_t ino, const char* name_c, const char* value, size_t size, int)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto name = vault_attribute(name_c);
    if (!name)
        return Reply::err(ENOTSUP);
    const auto caller = caller_of(req);
    const std::string_view text(value, size);
    if (node->kind == NodeKind::vault) {
        auto r = service_.set_vault_attribute(caller, vault::VaultId{node->id}, *name, text);
        return r ? Reply::ok() : Reply::err(r.error());
    }
    if (is_object_kind(node->kind))
        return object_setxattr(caller, *node, *name, text);
    if (!is_value_node(node->kind))
        return Reply::err(EPERM);
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto r = service_.set_attribute(caller, *target, *name, text);
    if (!r)
        return Reply::err(r.error());
    // Enabling or disabling a version can change what S stands for.
    invalidate_attributes(ino);
    return Reply::ok();
}

Reply Filesystem::removexattr(fuse_req_t req, fuse_ino_t ino, const char* name_c)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto name = vault_attribute(name_c);
    if (!name)
        return Reply::err(ENODATA);
    if (is_object_kind(node->kind))
        return object_setxattr(caller_of(req), *node, *name, std::nullopt);
    if (!is_value_node(node->kind))
        return Reply::err(EPERM);
    const auto caller = caller_of(req);
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto r = service_.set_attribute(caller, *target, *name, std::nullopt);
    if (!r)
        return Reply::err(r.error());
    invalidate_attributes(ino);
    return Reply::ok();
}

}  // namespace vaultfs::fs
