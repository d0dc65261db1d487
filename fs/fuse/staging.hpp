// staging: private files under names that are not secret names.
//
// Tools write a temporary file next to their target and rename it over the
// target (rsync's `.cfg.XXXXXX`, mktemp's `tmp.XXXXXXXXXX`, ansible's
// `.ansible_tmp…`), editors keep swap and backup files beside the file they
// edit (`.cfg.swp`, `cfg~`) and lock files (emacs's `.#cfg`, a symlink). In
// a vault such a name can never be a secret's (secret names are letters,
// digits and hyphens), so a file created under it is a staging file:
//
//  - it lives in this daemon's locked memory only, never in the database,
//    and is never committed under its own name;
//  - it belongs to the uid that created it: only that uid sees it (lookup,
//    readdir) or opens it -- each uid has a namespace of its own, so two
//    users' `.cfg.swp` never meet;
//  - it reads and writes like any file (random offsets, O_RDWR, truncate,
//    chmod, chown), up to `max_bytes`, charged to its uid's buffered-bytes
//    quota (uid_quota.hpp);
//  - a rename onto a secret name commits its bytes as that secret's next
//    version (fs/fuse/filesystem.cpp decides and vault/ checks `set` and audits);
//  - unlink discards it, and so does idle() time with no open handle
//    (sweep()): what a tool left behind does not stay;
//  - a rename of a secret S onto a staging name (an editor's backup, `S~`)
//    makes a staging file holding a copy of S's value, and S stays; the
//    copy goes soon after its creator writes S again (expire_copies()).
//
// Nothing here is audited: no secret byte enters or leaves through a staging
// file but by a rename or a copy that vault/ audits.
//
// Thread-safety: the area is synchronised; a file's own mutex guards its
// content and metadata.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fs/fuse/uid_quota.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::fs {

struct StagedFile {
    StagedFile(std::int64_t i, vault::VaultId v, std::string n, uid_t u, gid_t g, std::uint32_t m, UidQuota::Charge c)
        : id(i), vault(v), name(std::move(n)), creator(u), ownership{u, g, m}, charge(std::move(c))
    {
    }
    const std::int64_t id;  // its inode's id (NodeKind::staging)
    const vault::VaultId vault;
    std::mutex mutex;
    std::string name;     // changes with a rename inside the area
    const uid_t creator;  // the only uid that sees it
    vault::Ownership ownership;
    bool ownership_set = false;  // chmod or chown was called on it
    std::optional<std::string> link_target;  // a symlink (lock files), else a regular file
    hsm::SecureBuffer data;
    UidQuota::Charge charge;  // of `data`'s bytes
    vault::Micros modified = 0;
    int open_handles = 0;
    std::chrono::steady_clock::time_point last_closed = std::chrono::steady_clock::now();
    bool gone = false;  // renamed away or removed: writes through handles still open fail (ESTALE)
    // An editor's backup: a copy of this secret's value (rename(S, S~)). It
    // goes moments after its creator writes the secret again -- the editor
    // saved (vim removes it itself; emacs keeps it), and the vault keeps the
    // old value as S@N.
    std::optional<std::int64_t> copy_of;
    std::optional<std::chrono::steady_clock::time_point> expires;
};

class StagingArea {
public:
    static constexpr std::size_t max_bytes = 64 * 1024;  // vim's swap file of a 25 KiB value fits

    // Files nothing holds open go after `idle` (staging_idle_seconds).
    explicit StagingArea(std::chrono::seconds idle) : idle_(idle) {}
    std::chrono::seconds idle() const { return idle_; }

    // A new file; nullptr when the uid already has one by that name.
    std::shared_ptr<StagedFile> create(vault::VaultId vault, const std::string& name, uid_t uid, gid_t gid,
                                       std::uint32_t mode, UidQuota::Charge charge);
    // The uid's file of that name, or nullptr.
    std::shared_ptr<StagedFile> find(vault::VaultId vault, const std::string& name, uid_t uid) const;
    // By inode id, for its creator only.
    std::shared_ptr<StagedFile> by_id(std::int64_t id, uid_t uid) const;
    // Takes the uid's file of that name out of the area (unlink, or a rename
    // onto a secret); nullptr when there is none.
    std::shared_ptr<StagedFile> take(vault::VaultId vault, const std::string& name, uid_t uid);
    // Renames within the area, replacing a file of the new name.
    bool rename(vault::VaultId vault, const std::string& from, const std::string& to, uid_t uid);
    // The uid's files in a vault, by id.
    std::vector<std::shared_ptr<StagedFile>> list(vault::VaultId vault, uid_t uid) const;
    // The uid's backups of `secret` go `copy_grace` from now (sweep()): long
    // enough for the editor that saved to remove its own.
    static constexpr std::chrono::seconds copy_grace{2};
    void expire_copies(std::int64_t secret, uid_t uid);
    // Staging files now (a restart waits until there are none).
    std::size_t count() const;
    // Ids handed out from here on start at `base` (a restart: never an
    // inode a previous process of the mount handed out).
    void number_from(std::int64_t base);
    // Drops files without an open handle for `idle`; returns how many.
    std::size_t sweep(std::chrono::steady_clock::time_point now);

private:
    using Key = std::tuple<std::int64_t, uid_t, std::string>;  // vault, uid, name
    const std::chrono::seconds idle_;
    mutable std::mutex mutex_;
    std::int64_t next_id_ = 1;
    std::map<Key, std::shared_ptr<StagedFile>> by_name_;
    std::map<std::int64_t, std::shared_ptr<StagedFile>> by_id_;
};

}  // namespace vaultfs::fs
