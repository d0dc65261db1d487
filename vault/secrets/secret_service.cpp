#include "vault/secrets/secret_service.hpp"

#include <spdlog/spdlog.h>

#include "vault/model/names.hpp"

namespace vaultfs::vault {

using policy::Permission;

SecretService::SecretService(Core& core, hsm::KeyService& keys, DekCache& deks, Options options)
    : core_(core), store_(core.store()), keys_(keys), deks_(deks), audit_(core.audit_log()), names_(core.names()),
      options_(std::move(options))
{
}

// ---- helpers -------------------------------------------------------------------

VaultView SecretService::view_of(const Caller& caller, const VaultEntry& v) const
{
    return VaultView{v.row.id,
                     v.row.name,
                     v.row.created,
                     VaultSettings{v.row.retention_days, v.row.purge_protection, v.row.rekey_after_days},
                     v.policy->effective(caller.who),
                     is_admin(caller),
                     v.policy_size,
                     v.row.defaults,
                     v.row.kek_created};
}

Result<SecretView> SecretService::view_of(const Caller& caller, const VaultEntry& v, const SecretRow& s,
                                          VersionRow version, bool pinned)
{
    return SecretView{v.row.id, v.row.name, s.id,   s.name, s.created, std::move(version),
                      pinned,   v.policy->effective(caller.who, s.name), s.ownership(v.row.defaults), s.changed};
}

// ---- vaults --------------------------------------------------------------------

Result<std::vector<VaultView>> SecretService::list_vaults(const Caller& caller)
{
    auto rows = store_.vaults();
    if (!rows)
        return tl::unexpected(rows.error());
    std::vector<VaultView> out;
    for (const auto& row : *rows) {
        auto v = core_.load_vault(row.id);
        if (!v)
            continue;  // removed meanwhile
        if (is_admin(caller) || (*v)->policy->holds_any(caller.who))
            out.push_back(view_of(caller, **v));
    }
    return out;
}

Result<VaultView> SecretService::find_vault(const Caller& caller, std::string_view name)
{
    auto v = core_.load_vault(name);
    if (!v) {
        if (v.error().code != Errc::not_found)
            return refused_read(caller, name, "", v.error());
        if (auto r = core_.missed_vault(caller, name, is_valid_vault_name(name) ? "no such vault" : "not a vault name"); !r)
            return tl::unexpected(r.error());
    }
    if (auto r = core_.reach(caller, **v, {}, true, Errc::not_found); !r)
        return tl::unexpected(r.error());
    return view_of(caller, **v);
}

Result<VaultView> SecretService::vault(const Caller& caller, VaultId id)
{
    auto v = core_.load_vault(id);
    if (!v)
        return refused_read(caller, "", "", v.error());
    if (auto r = core_.reach(caller, **v, {}, true, Errc::not_found); !r)
        return tl::unexpected(r.error());
    return view_of(caller, **v);
}

bool SecretService::visible(const Caller& caller, VaultId id)
{
    auto v = core_.load_vault(id);
    return v && (is_admin(caller) || (*v)->policy->holds_any(caller.who));
}

Result<VaultView> SecretService::create_vault(const Caller& caller, std::string_view name, VaultSettings settings)
{
    audit::Event ev{.op = "vault_create", .caller = &caller, .vault = name, .allowed = false, .rule = "not-admin",
                    .coalesce = !is_admin(caller)};
    if (!is_admin(caller))
        return core_.refuse(ev, Errc::access_denied, "only admins create vaults");
    ev.allowed = true;
    ev.rule = "admin";
    if (!is_valid_vault_name(name))
        return core_.refuse(ev, Errc::invalid_argument, "vault names are 3-24 letters, digits and single hyphens");
    if (settings.retention_days < 7 || settings.retention_days > 90)
        return core_.refuse(ev, Errc::invalid_argument, "retention must be 7 to 90 days");
    if (auto existing = store_.vault_by_name(name); existing && *existing)
        return core_.refuse(ev, Errc::already_exists);

    auto kek = keys_.create_kek("vaultfs-kek-" + std::string(name), options_.kek_reach);
    if (!kek) {
        spdlog::error("creating the KEK for vault {} failed: {}", name, kek.error().message);
        return core_.refuse(ev, Errc::key_unavailable, kek.error().message);
    }
    const Micros now = now_micros();
    const auto owner = policy::Policy::owner_only(caller.who.uid);
    VaultRow row{VaultId{}, std::string(name), kek->hex, settings.retention_days, settings.purge_protection, now,
                 caller.who.uid};
    VaultId id;
    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        auto inserted = tx.insert_vault(row, PolicyRow{owner.print(), now, caller.who.uid});
        if (!inserted)
            return tl::unexpected(inserted.error());
        id = *inserted;
        if (options_.on_new_kek)
            return options_.on_new_kek(tx, *kek);
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    auto v = core_.load_vault(id);
    if (!v)
        return tl::unexpected(v.error());
    return view_of(caller, **v);
}

Result<void> SecretService::remove_vault(const Caller& caller, std::string_view name)
{
    audit::Event ev{.op = "vault_remove", .caller = &caller, .vault = name, .allowed = false, .rule = "not-admin",
                    .coalesce = !is_admin(caller)};
    if (!is_admin(caller))
        return core_.refuse(ev, Errc::access_denied, "only admins remove vaults");
    ev.allowed = true;
    ev.rule = "admin";
    auto v = core_.load_vault(name);
    if (!v)
        return core_.refuse(ev, v.error().code);
    const VaultId id = (*v)->row.id;
    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        // Counted inside the transaction so a concurrent create cannot slip in.
        auto live = tx.remove_empty_secrets(id);
        if (!live)
            return live;
        auto count = tx.secret_count(id);
        if (!count)
            return tl::unexpected(count.error());
        if (*count > 0)
            return fail(Errc::not_empty);
        if (auto r = tx.delete_vault(id); !r)
            return r;
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    core_.forget_vault(id);
    // The KEK stays in the token: backups of this vault may still need it.
    return {};
}

// ---- looking ---------------------------------------------------------------------

Result<SecretView> SecretService::find_secret(const Caller& caller, VaultId vault, std::string_view component)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return refused_read(caller, "", component, v.error());
    if (auto r = core_.reach(caller, **v, component, false, Errc::access_denied); !r)
        return tl::unexpected(r.error());
    const auto path = parse_secret_path(component);
    if (!path)
        return fail(Errc::not_found);
    auto found = store_.secret_with_version(vault, path->name, path->version);
    if (!found)
        return refused_read(caller, (*v)->row.name, path->name, found.error());
    // Names resolve only once a first version exists, and never while deleted.
    if (!*found || !(*found)->version || (*found)->secret.deleted())
        return fail(Errc::not_found);
    return view_of(caller, **v, (*found)->secret, std::move(*(*found)->version), path->version.has_value());
}

tl::unexpected<Error> SecretService::refused_read(const Caller& caller, std::string_view vault, std::string_view name,
                                                 const Error& e)
{
    if (e.code != Errc::not_fresh && e.code != Errc::storage)
        return tl::unexpected(e);
    // Fail closed, audited: coalesced, as every open repeats it until the
    // store is reachable (or confirmed fresh) again.
    audit::Event ev{.op = "get",
                    .caller = &caller,
                    .vault = vault,
                    .secret = name,
                    .allowed = false,
                    .rule = "fail-closed",
                    .reason = e.message,
                    .coalesce = true};
    return core_.refuse(ev, e.code, e.message);
}

VersionRow SecretService::no_version_yet(const SecretRow& s)
{
    VersionRow none;
    none.secret = s.id;
    none.created = none.updated = s.created;
    return none;
}

Result<SecretView> SecretService::find_pending(const Caller& caller, VaultId vault, std::string_view name)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    if (auto r = core_.reach(caller, **v, name, false, Errc::access_denied); !r)
        return tl::unexpected(r.error());
    if (!is_valid_secret_name(name))
        return fail(Errc::not_found);
    auto found = store_.secret_with_version(vault, name, std::nullopt);
    if (!found)
        return tl::unexpected(found.error());
    if (!*found || (*found)->version || (*found)->secret.deleted())
        return fail(Errc::not_found);
    return view_of(caller, **v, (*found)->secret, no_version_yet((*found)->secret), false);
}

Result<SecretView> SecretService::secret_by_id(const Caller& caller, SecretId id)
{
    auto found = store_.secret_with_current(id);
    if (!found)
        return refused_read(caller, "", "", found.error());
    if (!*found || (*found)->secret.deleted())
        return fail(Errc::not_found);
    const SecretRow& s = (*found)->secret;
    auto v = core_.load_vault(s.vault);
    if (!v)
        return refused_read(caller, "", s.name, v.error());
    if (auto r = core_.reach(caller, **v, s.name, false, Errc::access_denied); !r)
        return tl::unexpected(r.error());
    if (!(*found)->version) {
        // Being created: a writer holds it open, its first version not yet
        // committed. It has no value to read.
        return view_of(caller, **v, s, no_version_yet(s), false);
    }
    return view_of(caller, **v, s, std::move(*(*found)->version), false);
}

Result<SecretView> SecretService::version_by_id(const Caller& caller, VersionId id)
{
    return by_version_id(caller, id, true);
}

Result<SecretView> SecretService::secret_at_version(const Caller& caller, VersionId id)
{
    return by_version_id(caller, id, false);
}

Result<SecretView> SecretService::by_version_id(const Caller& caller, VersionId id, bool pinned)
{
    auto found = store_.secret_with_version_id(id);
    if (!found)
        return refused_read(caller, "", "", found.error());
    if (!*found || (*found)->secret.deleted() || !(*found)->version)
        return fail(Errc::not_found);
    auto v = core_.load_vault((*found)->secret.vault);
    if (!v)
        return refused_read(caller, "", (*found)->secret.name, v.error());
    if (auto r = core_.reach(caller, **v, (*found)->secret.name, false, Errc::access_denied); !r)
        return tl::unexpected(r.error());
    return view_of(caller, **v, (*found)->secret, std::move(*(*found)->version), pinned);
}

// ---- listing ---------------------------------------------------------------------

Result<ListingGrant> SecretService::open_listing(const Caller& caller, VaultId vault)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::list);
    audit::Event ev{.op = "list", .caller = &caller, .vault = (*v)->row.name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return ListingGrant{vault, (*v)->row.name, caller};
}

Result<void> SecretService::still_listing(const ListingGrant& grant)
{
    auto v = core_.load_vault(grant.vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(grant.caller, **v, Permission::list);
    if (d.allowed)
        return {};
    audit::Event ev{.op = "list", .caller = &grant.caller, .vault = grant.vault_name};
    d.fill(ev);
    ev.reason = "revoked since the directory was opened";
    return core_.refuse(ev, Errc::access_denied);
}

Result<std::vector<SecretName>> SecretService::secrets_page(const ListingGrant& grant, SecretId after,
                                                            std::size_t limit)
{
    if (auto r = still_listing(grant); !r)
        return tl::unexpected(r.error());
    return store_.live_names(grant.vault, after, limit);
}

Result<std::optional<VersionId>> SecretService::version_now(SecretId id)
{
    auto row = store_.secret_with_current(id);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row || (*row)->secret.deleted() || !(*row)->version)
        return std::optional<VersionId>();
    return std::optional((*row)->version->id);
}

std::uint64_t SecretService::change_count() const { return store_.generation(); }

Result<std::vector<SecretView>> SecretService::secrets_with_current(const ListingGrant& grant, SecretId after,
                                                                   std::size_t limit)
{
    if (auto r = still_listing(grant); !r)
        return tl::unexpected(r.error());
    auto v = core_.load_vault(grant.vault);
    if (!v)
        return tl::unexpected(v.error());
    auto rows = store_.live_secrets_with_current(grant.vault, after, limit);
    if (!rows)
        return tl::unexpected(rows.error());
    std::vector<SecretView> out;
    out.reserve(rows->size());
    for (auto& row : *rows) {
        auto view = view_of(grant.caller, **v, row.secret, std::move(*row.version), false);
        if (view)
            out.push_back(std::move(*view));
    }
    return out;
}

Result<std::vector<VersionEntry>> SecretService::versions_page(const ListingGrant& grant, VersionId after,
                                                               std::size_t limit)
{
    if (auto r = still_listing(grant); !r)
        return tl::unexpected(r.error());
    return store_.versions_in_vault(grant.vault, after, limit);
}

}  // namespace vaultfs::vault
