// Filesystem: the FUSE low-level operations of vaultfs. Thin by design:
// decode the request, build the Caller, make one call into
// vault::SecretService, encode the reply. No SQL, crypto or policy logic.
//
// Every handler returns a Reply and the dispatcher (filesystem.cpp) sends it,
// so each request gets exactly one fuse_reply_*; exceptions never reach
// libfuse (they become EIO and a log line).
//
// Caching. The kernel's entry and attribute caches are shared by all
// callers, while what a caller may see is decided per caller. So:
//  - The root, vault directories, .policy, .versions, .deleted and S@N have
//    timeouts of 0: every path walk asks the daemon at the vault level, and
//    a caller who holds nothing in a vault stops there (ENOENT).
//  - A secret `S` is cached for one second (entry and attributes; the
//    name of a first version still being written is not cached). Only
//    callers who passed the vault-level check walk on to it, and the
//    contract lets any of them look up and stat anything in the vault; what
//    the cache can show one of them that is meant for another is the mode
//    bits (which reflect the other caller's permissions) for at most a
//    second. It saves one round trip per open, and most of `ls -l`.
//  - S has an inode per version it stands for (inode.hpp: `current`), so
//    the kernel's page cache -- filled with the value by the open of S that
//    finds no other reader of that inode (open_value), and kept by later
//    ones -- is per version: pages a reader keeps alive never reach an
//    opener of another version. Each release drops them
//    (run_invalidations).
//  - Correctness after writes: a change this daemon makes through an inode
//    (a new version, an attribute) invalidates that inode's cached
//    attributes at once (notify_inval_inode, from a separate thread, never
//    inside the request that caused it). Names are not invalidated (see
//    run_invalidations): an open that arrives on the inode of a version S
//    no longer stands for gets ESTALE, and the kernel looks S up again, so
//    what an open reads is always what S stands for at that open; a `stat`
//    of S may show the version before for up to the entry's second.
//  - Attributes are the same for every caller -- a secret's owner, group
//    and mode are its own (SecretView::ownership), never computed from
//    who asks -- so what the kernel caches for one caller is right for
//    all. readdirplus hands out the attributes of a whole listing at once
//    (the same one-second timeouts), so `ls -l` costs no lookup per name.
//  - Staging files (staging.hpp) differ per creator: entries and attributes
//    with timeouts of 0.
//  - OPEN always comes here (no default_permissions): a policy change —
//    a revocation included — applies at the next open, whatever is cached.
//    access() answers from the policy too, never from the mode bits.
// S@N, keys, certificates, .policy and files being written are opened
// with FOPEN_DIRECT_IO: no plaintext of them in the page cache from read().
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include <condition_variable>
#include <chrono>
#include <deque>
#include <map>
#include <set>
#include <memory>
#include <thread>
#include <mutex>
#include <unordered_map>

#include "fs/fuse/caller_cache.hpp"
#include "fs/fuse/handles.hpp"
#include "fs/fuse/inode.hpp"
#include "fs/fuse/poll_waiters.hpp"
#include "fs/fuse/staging.hpp"
#include "fs/fuse/uid_quota.hpp"
#include "vault/certificates/certificates.hpp"
#include "vault/keys/key_vault.hpp"
#include "vault/secrets/secret_service.hpp"

namespace vaultfs::fs {

// The other object kinds, served under V/.keys and V/.certs (either may be
// null: those directories are then empty).
struct ObjectServices {
    vault::keys::KeyVault* keys = nullptr;
    vault::certificates::Certificates* certificates = nullptr;
};

class Filesystem {
public:
    struct Limits {
        std::size_t open_files_per_uid = 1024;
        std::size_t buffered_bytes_per_uid = 1 << 20;
        std::size_t buffered_bytes_total = 8 << 20;  // half the default locked heap
        std::chrono::seconds staging_idle{300};
    };
    using Objects = ObjectServices;
    Filesystem(vault::SecretService& service, Limits limits, Objects objects = {});

    ~Filesystem();

    // The operations table for fuse_session_new(); userdata must be `this`.
    static const fuse_lowlevel_ops& operations();

    // Starts sending cache invalidations to the kernel through `session`
    // (call after mounting); stop_invalidations() before unmounting.
    void start_invalidations(fuse_session* session);
    void stop_invalidations();
    // Only the poll waiters' thread (it uses the service): a hand-over stops
    // it before the state closes, and the invalidations only after the next
    // process serves (an invalidation may wait for a page a READ queued for
    // that process holds).
    void stop_polls() { polls_.stop(); }

    // Forgets a handle the kernel never received.
    void drop_handle(std::uint64_t fh);

    // Open handles right now (for status and tests).
    std::size_t open_handles() const { return handles_.size(); }
    // Drops staging files idle past Limits::staging_idle (the daemon calls
    // it every second).
    void sweep_staging();

    // ---- restart (fs/fuse/handover.cpp) ---------------------------
    // What keeps the open files from going to another process now: writes,
    // policies being written, staging files, open directories and key or
    // certificate files (what they hold exists only here). Empty when
    // nothing does.
    std::string handover_blockers();
    // The open readers of secrets and the mount's times, for adopt().
    std::string export_handles();
    // Re-creates what a previous process exported (each reader's version
    // opened again with this process's token sessions). Returns how many
    // handles; a version that cannot be opened again loses its handle (its
    // reads fail with EBADF) and is logged.
    std::size_t adopt(const std::string& exported);
    // Handle numbers and staging inodes this process hands out start at
    // `base`: never one that a previous process of this mount handed out.
    void number_from(std::uint64_t base);
    // Wakes every poll waiter (the kernel polls the next process again).
    void wake_pollers() { polls_.wake_all(); }

    struct Reply;  // defined in filesystem.cpp

    // Handlers: one per FUSE operation (see fuse_lowlevel.h for each one's
    // contract and valid replies).
    Reply init(fuse_conn_info* conn);
    Reply lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
    Reply getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    Reply setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi);
    Reply access(fuse_req_t req, fuse_ino_t ino, int mask);
    Reply mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode);
    Reply rmdir(fuse_req_t req, fuse_ino_t parent, const char* name);
    Reply unlink(fuse_req_t req, fuse_ino_t parent, const char* name);
    Reply rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent, const char* newname,
                 unsigned int flags);
    Reply refuse_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname);
    Reply symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name);
    Reply readlink(fuse_req_t req, fuse_ino_t ino);
    Reply refuse_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev);
    Reply create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi);
    Reply open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    Reply read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
    Reply write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off, fuse_file_info* fi);
    Reply flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    Reply release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    Reply opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    Reply readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
    Reply readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
    Reply releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
    Reply poll(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, fuse_pollhandle* ph);
    Reply statfs(fuse_req_t req, fuse_ino_t ino);
    Reply setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size, int flags);
    Reply getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size);
    Reply listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
    Reply removexattr(fuse_req_t req, fuse_ino_t ino, const char* name);
    Reply forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup);

private:
    vault::Caller caller_of(fuse_req_t req);
    static int gone_is_stale(Node node, const vault::Error& e);
    Reply list_dir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi, bool plus);
    struct NodeAttr {
        struct stat st {};
        std::uint64_t generation = 0;  // creation time: a re-created name is a new inode
    };
    // Attributes of a node as this caller sees it.
    vault::Result<NodeAttr> stat_node(const vault::Caller& caller, Node node);
    Reply entry_for(const vault::Caller& caller, Node node);
    // A reader of `view`. With `cached`, the inode it is opened on (only
    // one whose content never changes: `S`'s, per version) holds the value
    // in the page cache while it is open; without, direct I/O.
    Reply open_value(const vault::Caller& caller, const vault::SecretView& view, fuse_file_info* fi,
                     std::optional<fuse_ino_t> cached = std::nullopt);
    // Puts `plain` in the page cache of `ino` (fuse_lowlevel_notify_store).
    bool fill_page_cache(fuse_ino_t ino, const hsm::SecureBuffer& plain);
    Reply open_for_write(const vault::Caller& caller, vault::VaultId vault, const std::string& name,
                         vault::SecretService::WriteIntent intent, fuse_file_info* fi, bool reply_create);
    Reply open_policy(const vault::Caller& caller, vault::VaultId vault, fuse_file_info* fi);
    vault::Result<vault::SecretView> attribute_target(const vault::Caller& caller, Node node);
    // What a `current` inode stands for, or Errc::stale when S stands for
    // another version now (for opens and attribute calls, which the kernel
    // then retries with a fresh lookup of the name).
    vault::Result<vault::SecretView> current_view(const vault::Caller& caller, std::int64_t version_id);
    vault::Result<std::vector<std::pair<std::string, std::string>>> fixed_attributes(const vault::Caller& caller,
                                                                                      Node node);

    // ---- staging files (fs/fuse/staging_ops.cpp) ----------------------------------------
    // Names in a vault that are neither a secret's, `S@N` nor a special entry.
    static bool is_staging_name(std::string_view name);
    Reply staging_lookup(const vault::Caller& caller, vault::VaultId vault, const std::string& name);
    Reply staging_create(const vault::Caller& caller, vault::VaultId vault, const std::string& name, mode_t mode,
                         fuse_file_info* fi);
    Reply staging_open(const vault::Caller& caller, const std::shared_ptr<StagedFile>& file, fuse_file_info* fi,
                       bool reply_create);
    Reply staging_setattr(const vault::Caller& caller, const std::shared_ptr<StagedFile>& file, const struct stat& attr,
                          int to_set);
    Reply staging_symlink(const vault::Caller& caller, vault::VaultId vault, const std::string& name,
                          const std::string& target);
    static struct stat staging_stat(const StagedFile& file);
    fuse_entry_param staging_entry(const StagedFile& file);
    // A copy of a secret's current value as the caller's staging file `name`
    // (an editor's backup: rename(S, S~)). Audited as a read of S.
    Reply stage_copy(const vault::Caller& caller, const vault::SecretView& view, const std::string& name);

    // ---- keys and certificates (fs/fuse/objects.cpp) -----------------------------------
    static bool is_object_kind(NodeKind kind);
    Reply object_lookup(const vault::Caller& caller, Node parent, std::string_view name);
    vault::Result<NodeAttr> object_stat(const vault::Caller& caller, Node node);
    Reply object_open(const vault::Caller& caller, Node node, fuse_file_info* fi);
    Reply object_read(const std::shared_ptr<Handle>& handle, size_t size, off_t off);
    Reply object_write(const std::shared_ptr<Handle>& handle, const char* buf, size_t size);
    // access(): what the policy lets the caller do with the file (R_OK to
    // read, W_OK and R_OK for an operation), never the mode bits.
    Reply object_access(const vault::Caller& caller, Node node, int mask);
    // The entries of an object directory, for opendir.
    vault::Result<std::vector<std::pair<std::string, Node>>> object_entries(const vault::Caller& caller, Node node);
    vault::Result<std::vector<std::pair<std::string, std::string>>> object_attributes(const vault::Caller& caller,
                                                                                       Node node);
    Reply object_setxattr(const vault::Caller& caller, Node node, std::string_view name,
                          std::optional<std::string_view> value);
    // The view a key or certificate node stands for.
    vault::Result<vault::ObjectView> object_view(const vault::Caller& caller, Node node);

    // ---- renames (fs/fuse/rename.cpp) ---------------------------------------------------
    Reply rename_in_vault(const vault::Caller& caller, vault::VaultId vault, const std::string& from,
                          const std::string& to, bool noreplace);
    Reply commit_staged(const vault::Caller& caller, vault::VaultId vault, const std::string& from,
                        const std::string& to, bool noreplace);

    // Writers of names whose first version they are writing: (secret id,
    // uid). Lookups show such a name to its writer (vim stats its probe file).
    void creating(std::int64_t secret, uid_t uid, bool add);
    bool is_creating(std::int64_t secret, uid_t uid);
    std::mutex creating_mutex_;
    std::multimap<std::int64_t, uid_t> creating_;

    vault::SecretService& service_;
    Objects objects_;
    UidQuota quota_;
    StagingArea staging_;  // after quota_: its files' charges go back before it does
    PollWaiters polls_;    // readers of S waiting for it to move on (poll_waiters.hpp)
    // The version id secret `secret` stands for now (for polls_).
    std::optional<std::int64_t> version_now(std::int64_t secret);
    // A handle charge for the caller's uid, or nullopt at its limit.
    std::optional<UidQuota::Charge> charge(const vault::Caller& caller) { return quota_.open(caller.who.uid); }
    // Queues the invalidation of an inode's cached attributes.
    void invalidate_attributes(std::uint64_t ino);
    void drop_page_cache(std::uint64_t ino);
    void run_invalidations();

    CallerCache callers_;
    timespec mounted_at_{};  // the root directory's times

    std::mutex inval_mutex_;
    std::condition_variable inval_cv_;
    std::deque<std::uint64_t> inval_queue_;  // inodes whose attributes changed
    std::set<std::uint64_t> page_cache_drops_;  // inodes a reader released
    std::chrono::steady_clock::time_point last_drops_{};
    fuse_session* session_ = nullptr;
    bool inval_stop_ = false;
    std::thread inval_thread_;
    PageCacheReaders page_cache_readers_;  // before handles_, whose tickets it counts
    HandleTable handles_;
};

}  // namespace vaultfs::fs
