// SecretService: values -- opening a version to read it, and writing, sealing
// and committing a new one (see secret_service.hpp).
#include "vault/secrets/secret_service.hpp"

#include <spdlog/spdlog.h>

#include "vault/crypto/envelope.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::vault {

using policy::Permission;

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

}  // namespace vaultfs::vault
