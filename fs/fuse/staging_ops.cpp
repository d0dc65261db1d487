// Filesystem: the operations on staging files (staging.hpp) -- the private,
// in-memory files that tools and editors make beside their targets.

#include <fcntl.h>
#include <sys/stat.h>

#include <spdlog/spdlog.h>

#include <algorithm>

#include "fs/fuse/filesystem.hpp"
#include "fs/fuse/reply.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::fs {

using vault::Errc;

namespace {

}  // namespace

namespace {

// Python's tempfile names: "tmp" and 8 of [a-z0-9_] (those without '_' are
// secret names, and such a file is a fresh secret instead: replace.cpp).
bool python_tempfile(std::string_view name)
{
    return name.size() == 11 && name.substr(0, 3) == "tmp" &&
           std::all_of(name.begin() + 3, name.end(),
                       [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; });
}

}  // namespace

// The names tools give their temporary, swap, backup and lock files, which
// no secret can have: a leading '.' (rsync, vim, emacs's locks, ansible) or
// '#', a trailing '~' (backups) or '#' (emacs's auto-saves), mktemp's
// `tmp.` and Python tempfile's `tmpXXXXXXXX`. Any other name that is not a
// secret's -- `tls.key`, `db_pass` -- is refused at create (EINVAL), so a
// mistyped name never silently lands in memory that is gone in minutes.
bool Filesystem::is_staging_name(std::string_view name)
{
    if (name.empty() || name == "." || name == ".." || name == ".policy" || name == ".versions" || name == ".deleted")
        return false;
    if (vault::parse_secret_path(name) || vault::is_valid_secret_name(name.substr(0, name.find('@'))))
        return false;
    return name.front() == '.' || name.front() == '#' || name.back() == '~' || name.back() == '#' ||
           name.substr(0, 4) == "tmp." || python_tempfile(name);
}

struct stat Filesystem::staging_stat(const StagedFile& file)
{
    struct stat st{};
    st.st_ino = to_ino(Node{NodeKind::staging, file.id});
    st.st_mode = (file.link_target ? S_IFLNK : S_IFREG) | (file.ownership.mode & 0777);
    st.st_uid = file.ownership.owner;
    st.st_gid = file.ownership.group;
    st.st_nlink = 1;
    st.st_blksize = 4096;
    st.st_size = static_cast<off_t>(file.link_target ? file.link_target->size() : file.data.size());
    st.st_blocks = (st.st_size + 511) / 512;
    st.st_atim = st.st_mtim = st.st_ctim = to_timespec(file.modified);
    return st;
}

fuse_entry_param Filesystem::staging_entry(const StagedFile& file)
{
    fuse_entry_param e{};
    e.ino = to_ino(Node{NodeKind::staging, file.id});
    e.attr = staging_stat(file);
    e.generation = static_cast<std::uint64_t>(file.id);
    e.attr_timeout = 0;  // each creator sees only its own: nothing shared to cache
    e.entry_timeout = 0;
    return e;
}

Reply Filesystem::staging_lookup(const vault::Caller& caller, vault::VaultId vault, const std::string& name)
{
    // Only callers who may look into the vault (the refusal of others is
    // audited as usual).
    if (auto v = service_.vault(caller, vault); !v)
        return Reply::err(v.error());
    const auto file = staging_.find(vault, name, caller.who.uid);
    if (!file)
        return Reply::err(ENOENT);
    std::lock_guard lock(file->mutex);
    return Reply{Reply::Entry{staging_entry(*file)}};
}

Reply Filesystem::staging_create(const vault::Caller& caller, vault::VaultId vault, const std::string& name,
                                 mode_t mode, fuse_file_info* fi)
{
    // Anyone who holds something in the vault may stage (within the uid's
    // quotas); putting the file in place is what `set` decides.
    auto v = service_.vault(caller, vault);
    if (!v)
        return Reply::err(v.error());
    auto existing = staging_.find(vault, name, caller.who.uid);
    if (existing) {
        if (fi->flags & O_EXCL)
            return Reply::err(EEXIST);
        return staging_open(caller, existing, fi, true);
    }
    // The file itself counts against the uid's open files while it lives.
    auto held = this->charge(caller);
    if (!held)
        return Reply::err(service_.refuse_over_limit(caller, "set", v->name, "", Errc::too_many_open));
    auto file = staging_.create(vault, name, caller.who.uid, caller.who.gid, mode & 0777, std::move(*held));
    if (!file)
        return Reply::err(EEXIST);
    return staging_open(caller, file, fi, true);
}

Reply Filesystem::staging_open(const vault::Caller& caller, const std::shared_ptr<StagedFile>& file,
                               fuse_file_info* fi, bool reply_create)
{
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "set", "", "", Errc::too_many_open));
    if (fi->flags & O_TRUNC) {
        std::lock_guard lock(file->mutex);
        if (!file->link_target)
            file->data.clear();
    }
    fi->fh = handles_.add(std::make_shared<StagingHandle>(file, std::move(*charge)));
    fi->direct_io = 1;
    fi->keep_cache = 0;
    if (!reply_create)
        return Reply{Reply::Open{*fi}};
    std::lock_guard lock(file->mutex);
    return Reply{Reply::Create{staging_entry(*file), *fi}};
}

Reply Filesystem::staging_setattr(const vault::Caller&, const std::shared_ptr<StagedFile>& file,
                                  const struct stat& attr, int to_set)
{
    std::lock_guard lock(file->mutex);
    if (to_set & FUSE_SET_ATTR_SIZE) {
        if (file->link_target)
            return Reply::err(EINVAL);
        const auto size = static_cast<std::size_t>(std::max<off_t>(attr.st_size, 0));
        if (size > StagingArea::max_bytes)
            return Reply::err(EFBIG);
        if (size > file->data.size() && !file->charge.grow(size - file->data.size()))
            return Reply::err(ENOMEM);
        if (auto r = file->data.resize(size); !r)
            return Reply::err(ENOMEM);
        file->modified = vault::now_micros();
    }
    // The creator's own file: its owner and mode are what it says (they
    // reach the secret it is renamed onto only for a manager).
    if (to_set & FUSE_SET_ATTR_MODE) {
        file->ownership.mode = attr.st_mode & 0777;
        file->ownership_set = true;
    }
    if (to_set & FUSE_SET_ATTR_UID) {
        file->ownership.owner = attr.st_uid;
        file->ownership_set = true;
    }
    if (to_set & FUSE_SET_ATTR_GID) {
        file->ownership.group = attr.st_gid;
        file->ownership_set = true;
    }
    return Reply{Reply::Attr{staging_stat(*file), 0.0}};
}

Reply Filesystem::staging_symlink(const vault::Caller& caller, vault::VaultId vault, const std::string& name,
                                  const std::string& target)
{
    auto v = service_.vault(caller, vault);
    if (!v)
        return Reply::err(v.error());
    if (target.size() > 4096)
        return Reply::err(ENAMETOOLONG);
    auto held = this->charge(caller);
    if (!held)
        return Reply::err(service_.refuse_over_limit(caller, "set", v->name, "", Errc::too_many_open));
    auto file = staging_.create(vault, name, caller.who.uid, caller.who.gid, 0777, std::move(*held));
    if (!file)
        return Reply::err(EEXIST);  // a lock held by another: emacs reads it and asks
    std::lock_guard lock(file->mutex);
    file->link_target = target;
    return Reply{Reply::Entry{staging_entry(*file)}};
}

Reply Filesystem::stage_copy(const vault::Caller& caller, const vault::SecretView& view, const std::string& name)
{
    // Reading S into the copy is a read of S: `get`, audited.
    auto value = service_.open_value(caller, view);
    if (!value)
        return Reply::err(value.error());
    auto plain = value->plaintext();
    if (!plain)
        return Reply::err(plain.error());
    auto held = this->charge(caller);
    if (!held)
        return Reply::err(service_.refuse_over_limit(caller, "get", view.vault_name, view.name, Errc::too_many_open));
    if (!held->grow(plain->size()))
        return Reply::err(service_.refuse_over_limit(caller, "get", view.vault_name, view.name, Errc::out_of_memory));
    (void)staging_.take(view.vault, name, caller.who.uid);  // rename replaces the target
    auto file = staging_.create(view.vault, name, caller.who.uid, caller.who.gid, view.ownership.mode,
                                std::move(*held));
    if (!file)
        return Reply::err(EEXIST);
    std::lock_guard lock(file->mutex);
    file->ownership = view.ownership;
    file->data = std::move(*plain);
    file->copy_of = view.id.value;
    return Reply::ok();
}

}  // namespace vaultfs::fs
