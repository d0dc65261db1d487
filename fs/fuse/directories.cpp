// Filesystem: vaults as directories, their listings, names made and removed,
// and what is refused (see filesystem.hpp).
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

}  // namespace vaultfs::fs
