// Core: what every object kind shares -- secrets, keys and certificates
// alike. It knows vaults, their policies and the audit writer, and nothing
// of any object kind: each domain service (SecretService, keys::KeyVault,
// certificates::Certificates) sits above it and follows one pattern:
//
//   authorize (decide)  →  audit the decision (refuse / record)
//                        →  act  →  audit the outcome (write_audited)
//
// Vault entries (a vault's row and its parsed policy) are cached for one
// store generation: any committed write -- a policy, a setting, a vault
// removed -- makes the next use reload, so no path can leave an older
// policy in force.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>

#include "hsm/error.hpp"
#include "policy/policy.hpp"
#include "vault/audit/log.hpp"
#include "vault/model/error.hpp"
#include "vault/store/store.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {

// A vault as the core holds it: its row and the policy in force.
struct VaultEntry {
    VaultRow row;
    std::shared_ptr<const policy::Policy> policy;
    std::size_t policy_size = 0;
    std::uint64_t generation = 0;  // the store generation it was read in
};

// The policy's answer for one operation in a vault, ready for its record:
// the rule that decided, why when that is not the rule alone (unknown
// groups), and whether the caller holds nothing in the vault at all (an
// outsider, whose refusals the audit coalesces).
struct Decided {
    bool allowed = false;
    std::string rule;
    std::string_view reason;
    bool outsider = false;
    void fill(audit::Event& ev) const;
};

class Core {
public:
    // Audits the outcome of every commit the store left in doubt
    // (Store::on_in_doubt_resolved) for as long as it lives. REQUIRES: the
    // store and the audit log outlive it.
    Core(Store& store, audit::Log& audit, const policy::NameResolver& names, std::optional<gid_t> admin_gid);
    ~Core();
    Core(const Core&) = delete;
    Core& operator=(const Core&) = delete;

    Store& store() { return store_; }
    audit::Log& audit_log() { return audit_; }
    const policy::NameResolver& names() const { return names_; }

    // uid 0 or a member of the admin group.
    bool is_admin(const Caller& caller) const;

    Result<std::shared_ptr<const VaultEntry>> load_vault(VaultId id);
    // Errc::not_found for a malformed or unknown name.
    Result<std::shared_ptr<const VaultEntry>> load_vault(std::string_view name);
    void forget_vault(VaultId id);
    static std::shared_ptr<const VaultEntry> make_entry(VaultRow row, policy::Policy policy, std::uint64_t generation);

    // The policy's decision on `wanted` (for `object` when named).
    Decided decide(const Caller& caller, const VaultEntry& v, policy::Permission wanted,
                   std::optional<std::string_view> object = std::nullopt) const;
    // Like decide() for an operation any one of `wanted` allows: the first
    // that does decides, else the first one's refusal.
    Decided decide_any(const Caller& caller, const VaultEntry& v, std::initializer_list<policy::Permission> wanted,
                       std::string_view object) const;
    // Whether the caller may look into `v` (some permission there, or an
    // admin where `admins_see`); if not, the look is audited as an
    // outsider's `lookup` and refused with `code`.
    Result<void> reach(const Caller& caller, const VaultEntry& v, std::string_view object, bool admins_see, Errc code);
    // A non-admin's look for a vault that is not there (or not a name).
    Result<void> missed_vault(const Caller& caller, std::string_view name, std::string_view why);

    // Appends a record; maps a failure to Errc::audit_unavailable.
    Result<void> record(const audit::Event& event);
    // Records a denial/failure and returns `code` (or audit_unavailable).
    tl::unexpected<Error> refuse(audit::Event event, Errc code, std::string message = {});
    // Runs `work` in a write transaction and records `event` in it, before
    // COMMIT: if the audit cannot take the record, nothing commits. A failure
    // of `work` (or of the commit) is recorded as `event`'s refusal.
    Result<void> write_audited(audit::Event event, const std::function<Result<void>(Store::Transaction&)>& work);

    // "3: allow uid:1001 get", or "default-deny": the `rule` of a record.
    static std::string rule_of(const policy::Decision& d);
    // A token failure as the domain reports it.
    static Error from_hsm(const hsm::Error& e);

private:
    Store& store_;
    audit::Log& audit_;
    const policy::NameResolver& names_;
    std::optional<gid_t> admin_gid_;

    std::shared_mutex vaults_mutex_;
    std::map<std::int64_t, std::shared_ptr<const VaultEntry>> vaults_;  // by id
};

}  // namespace vaultfs::vault
