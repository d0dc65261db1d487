// Filesystem: rename. The moves a vault knows, by what each name is:
//
//   .deleted/S -> S            recover S (with every version)
//   staging    -> S            the staged bytes become S's next version
//                              (sed -i's cousins: rsync, mktemp + mv, ansible)
//   staging    -> .policy      the staged text becomes the policy
//   staging    -> staging      a private rename
//   S          -> staging      a private copy of S's value (an editor's backup,
//                              `cfg~`); S stays as it is
//   S          -> T            only a fresh S (sed -i's sedXXXXXX): its value
//                              becomes T's next version and S goes
//
// Everything else is EPERM; across vaults EXDEV (mv copies, then removes).
// RENAME_NOREPLACE is kept (EEXIST), RENAME_EXCHANGE is not supported.

#include <fcntl.h>
#include <linux/fs.h>

#include <spdlog/spdlog.h>

#include "fs/fuse/filesystem.hpp"
#include "fs/fuse/reply.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::fs {

using vault::Errc;

Reply Filesystem::rename(fuse_req_t req, fuse_ino_t parent, const char* name_c, fuse_ino_t newparent,
                         const char* newname_c, unsigned int flags)
{
    const auto from = from_ino(parent);
    const auto to = from_ino(newparent);
    const std::string name(name_c), newname(newname_c);
    if (!from || !to)
        return Reply::err(ENOENT);
    if (flags & ~static_cast<unsigned>(RENAME_NOREPLACE))
        return Reply::err(EINVAL);
    const bool noreplace = (flags & RENAME_NOREPLACE) != 0;
    const auto caller = caller_of(req);
    // `mv V/.deleted/S V/S` recovers S.
    if (from->kind == NodeKind::deleted_dir && to->kind == NodeKind::vault && from->id == to->id && name == newname) {
        // The kernel moves its own entry; the node it names (a deleted
        // secret's, never cached) is looked up again at the next path walk.
        auto r = service_.recover(caller, vault::VaultId{from->id}, name);
        return r ? Reply::ok() : Reply::err(r.error());
    }
    if (from->kind == NodeKind::vault && to->kind == NodeKind::vault) {
        if (from->id != to->id)
            return Reply::err(EXDEV);
        return rename_in_vault(caller, vault::VaultId{from->id}, name, newname, noreplace);
    }
    return Reply::err(EPERM);
}

Reply Filesystem::rename_in_vault(const vault::Caller& caller, vault::VaultId vault, const std::string& from,
                                  const std::string& to, bool noreplace)
{
    const auto special = [](const std::string& n) { return n == ".policy" || n == ".versions" || n == ".deleted"; };
    if (special(from) || (special(to) && to != ".policy"))
        return Reply::err(EPERM);
    if (is_staging_name(from))
        return commit_staged(caller, vault, from, to, noreplace);
    const auto path = vault::parse_secret_path(from);
    if (!path || path->version)
        return Reply::err(path ? EPERM : ENOENT);  // versions stay where they are
    if (is_staging_name(to)) {
        // An editor's backup (vim with backupcopy=no, emacs): a private copy
        // of S's value under the backup's name; S itself stays.
        if (noreplace && staging_.find(vault, to, caller.who.uid))
            return Reply::err(EEXIST);
        auto view = service_.find_secret(caller, vault, from);
        if (!view)
            return Reply::err(view.error());
        return stage_copy(caller, *view, to);
    }
    if (to == ".policy")
        return Reply::err(EPERM);
    const auto target = vault::parse_secret_path(to);
    if (!target || target->version)
        return Reply::err(target ? EROFS : EINVAL);
    if (from == to)
        return Reply::ok();
    auto moved = service_.rename_fresh(caller, vault, from, to, noreplace);
    if (!moved)
        return Reply::err(moved.error());
    return Reply::ok();
}

Reply Filesystem::commit_staged(const vault::Caller& caller, vault::VaultId vault, const std::string& from,
                                const std::string& to, bool noreplace)
{
    const auto file = staging_.find(vault, from, caller.who.uid);
    if (!file)
        return Reply::err(ENOENT);
    if (is_staging_name(to)) {
        if (noreplace && staging_.find(vault, to, caller.who.uid))
            return Reply::err(EEXIST);
        return Reply::err(staging_.rename(vault, from, to, caller.who.uid) ? 0 : ENOENT);
    }
    std::unique_lock lock(file->mutex);
    if (file->link_target)
        return Reply::err(EPERM);  // a lock file is never a secret
    if (to == ".policy") {
        const std::string text(reinterpret_cast<const char*>(file->data.data()), file->data.size());
        lock.unlock();
        if (auto r = service_.write_policy(caller, vault, text); !r) {
            spdlog::warn("policy of vault {} refused from uid {} (renamed from {}): {}", vault.value, caller.who.uid,
                         from, r.error().message);
            return Reply::err(r.error());
        }
        (void)staging_.take(vault, from, caller.who.uid);
        return Reply::ok();
    }
    const auto target = vault::parse_secret_path(to);
    if (!target || target->version)
        return Reply::err(target ? EROFS : EINVAL);
    const std::optional<vault::Ownership> ownership =
        file->ownership_set ? std::optional<vault::Ownership>(file->ownership) : std::nullopt;
    auto version = service_.commit_renamed(caller, vault, to, file->data, from, noreplace, ownership);
    lock.unlock();
    if (!version) {
        spdlog::warn("rename of {} onto {} in vault {} by uid {} failed: {}", from, to, vault.value, caller.who.uid,
                     version.error().message.empty() ? std::string(vault::result_name(version.error().code))
                                                     : version.error().message);
        return Reply::err(version.error());
    }
    (void)staging_.take(vault, from, caller.who.uid);
    return Reply::ok();
}

}  // namespace vaultfs::fs
