// SecretService: the domain of vaultfs, with no knowledge of FUSE.
//
// Every call takes the Caller (uid, gid, groups from the kernel) and decides
// with the vault's policy; every operation listed in docs/design.md §5 writes one
// audit record — allowed or denied — before it returns. If that record
// cannot be written the call fails with Errc::audit_unavailable and returns
// no secret bytes.
//
// Visibility rules (docs/design.md §1):
//   - a vault is visible to a caller who holds any permission in it, and to
//     admins (uid 0 or the admin group), who may create and remove vaults
//     but get no data access beyond what a policy grants;
//   - looking at anything inside a vault needs some permission on it;
//   - reading needs `get`, writing `set`, listing `list`, the policy
//     `manage`.
// A caller who holds nothing where it knocks -- a lookup of a hidden or
// missing vault by a non-admin, any look into a vault it holds nothing in,
// a non-admin at the root -- is refused and audited as an outsider (op
// `lookup` for looks): the audit coalesces those records (audit/log.hpp).
// Decisions with unknown supplementary groups follow policy::Policy::evaluate
// and are audited with the reason.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <memory>
#include <algorithm>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "hsm/key_service.hpp"
#include "hsm/secure_buffer.hpp"
#include "policy/policy.hpp"
#include "vault/audit/log.hpp"
#include "vault/core.hpp"
#include "vault/crypto/dek_cache.hpp"
#include "vault/model/error.hpp"
#include "vault/store/store.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {

struct VaultSettings {
    int retention_days = 90;  // 7..90
    bool purge_protection = false;
    int rekey_after_days = 0;  // a new KEK every this many days; 0: only when asked (vault/kek/rekey.hpp)
};

struct VaultView {
    VaultId id;
    std::string name;
    Micros created = 0;
    VaultSettings settings;
    policy::PermissionSet permissions;  // vault-wide, for this caller
    bool caller_is_admin = false;
    std::size_t policy_size = 0;  // bytes of the canonical policy text
    Ownership defaults;           // what its new secrets show
    Micros kek_created = 0;       // when the KEK in use was made
};

// A secret as one path names it: `S` (the current version) or `S@N`.
struct SecretView {
    VaultId vault;
    std::string vault_name;
    SecretId id;
    std::string name;
    Micros secret_created = 0;  // distinguishes a re-created name
    VersionRow version;         // the version this view stands for
    bool pinned = false;        // true for S@N
    policy::PermissionSet permissions;
    Ownership ownership;        // what stat shows, the same for every caller
    Micros changed = 0;         // secrets.changed (see content_time)

    // S's mtime and ctime: when what it serves last changed -- a new
    // version, a disable or enable, or a validity change (recorded), or
    // not_before or expires passing (by `now`). Never earlier than the
    // version's creation, never backwards. S@N's are its version's own.
    Micros content_time(Micros now) const
    {
        Micros t = std::max(changed, version.created);
        if (version.not_before && *version.not_before <= now)
            t = std::max(t, *version.not_before);
        if (version.expires && *version.expires <= now)
            t = std::max(t, *version.expires);
        return t;
    }
};

// A soft-deleted secret as `.deleted/S` names it.
struct DeletedView {
    VaultId vault;
    std::string vault_name;
    SecretId id;
    std::string name;
    Micros secret_created = 0;
    Micros deleted_at = 0;
    Micros purge_at = 0;
    policy::PermissionSet permissions;
    Ownership ownership;
};

// Permission to commit new versions of one secret, granted at open.
struct WriteGrant {
    VaultId vault;
    std::string vault_name;
    SecretId secret;
    std::string name;
    Micros secret_created = 0;
};

// A vault listing opened by a caller holding `list` (audited once). Each
// page re-checks `list` for that caller against the policy in force.
struct ListingGrant {
    VaultId vault;
    std::string vault_name;
    Caller caller;
};

// A version opened for reading: what a reader's file handle keeps. It holds
// the sealed value and its unsealed DEK (in locked memory, shared with the
// DEK cache and other readers of the version) -- never the plaintext, which
// plaintext() decrypts into a fresh locked buffer for each read. So an open
// handle pins a few dozen bytes of locked memory, however large its value.
class OpenValue {
public:
    OpenValue(std::shared_ptr<const hsm::SecureBuffer> dek, std::vector<std::uint8_t> nonce,
              std::vector<std::uint8_t> ciphertext, std::vector<std::uint8_t> aad, std::uint64_t size)
        : dek_(std::move(dek)), nonce_(std::move(nonce)), ciphertext_(std::move(ciphertext)), aad_(std::move(aad)),
          size_(size)
    {
    }
    std::uint64_t size() const { return size_; }
    // The value, authenticated again. Errc::out_of_memory when the locked
    // heap is full; Errc::integrity never, unless memory was corrupted.
    Result<hsm::SecureBuffer> plaintext() const;

private:
    std::shared_ptr<const hsm::SecureBuffer> dek_;
    std::vector<std::uint8_t> nonce_;
    std::vector<std::uint8_t> ciphertext_;
    std::vector<std::uint8_t> aad_;
    std::uint64_t size_;
};

struct Options {
    std::int64_t retention_day_ms = 86400000;
    // Signs backups (the state's token-held signing key) and checks them.
    hsm::KeyId signing_key;
    std::string signing_public_pem;
    // Keys and certificates in whole-vault backups (vault/objects/
    // object_backup.hpp), which this service knows only as JSON: what a
    // backup adds, and the work a restore runs in its transaction (planned
    // first, with the token). Unset: backups hold secrets only.
    std::function<Result<nlohmann::json>(const Caller&, const VaultEntry&)> backup_objects;
    std::function<Result<std::function<Result<std::vector<std::string>>(Store::Transaction&)>>(
        const Caller&, const VaultEntry& target, VaultId source, const nlohmann::json& objects)>
        restore_objects;
    // A shared store: runs in the transaction that creates a vault's KEK (its
    // check value, and the KEK wrapped for the other hosts; vault/hosts).
    std::function<Result<void>(Store::Transaction&, const hsm::KeyId&)> on_new_kek;
    // Where new KEKs may go: one host's never leave its token; a shared
    // store's leave only under keys its Security Officer trusted.
    hsm::KekReach kek_reach = hsm::KekReach::this_token;
};

class SecretService {
public:
    // `core` holds the vaults, policies and audit writer shared with the
    // other object kinds (vault/core.hpp).
    SecretService(Core& core, hsm::KeyService& keys, DekCache& deks, Options options);

    // ---- vaults ----------------------------------------------------------------
    bool is_admin(const Caller& caller) const { return core_.is_admin(caller); }
    // Vaults visible to the caller, by id.
    Result<std::vector<VaultView>> list_vaults(const Caller& caller);
    // Errc::not_found when missing, malformed, or not visible.
    Result<VaultView> find_vault(const Caller& caller, std::string_view name);
    Result<VaultView> vault(const Caller& caller, VaultId id);
    // Admins only. The new vault's policy grants the caller `*`. Audited.
    Result<VaultView> create_vault(const Caller& caller, std::string_view name, VaultSettings settings);
    // Admins only; Errc::not_empty while it holds live or soft-deleted
    // secrets. Audited.
    Result<void> remove_vault(const Caller& caller, std::string_view name);

    // ---- looking ---------------------------------------------------------------
    // "S" or "S@N" in a vault; needs some permission on the vault.
    // Errc::not_found for malformed names, unknown or soft-deleted secrets.
    Result<SecretView> find_secret(const Caller& caller, VaultId vault, std::string_view component);
    // A name whose first version is still being written (a writer holds it
    // open): its view, version number 0 and size 0; Errc::not_found for any
    // other name. For the filesystem to show its writer the file it creates.
    Result<SecretView> find_pending(const Caller& caller, VaultId vault, std::string_view name);
    // The current version of a secret / one version row, by id (for inodes).
    // A secret whose first version is still being written has version
    // number 0 and size 0.
    Result<SecretView> secret_by_id(const Caller& caller, SecretId id);
    Result<SecretView> version_by_id(const Caller& caller, VersionId id);
    // `S` as it stood for this version (the filesystem's inode of S for that
    // version): the version's view, not pinned (writable as S is).
    Result<SecretView> secret_at_version(const Caller& caller, VersionId id);

    // ---- listing ---------------------------------------------------------------
    // Needs `list`. Audited ("list").
    Result<ListingGrant> open_listing(const Caller& caller, VaultId vault);
    // Pages of a listing already granted: `list` is checked again (a
    // refusal is audited, "list"), an allowed page is not audited again.
    Result<std::vector<SecretName>> secrets_page(const ListingGrant& grant, SecretId after, std::size_t limit);
    // The version secret `id` stands for now, or nullopt when it is gone
    // (deleted). Neither checked nor audited: it is for a reader that
    // already holds S open (poll), and says only whether S has moved on
    // from the version that reader has. An error when the store cannot say.
    Result<std::optional<VersionId>> version_now(SecretId id);
    // Changes whenever the store may have changed (Store::generation).
    std::uint64_t change_count() const;
    Result<std::vector<VersionEntry>> versions_page(const ListingGrant& grant, VersionId after, std::size_t limit);
    // A page of secrets with the version each stands for, as views (a
    // listing with attributes: readdirplus). Checked like secrets_page.
    Result<std::vector<SecretView>> secrets_with_current(const ListingGrant& grant, SecretId after, std::size_t limit);

    // ---- values ----------------------------------------------------------------
    // Needs `get`. Checks enabled / not_before / expires, unseals the DEK of
    // the version `target` stands for and authenticates its value (a
    // tampered row is Errc::integrity here, not at a later read), audits
    // ("get"), and returns it opened. With `authenticated`, the plaintext
    // that check decrypted is moved there (locked memory) for the caller's
    // one use, instead of being wiped.
    Result<OpenValue> open_value(const Caller& caller, const SecretView& target,
                                 hsm::SecureBuffer* authenticated = nullptr);
    // A restart: the value of a handle the old process opened (and
    // audited), opened again here. No policy or validity check (an open
    // handle keeps what it opened); the value is authenticated as at open.
    Result<OpenValue> reopen_value(VersionId version);

    struct WriteIntent {
        bool create = false;     // O_CREAT
        bool exclusive = false;  // O_EXCL
    };
    // Needs `set`. Validates the name (Errc::invalid_argument), refuses a
    // soft-deleted name (Errc::already_exists), and makes the secret's row if
    // it is new. Audited ("set").
    Result<WriteGrant> open_for_write(const Caller& caller, VaultId vault, std::string_view name, WriteIntent intent);
    // Whether a commit through `grant` could succeed now -- `set` still
    // granted, the secret still there and not deleted, the audit and the
    // token able to take it -- so that write() fails with the reason instead
    // of a close() that a shell never checks. A revoked `set` is audited
    // ("commit", denied); the rest is not (nothing happened yet).
    Result<void> check_commit(const Caller& caller, const WriteGrant& grant);
    // Commits `value` as the next version: sealed under a fresh DEK, durable
    // when this returns. Re-checks `set` against the policy in force, so a
    // writer whose grant was revoked since open commits nothing
    // (Errc::access_denied). Errc::too_large above 25 KiB, Errc::not_found
    // when the secret was deleted meanwhile (nothing committed). Audited
    // ("commit").
    Result<std::uint64_t> commit(const Caller& caller, const WriteGrant& grant, const hsm::SecureBuffer& value);

    // ---- what tools do (docs/filesystem.md "Admin tools"; vault/secrets/replace.cpp) --------------
    // A file staged under a name that is not a secret's, renamed onto `name`:
    // `value` becomes its next version (the secret is made if new). Needs
    // `set`; one audited record ("commit", with `from`). `noreplace`
    // (RENAME_NOREPLACE): Errc::already_exists when `name` is live. A
    // soft-deleted `name` is Errc::already_exists, unless the caller's uid
    // deleted it within the fresh window and holds `recover` (see
    // open_for_write). `ownership`, when given and different from what
    // `name` shows, is applied if the caller holds `manage`.
    Result<std::uint64_t> commit_renamed(const Caller& caller, VaultId vault, std::string_view name,
                                         const hsm::SecureBuffer& value, std::string_view from, bool noreplace,
                                         std::optional<Ownership> ownership);
    // rename(from, to) between secret names. Only a fresh `from` moves (see
    // is_fresh: a tool's temporary file, such as sed -i's): its value
    // becomes the next version of `to` and `from` is gone for good, in one
    // transaction. Needs `set` on `to`. Anything else is Errc::not_permitted
    // (values are bound to their names; a secret is never renamed). Audited
    // ("rename", with `from`).
    Result<std::uint64_t> rename_fresh(const Caller& caller, VaultId vault, std::string_view from, std::string_view to,
                                       bool noreplace);
    // How long a secret stays fresh: created by one uid, with at most one
    // version, written by that uid. One that its uid renames onto another
    // name moves (rename_fresh); an empty one that its uid deletes goes for
    // good, not to .deleted (vim's `4913` probe file).
    static constexpr Micros fresh_window = 10 * 1000000;

    // ---- ownership (vault/secrets/ownership.cpp) ----------------------------------------
    // chown/chmod of a secret (all its versions): what stat shows, never who
    // may read it. Setting what is already shown succeeds and records
    // nothing; changing it needs `manage` (Errc::not_permitted otherwise,
    // audited). Only permission bits (0777) (Errc::invalid_argument).
    // Audited ("chown" / "chmod").
    Result<void> set_ownership(const Caller& caller, const SecretView& target, std::optional<uid_t> owner,
                               std::optional<gid_t> group, std::optional<std::uint32_t> mode);

    // ---- policies --------------------------------------------------------------
    // Checks one line of policy text as it arrives (for write(); see
    // policy::Policy::check_line). Errc::invalid_argument naming the line;
    // the refusal is audited ("policy_set").
    Result<void> check_policy_line(const Caller& caller, VaultId vault, std::string_view line, int number);
    // Needs `manage`. Audited ("policy_get" / "policy_set").
    Result<std::string> read_policy(const Caller& caller, VaultId vault);
    // Parses and swaps in the new policy atomically. Errc::invalid_argument
    // (message names the line) leaves the old policy in force.
    Result<void> write_policy(const Caller& caller, VaultId vault, std::string_view text);
    // Checks `wanted` without doing anything else; a refusal is audited as
    // `op`. For opens whose real work (and allowed record) comes later.
    Result<void> authorize(const Caller& caller, VaultId vault, policy::Permission wanted, std::string_view op);
    // The permissions the caller holds on the vault (for .policy's mode).
    Result<policy::PermissionSet> vault_permissions(const Caller& caller, VaultId vault);
    // Admins only, through the management plane: the break-glass way back
    // into a vault nobody can manage. Replaces its policy with
    // `allow uid:OWNER *` (the caller by default). Audited ("policy_reset").
    Result<void> reset_policy(const Caller& caller, std::string_view vault, std::optional<uid_t> owner);
    // Whether the vault is visible to the caller now (no audit record; for
    // filtering a root listing taken earlier).
    bool visible(const Caller& caller, VaultId vault);

    // ---- lifecycle (Azure Key Vault's soft delete) ------------------------------
    // Needs `delete`. Moves the secret to `.deleted` until its vault's
    // retention ends. Audited ("delete").
    Result<void> delete_secret(const Caller& caller, VaultId vault, std::string_view name);
    Result<DeletedView> find_deleted(const Caller& caller, VaultId vault, std::string_view name);
    Result<DeletedView> deleted_by_id(const Caller& caller, SecretId id);
    Result<std::vector<SecretRow>> deleted_page(const ListingGrant& grant, SecretId after, std::size_t limit);
    // Needs `recover`: the secret comes back with all versions. Audited.
    Result<void> recover(const Caller& caller, VaultId vault, std::string_view name);
    // Needs `purge`: gone for good. Errc::not_permitted while the vault's
    // purge protection holds it (before its purge date). Audited.
    Result<void> purge(const Caller& caller, VaultId vault, std::string_view name);
    // Purges every soft-deleted secret whose retention has ended; each purge
    // is audited as the daemon's. Returns how many went.
    Result<std::size_t> purge_expired();

    // ---- attributes (names without the xattr prefix "user.vault.") ----------
    // Reading needs `get` or `list`; audited ("xattr_list", "xattr_get").
    // A missing attribute is Errc::no_attribute.
    Result<std::vector<std::string>> list_attributes(const Caller& caller, const SecretView& target);
    Result<std::string> get_attribute(const Caller& caller, const SecretView& target, std::string_view name);
    // Needs `set`; applies to the version `target` stands for. nullopt
    // removes (tags, not_before, expires, content_type). Invalid names or
    // values: Errc::invalid_argument; read-only ones: Errc::not_permitted.
    // Audited ("xattr_set").
    Result<void> set_attribute(const Caller& caller, const SecretView& target, std::string_view name,
                               std::optional<std::string_view> value);
    // `deleted` and `scheduled_purge` of a soft-deleted secret.
    Result<std::vector<std::pair<std::string, std::string>>> deleted_attributes(const Caller& caller,
                                                                                 const DeletedView& target);
    // `retention_days` and `purge_protection` of a vault, set by admins only
    // (purge protection can be turned on, never off: Errc::not_permitted);
    // and `default_owner`, `default_group` (names or ids) and `default_mode`
    // (octal), what new secrets show, set by `manage` holders.
    Result<std::vector<std::pair<std::string, std::string>>> vault_attributes(const Caller& caller, VaultId vault);
    Result<void> set_vault_attribute(const Caller& caller, VaultId vault, std::string_view name,
                                     std::string_view value);

    // ---- backup and restore (data plane: needs `backup` / `restore`) ---------
    // A signed JSON document holding the vault's (or one secret's) live
    // secrets as ciphertext and sealed DEKs — never plaintext. Audited.
    Result<std::string> backup(const Caller& caller, std::string_view vault, std::optional<std::string_view> secret);
    // Restores a backup into `into` (default: its own vault, which must
    // exist). Needs the backup's KEK in this token (else
    // Errc::key_unavailable, with a message saying so) and a valid signature
    // from this state (else Errc::integrity). Refuses to overwrite any
    // existing or soft-deleted secret (Errc::already_exists) and then
    // restores nothing. Returns the restored names. Audited.
    Result<std::vector<std::string>> restore(const Caller& caller, std::string_view document,
                                             std::optional<std::string_view> into);

    // Refuses an operation past one of the caller's per-uid limits (open
    // files: Errc::too_many_open; buffered bytes: Errc::out_of_memory),
    // audited as a coalesced refusal. Returns the error to report.
    Error refuse_over_limit(const Caller& caller, std::string_view op, std::string_view vault, std::string_view secret,
                            Errc code);

    // Records a management call that does nothing else (status, vault
    // show/list, refused socket callers).
    Result<void> audit_management(const Caller& caller, std::string_view op, std::string_view vault, bool allowed,
                                  std::string_view rule, Errc* failure = nullptr);

    DekCache& dek_cache() { return deks_; }
    hsm::KeyService& keys() { return keys_; }
    audit::Log& audit_log() { return audit_; }
    Store& store() { return store_; }
    Core& core() { return core_; }

private:

    Result<DeletedView> deleted_view(const Caller& caller, const VaultEntry& v, const SecretRow& s);
    // Whether `s` is fresh for the caller (fresh_window): `first` is its
    // one version, if it has one.
    bool is_fresh(const Caller& caller, const SecretRow& s, const std::optional<VersionRow>& first) const;
    // Seals `value` as the next version of `secret` and commits it with
    // `also` (more work in the same transaction) and `ev` recorded before
    // COMMIT. Fills ev.version. Refusals are recorded as `ev`.
    Result<std::uint64_t> seal_and_commit(const Caller& caller, const VaultEntry& v, SecretId secret,
                                          std::string_view name, const hsm::SecureBuffer& value, audit::Event& ev,
                                          const std::function<Result<void>(Store::Transaction&)>& also);
    // A soft-deleted `s` that the caller's uid deleted within the fresh
    // window, recovered if the caller holds `recover` (audited); false when
    // it stays deleted.
    Result<bool> recover_own_delete(const Caller& caller, const VaultEntry& v, const SecretRow& s);
    // A write of `name` as `ev`: a secret's name and `set` granted, else
    // refused (and recorded) as `ev`. The caller fills `ev` from the
    // decision it gets back, which `ev` then views.
    Result<Decided> decide_write(const Caller& caller, const VaultEntry& v, std::string_view name, audit::Event& ev);
    // The row for `name`, made (without versions) if missing.
    Result<SecretRow> ensure_row(VaultId vault, std::string_view name, uid_t by);
    // What a rename may replace: `name`'s row, made if missing, recovered
    // if the caller's uid just deleted it (recover_own_delete); refused as
    // `ev` when soft-deleted otherwise, or live under `noreplace`.
    Result<SecretRow> replace_target(const Caller& caller, const VaultEntry& v, std::string_view name, bool noreplace,
                                     audit::Event& ev);
    // Purges one secret inside a write, auditing it as `ev`.
    Result<void> purge_row(const SecretRow& s, audit::Event ev);
    VaultView view_of(const Caller& caller, const VaultEntry& v) const;
    Result<SecretView> view_of(const Caller& caller, const VaultEntry& v, const SecretRow& s, VersionRow version,
                               bool pinned);
    Result<SecretView> by_version_id(const Caller& caller, VersionId id, bool pinned);
    // What a secret whose first version is being written stands for:
    // version number 0, size 0, its row's times.
    static VersionRow no_version_yet(const SecretRow& s);
    // The version's DEK, from the cache or unsealed by the token.
    Result<DekCache::Dek> unseal_dek(const VaultEntry& v, const SecretRow& s, const SealedVersion& sealed);
    // `list` still granted to the caller of a listing, or an audited refusal.
    Result<void> still_listing(const ListingGrant& grant);

    Core& core_;
    Store& store_;
    hsm::KeyService& keys_;
    DekCache& deks_;
    audit::Log& audit_;
    const policy::NameResolver& names_;
    Options options_;

    // A read the store could not serve (unreachable, or a shared store not
    // confirmed fresh: EIO) is refused and audited; other errors pass.
    tl::unexpected<Error> refused_read(const Caller& caller, std::string_view vault, std::string_view name,
                                       const Error& e);

    // Who deleted what in the last fresh window: (vault, name) -> (uid, when).
    // `install` removes its target before it creates it again.
    struct RecentDelete {
        uid_t uid;
        Micros at;
    };
    std::mutex deletes_mutex_;
    std::map<std::pair<std::int64_t, std::string>, RecentDelete> recent_deletes_;

};

// Resolves user and group names through the system databases (NSS).
class SystemNameResolver final : public policy::NameResolver {
public:
    std::optional<uid_t> user_id(std::string_view name) const override;
    std::optional<gid_t> group_id(std::string_view name) const override;
    bool user_exists(uid_t uid) const override;
    bool group_has_members(gid_t gid) const override;
};

}  // namespace vaultfs::vault
