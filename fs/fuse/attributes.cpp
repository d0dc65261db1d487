// Filesystem: lookups, attributes and access() (see filesystem.hpp).
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

}  // namespace vaultfs::fs
