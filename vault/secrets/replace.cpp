// SecretService: what the tools admins use do besides open-write-close.
// A file written under a temporary name and renamed onto the target (sed -i,
// rsync, mktemp + mv, ansible), a target removed and made again (install),
// a probe file made and removed (vim). Each ends as exactly one new version
// of the target, with no stray names and nothing in .deleted (docs/filesystem.md "Admin
// tools").

#include <spdlog/spdlog.h>

#include "vault/crypto/envelope.hpp"
#include "vault/model/names.hpp"
#include "vault/secrets/secret_service.hpp"

namespace vaultfs::vault {

using policy::Permission;

bool SecretService::is_fresh(const Caller& caller, const SecretRow& s, const std::optional<VersionRow>& first) const
{
    const Micros now = now_micros();
    if (s.deleted() || s.next_version > 2 || now - s.created > fresh_window || now < s.created)
        return false;
    // The caller's own: it made the row (its open created the name), and
    // wrote its first version if there is one -- not another's name it
    // wrote to while that one's writer still held it open.
    if (!s.created_by || *s.created_by != caller.who.uid)
        return false;
    return !first || (first->number == 1 && first->created_by == caller.who.uid);
}

Result<bool> SecretService::recover_own_delete(const Caller& caller, const VaultEntry& v, const SecretRow& s)
{
    {
        std::lock_guard lock(deletes_mutex_);
        const auto it = recent_deletes_.find({v.row.id.value, s.name});
        if (it == recent_deletes_.end() || it->second.uid != caller.who.uid ||
            now_micros() - it->second.at > fresh_window)
            return false;
    }
    const Decided d = core_.decide(caller, v, Permission::recover, s.name);
    if (!d.allowed)
        return false;
    audit::Event ev{.op = "recover", .caller = &caller, .vault = v.row.name, .secret = s.name,
                    .reason = "made again by the uid that deleted it moments ago"};
    d.fill(ev);
    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        auto now = tx.secret(s.id);
        if (!now)
            return tl::unexpected(now.error());
        if (!*now || !(*now)->deleted())
            return fail(Errc::not_found);
        return tx.set_deleted(s.id, std::nullopt, std::nullopt);
    });
    if (!w)
        return tl::unexpected(w.error());
    std::lock_guard lock(deletes_mutex_);
    recent_deletes_.erase({v.row.id.value, s.name});
    return true;
}

Result<SecretRow> SecretService::replace_target(const Caller& caller, const VaultEntry& v, std::string_view name,
                                                bool noreplace, audit::Event& ev)
{
    auto found = store_.secret_with_version(v.row.id, name, std::nullopt);
    if (!found)
        return core_.refuse(ev, found.error().code, found.error().message);
    if (!*found) {
        auto made = ensure_row(v.row.id, name, caller.who.uid);
        if (!made)
            return core_.refuse(ev, made.error().code, made.error().message);
        return made;
    }
    SecretRow row = (*found)->secret;
    if (row.deleted()) {
        auto back = recover_own_delete(caller, v, row);
        if (!back)
            return tl::unexpected(back.error());
        if (!*back) {
            ev.reason = "soft-deleted";
            return core_.refuse(ev, Errc::already_exists);
        }
    } else if (row.has_versions() && noreplace) {
        return core_.refuse(ev, Errc::already_exists);
    }
    return row;
}

Result<std::uint64_t> SecretService::commit_renamed(const Caller& caller, VaultId vault, std::string_view name,
                                                    const hsm::SecureBuffer& value, std::string_view from,
                                                    bool noreplace, std::optional<Ownership> ownership)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    audit::Event ev{.op = "commit", .caller = &caller, .vault = (*v)->row.name, .secret = name,
                    .bytes = value.size(), .from = from};
    auto d = decide_write(caller, **v, name, ev);
    if (!d)
        return tl::unexpected(d.error());
    d->fill(ev);
    if (value.size() > max_value_size)
        return core_.refuse(ev, Errc::too_large, "values are at most 25 KiB");
    auto row = replace_target(caller, **v, name, noreplace, ev);
    if (!row)
        return tl::unexpected(row.error());
    // The staged file's owner and mode, for a manager who set them (rsync and
    // ansible set the mode before the rename); others keep what the name shows.
    std::function<Result<void>(Store::Transaction&)> also;
    if (ownership && *ownership != row->ownership((*v)->row.defaults) &&
        core_.decide(caller, **v, Permission::manage).allowed)
        also = [&, id = row->id, o = *ownership](Store::Transaction& tx) {
            return tx.set_ownership(id, o.owner, o.group, o.mode);
        };
    return seal_and_commit(caller, **v, row->id, name, value, ev, also);
}

Result<std::uint64_t> SecretService::rename_fresh(const Caller& caller, VaultId vault, std::string_view from,
                                                  std::string_view to, bool noreplace)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    audit::Event ev{.op = "rename", .caller = &caller, .vault = (*v)->row.name, .secret = to, .from = from};
    const Decided d = core_.decide(caller, **v, Permission::set, to);
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    auto source = store_.secret_with_version(vault, from, std::uint64_t{1});
    if (!source)
        return core_.refuse(ev, source.error().code, source.error().message);
    if (!*source || !(*source)->version) {
        // Not a secret with a first version (or not one at all).
        return core_.refuse(ev, Errc::not_permitted, "only a file just made by the same uid can be renamed");
    }
    const SecretRow& src = (*source)->secret;
    if (!is_fresh(caller, src, (*source)->version)) {
        ev.reason = "secrets are not renamed: values are bound to their names";
        return core_.refuse(ev, Errc::not_permitted, std::string(ev.reason));
    }
    auto row = replace_target(caller, **v, to, noreplace, ev);
    if (!row)
        return tl::unexpected(row.error());

    // The fresh file's value, authenticated, in locked memory.
    auto read = store_.sealed_for_read((*source)->version->id);
    if (!read)
        return core_.refuse(ev, read.error().code, read.error().message);
    if (!*read)
        return core_.refuse(ev, Errc::not_found);
    auto dek = unseal_dek(**v, src, (*read)->sealed);
    if (!dek)
        return core_.refuse(ev, dek.error().code, dek.error().message);
    const Binding binding{vault, src.name, 1, (*read)->sealed.kek_id};
    auto value = vault::open_value(**dek, (*read)->sealed.nonce, (*read)->sealed.ciphertext, value_aad(binding));
    if (!value)
        return core_.refuse(ev, value.error().code, value.error().message);
    ev.bytes = value->size();

    const SecretId gone = src.id;
    const std::uint64_t versions = src.next_version;
    return seal_and_commit(caller, **v, row->id, to, *value, ev, [&](Store::Transaction& tx) -> Result<void> {
        auto now = tx.secret(gone);
        if (!now)
            return tl::unexpected(now.error());
        if (!*now || (*now)->deleted() || (*now)->next_version != versions)
            return fail(Errc::busy, "the renamed file changed meanwhile; try again");
        return tx.purge_secret(gone);
    });
}

}  // namespace vaultfs::vault
