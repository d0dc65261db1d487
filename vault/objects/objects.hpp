// Objects: what keys and certificates share -- finding one by `NAME` or
// `NAME@N`, listing them and their versions, and their `user.vault.*`
// attributes -- over the Core (vault/core.hpp), with the same visibility
// rules as secrets (secret_service.hpp): looking needs some permission in
// the vault, listing needs `list`, reading attributes `get`, `list` or (for
// certificates) `certificates`, changing them `set`.
//
// Records name an object by its path in the vault: ".keys/NAME",
// ".certs/NAME" (the `secret` field of audit::Event).
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "policy/policy.hpp"
#include "vault/core.hpp"
#include "vault/model/error.hpp"
#include "vault/store/store.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {

// A key or certificate as one path names it: `NAME` (the version it stands
// for) or `NAME@N`.
struct ObjectView {
    VaultId vault;
    std::string vault_name;
    ObjectRow object;
    ObjectVersionRow version;
    bool pinned = false;
    policy::PermissionSet permissions;  // the caller's, for this name
};

// What an exportable certificate key's seal is bound to (with the vault and
// its KEK, envelope.hpp): its name and the version's random `key_ref`.
std::string sealed_key_binding(std::string_view name, const ObjectVersionRow& row);

class Objects {
public:
    Objects(Core& core, ObjectKind kind) : core_(core), kind_(kind) {}

    ObjectKind kind() const { return kind_; }
    // ".keys/NAME" or ".certs/NAME": how records and messages name it.
    std::string path_of(std::string_view name) const;

    // Needs some permission in the vault (else an audited outsider's
    // lookup and Errc::not_found). Errc::not_found for malformed names,
    // unknown objects and objects without versions.
    Result<ObjectView> find(const Caller& caller, VaultId vault, std::string_view component);
    // The same by the version's row id (the filesystem's inodes).
    Result<ObjectView> by_version_id(const Caller& caller, ObjectVersionId id, bool pinned);

    // Needs `list`; audited ("list").
    Result<std::vector<ObjectRow>> list(const Caller& caller, VaultId vault);
    Result<std::vector<ObjectVersionRow>> versions(const Caller& caller, const ObjectView& view);

    // enabled, not_before, expires, created, version, tag.* (and what `extra`
    // adds: a kind's own read-only attributes). Needs `get`, `list` or
    // `certificates` (for certificates); audited ("xattr_get").
    Result<std::vector<std::pair<std::string, std::string>>> attributes(
        const Caller& caller, const ObjectView& view, std::vector<std::pair<std::string, std::string>> extra);
    // enabled, not_before, expires (nullopt or empty clears the times),
    // tag.NAME (nullopt removes it; limits as for secrets, attributes.hpp).
    // Needs `set`; audited ("xattr_set"). Errc::invalid_argument for bad
    // values, Errc::not_permitted for read-only names.
    Result<void> set_attribute(const Caller& caller, const ObjectView& view, std::string_view name,
                               std::optional<std::string_view> value);

    // Checks `wanted` on the object for an operation whose real work (and
    // allowed record) comes later; a refusal is audited as `op`.
    Result<void> authorize(const Caller& caller, const ObjectView& view, policy::Permission wanted,
                           std::string_view op);

    // The view of `version` of `object` in `v` for the caller.
    ObjectView view_of(const Caller& caller, const VaultEntry& v, ObjectRow object, ObjectVersionRow version,
                       bool pinned) const;
    // An object by name for an operation that needs `wanted` (create,
    // rotate, ...): the vault and the object's row, or an audited refusal
    // as `op`. The object may be missing (nullopt) only if `may_be_missing`.
    struct Target {
        std::shared_ptr<const VaultEntry> vault;
        std::optional<ObjectRow> object;
        Decided decided;
    };
    Result<Target> target(const Caller& caller, std::string_view vault, std::string_view name,
                          policy::Permission wanted, std::string_view op, bool may_be_missing);
    // The same for an operation that may be the daemon's own (caller null:
    // a rotation or renewal policy), decided as `daemon_rule`.
    Result<Target> target(const Caller* caller, std::string_view vault, std::string_view name,
                          policy::Permission wanted, std::string_view op, std::string_view daemon_rule);

private:
    Core& core_;
    const ObjectKind kind_;
};

}  // namespace vaultfs::vault
