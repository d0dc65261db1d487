#include "vault/secrets/secret_service.hpp"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <mutex>

#include "vault/crypto/envelope.hpp"
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

// ---- values ------------------------------------------------------------------------

Result<hsm::SecureBuffer> OpenValue::plaintext() const
{
    return vault::open_value(*dek_, nonce_, ciphertext_, aad_);
}

Result<DekCache::Dek> SecretService::unseal_dek(const VaultEntry& v, const SecretRow& s, const SealedVersion& sealed)
{
    // Everything the AAD binds comes from where the row sits now: moved,
    // renamed or renumbered rows fail authentication.
    const Binding binding{v.row.id, s.name, sealed.meta.number, sealed.kek_id};
    DekCache::Dek dek = deks_.find(sealed.kek_id, sealed.sealed_dek);
    if (!dek) {
        auto unsealed = keys_.unseal(hsm::KeyId{sealed.kek_id}, sealed.sealed_dek, dek_aad(binding));
        if (!unsealed)
            return tl::unexpected(core_.from_hsm(unsealed.error()));
        dek = std::make_shared<const hsm::SecureBuffer>(std::move(*unsealed));
        deks_.insert(sealed.kek_id, sealed.sealed_dek, dek);
    }
    return dek;
}

Result<OpenValue> SecretService::open_value(const Caller& caller, const SecretView& target,
                                            hsm::SecureBuffer* authenticated)
{
    auto v = core_.load_vault(target.vault);
    if (!v)
        return refused_read(caller, target.vault_name, target.name, v.error());
    const Decided d = core_.decide(caller, **v, Permission::get, target.name);
    audit::Event ev{.op = "get",
                    .caller = &caller,
                    .vault = target.vault_name,
                    .secret = target.name,
                    .version = target.version.number};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    if (target.version.number == 0)
        return core_.refuse(ev, Errc::not_found);

    // One query for the row as it is now: attributes may have changed, or
    // the secret been deleted, since the lookup.
    const std::uint64_t generation = store_.generation();
    auto read = store_.sealed_for_read(target.version.id);
    if (!read)
        return core_.refuse(ev, read.error().code, read.error().message);
    if (!*read || (*read)->secret.deleted() || (*read)->secret.vault != target.vault)
        return core_.refuse(ev, Errc::not_found);
    SealedVersion& sealed = (*read)->sealed;
    const VersionRow& version = sealed.meta;
    const Micros now = now_micros();
    if (!version.enabled) {
        ev.reason = "disabled";
        return core_.refuse(ev, Errc::disabled);
    }
    if (version.not_before && now < *version.not_before) {
        ev.reason = "not yet valid";
        return core_.refuse(ev, Errc::not_valid_now);
    }
    if (version.expires && now >= *version.expires) {
        ev.reason = "expired";
        return core_.refuse(ev, Errc::not_valid_now);
    }

    const auto failed = [&](const Error& e) {
        spdlog::error("reading {}/{}@{} failed: {}", target.vault_name, target.name, version.number, e.message);
        ev.reason = e.code == Errc::integrity ? "integrity check failed" : "key service unavailable";
        return core_.refuse(ev, e.code, e.message);
    };
    auto dek = unseal_dek(**v, (*read)->secret, sealed);
    if (!dek && store_.generation() != generation) {
        // The row may have been sealed again meanwhile under a new KEK (a
        // rekey, which destroys the one it was sealed under): once more.
        auto again = store_.sealed_for_read(target.version.id);
        if (again && *again && (*again)->sealed.meta.id == version.id) {
            **read = std::move(**again);
            dek = unseal_dek(**v, (*read)->secret, sealed);
        }
    }
    if (!dek)
        return failed(dek.error());
    const Binding binding{target.vault, (*read)->secret.name, version.number, sealed.kek_id};
    // The size is the authenticated plaintext's, never the row's `size`
    // column (which no AEAD covers): a reader is never told of, or sent,
    // bytes past the value.
    const std::uint64_t size =
        sealed.ciphertext.size() >= value_tag_size ? sealed.ciphertext.size() - value_tag_size : 0;
    OpenValue opened(std::move(*dek), std::move(sealed.nonce), std::move(sealed.ciphertext), value_aad(binding), size);
    // Authenticated once here, so that a tampered row fails the open.
    auto check = opened.plaintext();
    if (!check)
        return failed(check.error());
    if (check->size() != size || size != version.size)
        return failed(Error{Errc::integrity, "the row's size does not match its value"});
    ev.bytes = size;
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    if (authenticated != nullptr)
        *authenticated = std::move(*check);
    return opened;
}

Result<OpenValue> SecretService::reopen_value(VersionId version)
{
    auto read = store_.sealed_for_read(version);
    if (!read)
        return tl::unexpected(read.error());
    if (!*read)
        return fail(Errc::not_found, "version " + std::to_string(version.value) + " is gone");
    auto v = core_.load_vault((*read)->secret.vault);
    if (!v)
        return tl::unexpected(v.error());
    SealedVersion& sealed = (*read)->sealed;
    auto dek = unseal_dek(**v, (*read)->secret, sealed);
    if (!dek)
        return tl::unexpected(dek.error());
    const Binding binding{(*read)->secret.vault, (*read)->secret.name, sealed.meta.number, sealed.kek_id};
    const std::uint64_t size =
        sealed.ciphertext.size() >= value_tag_size ? sealed.ciphertext.size() - value_tag_size : 0;
    OpenValue opened(std::move(*dek), std::move(sealed.nonce), std::move(sealed.ciphertext), value_aad(binding), size);
    if (auto check = opened.plaintext(); !check)
        return tl::unexpected(check.error());
    return opened;
}

Result<WriteGrant> SecretService::open_for_write(const Caller& caller, VaultId vault, std::string_view name,
                                                 WriteIntent intent)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    audit::Event ev{.op = "set", .caller = &caller, .vault = (*v)->row.name, .secret = name};
    auto d = decide_write(caller, **v, name, ev);
    if (!d)
        return tl::unexpected(d.error());
    d->fill(ev);

    auto s = store_.secret_with_version(vault, name, std::nullopt);  // cached
    if (!s)
        return core_.refuse(ev, s.error().code, s.error().message);
    std::optional<SecretRow> row;
    if (*s)
        row = (*s)->secret;
    if (row && row->deleted()) {
        // `install` removes its target and creates it again at once: the
        // uid that deleted it may have it back (with `recover`).
        auto back = intent.create ? recover_own_delete(caller, **v, *row) : Result<bool>(false);
        if (!back)
            return tl::unexpected(back.error());
        if (!*back) {
            ev.reason = "soft-deleted";
            return core_.refuse(ev, Errc::already_exists);
        }
        row->deleted_at.reset();
        row->purge_at.reset();
        intent.exclusive = false;  // it exists again: O_EXCL is about the name it replaces
    }
    if (row && row->has_versions() && intent.create && intent.exclusive)
        return core_.refuse(ev, Errc::already_exists);
    if (!row || !row->has_versions()) {
        if (!intent.create && !row)
            return core_.refuse(ev, Errc::not_found);
    }
    if (!row) {
        auto made = ensure_row(vault, name, caller.who.uid);
        if (!made)
            return core_.refuse(ev, made.error().code, made.error().message);
        row = std::move(*made);
        if (row->deleted()) {
            ev.reason = "soft-deleted";
            return core_.refuse(ev, Errc::already_exists);
        }
    }
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return WriteGrant{vault, (*v)->row.name, row->id, std::string(name), row->created};
}

Result<Decided> SecretService::decide_write(const Caller& caller, const VaultEntry& v,
                                                           std::string_view name, audit::Event& ev)
{
    if (!is_valid_secret_name(name)) {
        ev.rule = "invalid-name";
        return core_.refuse(ev, Errc::invalid_argument, "secret names are 1-127 letters, digits and hyphens");
    }
    Decided d = core_.decide(caller, v, Permission::set, name);
    if (!d.allowed) {
        d.fill(ev);
        return core_.refuse(ev, Errc::access_denied);
    }
    return d;
}

Result<SecretRow> SecretService::ensure_row(VaultId vault, std::string_view name, uid_t by)
{
    std::optional<SecretRow> row;
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        auto made = tx.ensure_secret(vault, name, now_micros(), by);
        if (!made)
            return tl::unexpected(made.error());
        row = std::move(*made);
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    return std::move(*row);
}

Result<void> SecretService::check_commit(const Caller& caller, const WriteGrant& grant)
{
    auto v = core_.load_vault(grant.vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::set, grant.name);
    if (!d.allowed) {
        audit::Event ev{.op = "commit", .caller = &caller, .vault = grant.vault_name, .secret = grant.name};
        d.fill(ev);
        if (ev.reason.empty())
            ev.reason = "revoked since open";
        return core_.refuse(ev, Errc::access_denied, "set is no longer granted on " + grant.vault_name + "/" + grant.name);
    }
    auto s = store_.secret_with_current(grant.secret);
    if (!s)
        return tl::unexpected(s.error());
    if (!*s || (*s)->secret.deleted())
        return fail(Errc::not_found, grant.vault_name + "/" + grant.name + " was deleted while open");
    if (auto r = audit_.ready(); !r)
        return fail(Errc::audit_unavailable, r.error().message);
    if (auto r = keys_.ping(); !r)
        return fail(Errc::key_unavailable, "the token does not answer: " + r.error().message);
    return {};
}

Result<std::uint64_t> SecretService::commit(const Caller& caller, const WriteGrant& grant,
                                            const hsm::SecureBuffer& value)
{
    auto v = core_.load_vault(grant.vault);
    if (!v)
        return tl::unexpected(v.error());
    audit::Event ev{.op = "commit", .caller = &caller, .vault = grant.vault_name, .secret = grant.name,
                    .bytes = value.size()};
    // The grant was checked at open; the policy may have changed since.
    const Decided d = core_.decide(caller, **v, Permission::set, grant.name);
    d.fill(ev);
    if (!d.allowed) {
        if (ev.reason.empty())
            ev.reason = "revoked since open";
        return core_.refuse(ev, Errc::access_denied);
    }
    if (value.size() > max_value_size)
        return core_.refuse(ev, Errc::too_large, "values are at most 25 KiB");
    return seal_and_commit(caller, **v, grant.secret, grant.name, value, ev, nullptr);
}

Result<std::uint64_t> SecretService::seal_and_commit(const Caller& caller, const VaultEntry& v, SecretId secret,
                                                     std::string_view name, const hsm::SecureBuffer& value,
                                                     audit::Event& ev,
                                                     const std::function<Result<void>(Store::Transaction&)>& also)
{
    // The version number is taken inside the write transaction (two hosts
    // writing one secret get two numbers). The AAD binds the number, so the
    // DEK is sealed and the value encrypted for the number the secret's row
    // expects next, outside the transaction (concurrent writers of
    // different secrets then only queue for the commit); if the transaction
    // hands out another number (a concurrent writer of the same secret, on
    // this host or another), they are sealed again inside it.
    // Sealed ahead under the KEK the vault had when loaded; a rekey since
    // (vault/kek/rekey.hpp) is seen inside the transaction, which holds the
    // vault's KEK until it ends, and sealed again there.
    std::string kek = v.row.kek_id;
    auto dek = new_dek();
    if (!dek)
        return core_.refuse(ev, dek.error().code, dek.error().message);
    struct Sealed {
        std::uint64_t number = 0;
        std::vector<std::uint8_t> sealed_dek;
        std::vector<std::uint8_t> nonce, ciphertext;
    };
    const auto seal_for = [&](std::uint64_t number) -> Result<Sealed> {
        const Binding binding{v.row.id, name, number, kek};
        auto sealed_dek = keys_.seal(hsm::KeyId{kek}, *dek, dek_aad(binding));
        if (!sealed_dek) {
            spdlog::error("commit to {}/{}: the token cannot seal a DEK: {}", v.row.name, name,
                          sealed_dek.error().message);
            return tl::unexpected(core_.from_hsm(sealed_dek.error()));
        }
        auto sealed = seal_value(*dek, value.bytes(), value_aad(binding));
        if (!sealed)
            return tl::unexpected(sealed.error());
        return Sealed{number, std::move(*sealed_dek), std::move(sealed->nonce), std::move(sealed->ciphertext)};
    };
    std::optional<Sealed> ahead;
    if (auto current = store_.secret_with_current(secret); current && *current)
        if (auto made = seal_for((*current)->secret.next_version); made)
            ahead = std::move(*made);
    std::uint64_t number = 0;
    bool audited = false;
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        auto s = tx.secret(secret);
        if (!s)
            return tl::unexpected(s.error());
        if (!*s)
            return fail(Errc::not_found, "the secret was removed while open");
        if ((*s)->deleted())
            return fail(Errc::not_found, "the secret was deleted while open");
        auto allocated = tx.allocate_version(secret);
        if (!allocated)
            return tl::unexpected(allocated.error());
        number = *allocated;
        ev.version = number;
        auto current_kek = tx.vault_kek(v.row.id, false);
        if (!current_kek)
            return tl::unexpected(current_kek.error());
        if (*current_kek != kek) {
            kek = *current_kek;
            ahead.reset();
        }
        Sealed sealed;
        if (ahead && ahead->number == number) {
            sealed = *ahead;
        } else {
            auto again = seal_for(number);
            if (!again)
                return tl::unexpected(again.error());
            sealed = std::move(*again);
        }
        const Micros now = now_micros();
        const SealedVersion row{VersionRow{VersionId{}, secret, number, value.size(), now, now, caller.who.uid, true,
                                           std::nullopt, std::nullopt, std::nullopt},
                                kek, std::move(sealed.nonce), std::move(sealed.ciphertext), std::move(sealed.sealed_dek)};
        if (auto r = tx.insert_version(row); !r)
            return tl::unexpected(r.error());
        if (also)
            if (auto r = also(tx); !r)
                return r;
        // Written before COMMIT: if the audit cannot take it, nothing commits.
        if (auto r = core_.record(ev); !r)
            return r;
        audited = true;
        return {};
    });
    if (!w) {
        if (w.error().code == Errc::audit_unavailable && !audited)
            return tl::unexpected(w.error());
        if (w.error().code == Errc::in_doubt)
            ev.reason = w.error().message;  // names the transaction its commit_outcome record will
        else if (audited)
            ev.reason = "rolled back";
        if (w.error().code == Errc::not_found)
            spdlog::info("commit to {}/{} did not happen: {}", v.row.name, name, w.error().message);
        else
            spdlog::error("commit to {}/{} failed: {}", v.row.name, name, w.error().message);
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    return number;
}

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
