// SecretService: policies -- reading, writing and resetting a vault's, the
// checks made on them, the refusals and management records; and the system's
// user and group names (see secret_service.hpp).
#include "vault/secrets/secret_service.hpp"

#include <grp.h>
#include <pwd.h>

#include <mutex>

namespace vaultfs::vault {

using policy::Permission;

// ---- policies ------------------------------------------------------------------------

Result<std::string> SecretService::read_policy(const Caller& caller, VaultId vault)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::manage);
    audit::Event ev{.op = "policy_get", .caller = &caller, .vault = (*v)->row.name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    std::string text = (*v)->policy->print();
    ev.bytes = text.size();
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return text;
}

Result<void> SecretService::write_policy(const Caller& caller, VaultId vault, std::string_view text)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::manage);
    audit::Event ev{.op = "policy_set", .caller = &caller, .vault = (*v)->row.name, .bytes = text.size()};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    auto parsed = policy::Policy::parse(text, names_);
    if (!parsed) {
        const std::string why = parsed.error().message();
        ev.reason = why;
        return core_.refuse(ev, Errc::invalid_argument, why);
    }
    // Refuse a lock-out: with no one able to manage the vault, no one could
    // ever change its policy again (admins have no data-plane rights; their
    // way back is the audited `vaultfs policy reset`).
    if (!parsed->someone_can_manage(names_)) {
        ev.reason = "no rule grants manage to anyone who exists: the vault could never be managed again";
        return core_.refuse(ev, Errc::invalid_argument, std::string(ev.reason));
    }
    const std::string canonical = parsed->print();
    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        if (auto r = tx.set_policy(vault, PolicyRow{canonical, now_micros(), caller.who.uid}); !r)
            return r;
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    // The commit moved the store's generation: the next open reloads the
    // vault and sees the new policy.
    return {};
}

Result<void> SecretService::check_policy_line(const Caller& caller, VaultId vault, std::string_view line, int number)
{
    auto checked = policy::Policy::check_line(line, number, names_);
    if (checked)
        return {};
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string why = checked.error().message();
    audit::Event ev{.op = "policy_set", .caller = &caller, .vault = (*v)->row.name, .reason = why};
    const Decided d = core_.decide(caller, **v, Permission::manage);  // ev.rule views its text
    d.fill(ev);
    return core_.refuse(ev, Errc::invalid_argument, why);
}

Result<void> SecretService::authorize(const Caller& caller, VaultId vault, Permission wanted, std::string_view op)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, wanted);
    if (d.allowed)
        return {};
    audit::Event ev{.op = op, .caller = &caller, .vault = (*v)->row.name};
    d.fill(ev);
    return core_.refuse(ev, Errc::access_denied);
}

Result<void> SecretService::reset_policy(const Caller& caller, std::string_view name, std::optional<uid_t> owner)
{
    const uid_t new_owner = owner.value_or(caller.who.uid);
    const std::string text = policy::Policy::owner_only(new_owner).print();
    audit::Event ev{.op = "policy_reset", .caller = &caller, .vault = name, .rule = "not-admin",
                    .bytes = text.size(), .reason = "break-glass reset through the management plane"};
    if (!is_admin(caller)) {
        ev.coalesce = true;
        return core_.refuse(ev, Errc::access_denied, "only admins reset policies");
    }
    ev.allowed = true;
    ev.rule = "admin";
    auto v = core_.load_vault(name);
    if (!v)
        return core_.refuse(ev, v.error().code, "no such vault");
    if (!names_.user_exists(new_owner))
        return core_.refuse(ev, Errc::invalid_argument, "uid " + std::to_string(new_owner) + " is no user of this system");
    const VaultId id = (*v)->row.id;
    return core_.write_audited(ev, [&](Store::Transaction& tx) {
        return tx.set_policy(id, PolicyRow{text, now_micros(), caller.who.uid});
    });
}

Result<policy::PermissionSet> SecretService::vault_permissions(const Caller& caller, VaultId vault)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    return (*v)->policy->effective(caller.who);
}

Error SecretService::refuse_over_limit(const Caller& caller, std::string_view op, std::string_view vault,
                                       std::string_view secret, Errc code)
{
    const std::string_view reason = code == Errc::too_many_open ? "the uid holds as many open files as it may"
                                                                : "the uid buffers as many bytes as it may";
    auto r = core_.refuse(audit::Event{.op = op,
                                 .caller = &caller,
                                 .vault = vault,
                                 .secret = secret,
                                 .allowed = false,
                                 .rule = "per-uid-limit",
                                 .reason = reason,
                                 .coalesce = true},
                    code);
    return r.value();
}

Result<void> SecretService::audit_management(const Caller& caller, std::string_view op, std::string_view vault,
                                             bool allowed, std::string_view rule, Errc* failure)
{
    return core_.record(audit::Event{.op = op,
                               .caller = &caller,
                               .vault = vault,
                               .allowed = allowed,
                               .rule = rule,
                               .result = failure != nullptr ? result_name(*failure) : std::string_view("ok"),
                               .coalesce = !allowed && !is_admin(caller)});
}

// ---- names ---------------------------------------------------------------------------

std::optional<uid_t> SystemNameResolver::user_id(std::string_view name) const
{
    const std::string n(name);
    passwd pw{};
    passwd* out = nullptr;
    std::vector<char> buf(16384);
    if (::getpwnam_r(n.c_str(), &pw, buf.data(), buf.size(), &out) != 0 || out == nullptr)
        return std::nullopt;
    return out->pw_uid;
}

bool SystemNameResolver::user_exists(uid_t uid) const
{
    passwd pw{};
    passwd* out = nullptr;
    std::vector<char> buf(16384);
    return ::getpwuid_r(uid, &pw, buf.data(), buf.size(), &out) == 0 && out != nullptr;
}

bool SystemNameResolver::group_has_members(gid_t gid) const
{
    {
        group gr{};
        group* out = nullptr;
        std::vector<char> buf(65536);
        if (::getgrgid_r(gid, &gr, buf.data(), buf.size(), &out) != 0 || out == nullptr)
            return false;
        if (out->gr_mem != nullptr && out->gr_mem[0] != nullptr)
            return true;
    }
    // Members by primary group are not listed in the group: ask every user.
    // (Rare: only when a policy's sole manager is a group.)
    static std::mutex mutex;  // the passwd enumeration is process-wide
    std::lock_guard lock(mutex);
    bool found = false;
    ::setpwent();
    passwd pw{};
    passwd* out = nullptr;
    std::vector<char> buf(16384);
    while (!found && ::getpwent_r(&pw, buf.data(), buf.size(), &out) == 0 && out != nullptr)
        found = out->pw_gid == gid;
    ::endpwent();
    return found;
}

std::optional<gid_t> SystemNameResolver::group_id(std::string_view name) const
{
    const std::string n(name);
    group gr{};
    group* out = nullptr;
    std::vector<char> buf(65536);
    if (::getgrnam_r(n.c_str(), &gr, buf.data(), buf.size(), &out) != 0 || out == nullptr)
        return std::nullopt;
    return out->gr_gid;
}

}  // namespace vaultfs::vault
