// SecretService: owners, groups and modes -- what `stat` shows of a secret,
// the same for every caller, for consumers that check them (ssh, PostgreSQL).
// Metadata only: the vault's policy decides every access.

#include "vault/model/attributes.hpp"
#include "vault/secrets/secret_service.hpp"

namespace vaultfs::vault {

using policy::Permission;

Result<void> SecretService::set_ownership(const Caller& caller, const SecretView& target, std::optional<uid_t> owner,
                                          std::optional<gid_t> group, std::optional<std::uint32_t> mode)
{
    auto v = core_.load_vault(target.vault);
    if (!v)
        return tl::unexpected(v.error());
    const bool chmod = mode.has_value();
    audit::Event ev{.op = chmod ? "chmod" : "chown", .caller = &caller, .vault = target.vault_name,
                    .secret = target.name};
    if (mode && *mode > 0777) {
        ev.rule = "permission-bits-only";
        return core_.refuse(ev, Errc::invalid_argument, "a secret's mode has permission bits only (0777)");
    }
    auto row = store_.secret_by_id(target.id);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row || (*row)->deleted())
        return fail(Errc::not_found);
    const Ownership shown = (*row)->ownership((*v)->row.defaults);
    const Ownership wanted{owner.value_or(shown.owner), group.value_or(shown.group), mode.value_or(shown.mode)};
    // cp -a, rsync, vim and emacs set what they found: nothing to do.
    if (wanted == shown)
        return {};
    const std::string what = chmod ? "mode " + format_mode(wanted.mode)
                                   : "owner " + std::to_string(wanted.owner) + ":" + std::to_string(wanted.group);
    ev.attribute = what;
    const Decided d = core_.decide(caller, **v, Permission::manage);
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::not_permitted, "changing the owner or mode of a secret needs manage");
    const std::optional<uid_t> new_owner = owner ? owner : (*row)->owner;
    const std::optional<gid_t> new_group = group ? group : (*row)->group;
    const std::optional<std::uint32_t> new_mode = mode ? mode : (*row)->mode;
    return core_.write_audited(ev, [&](Store::Transaction& tx) {
        return tx.set_ownership(target.id, new_owner, new_group, new_mode);
    });
}

}  // namespace vaultfs::vault
