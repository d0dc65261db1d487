// Store::Transaction: what a write does inside the writer's transaction (see
// store.hpp).
#include "vault/store/store.hpp"

#include "vault/store/store_detail.hpp"

namespace vaultfs::vault {

using namespace store_detail;

Result<VaultId> Store::Transaction::insert_vault(const VaultRow& row, const PolicyRow& policy)
{
    auto r = db::integer(conn_,
                 "INSERT INTO vaults (name, kek_id, retention_days, purge_protection, created, created_by, "
                 "default_owner, default_group, default_mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, row.name)
                         .bind(2, row.kek_id)
                         .bind(3, static_cast<std::int64_t>(row.retention_days))
                         .bind(4, static_cast<std::int64_t>(row.purge_protection))
                         .bind(5, row.created)
                         .bind(6, static_cast<std::int64_t>(row.created_by))
                         .bind(7, static_cast<std::int64_t>(row.defaults.owner))
                         .bind(8, static_cast<std::int64_t>(row.defaults.group))
                         .bind(9, static_cast<std::int64_t>(row.defaults.mode));
                 });
    if (!r)
        return tl::unexpected(r.error());
    const VaultId id{*r};
    if (auto p = set_policy(id, policy); !p)
        return tl::unexpected(p.error());
    return id;
}

Result<void> Store::Transaction::delete_vault(VaultId vault)
{
    if (auto r = remove_empty_secrets(vault); !r)
        return r;
    return run(conn_, "DELETE FROM vaults WHERE id = ?", [&](db::Query& q) { q.bind(1, vault.value); });
}

Result<void> Store::Transaction::update_vault_settings(VaultId vault, int retention_days, bool purge_protection)
{
    return run(conn_, "UPDATE vaults SET retention_days = ?, purge_protection = ? WHERE id = ?",
               [&](db::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(retention_days))
                       .bind(2, static_cast<std::int64_t>(purge_protection))
                       .bind(3, vault.value);
               });
}

Result<void> Store::Transaction::set_rekey_after(VaultId vault, int days)
{
    return run(conn_, "UPDATE vaults SET rekey_after_days = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, static_cast<std::int64_t>(days)).bind(2, vault.value); });
}

Result<std::string> Store::Transaction::vault_kek(VaultId vault, bool exclusive)
{
    const char* sql = !postgresql_ ? "SELECT kek_id FROM vaults WHERE id = ?"
                      : exclusive  ? "SELECT kek_id FROM vaults WHERE id = ? FOR UPDATE"
                                   : "SELECT kek_id FROM vaults WHERE id = ? FOR SHARE";
    auto kek = first<std::string>(
        conn_, sql, [&](db::Query& q) { q.bind(1, vault.value); }, [](const db::Query& q) { return q.text(0); });
    if (!kek)
        return tl::unexpected(kek.error());
    if (!*kek)
        return fail(Errc::not_found, "the vault was removed");
    return **kek;
}

Result<void> Store::Transaction::set_vault_kek(VaultId vault, std::string_view kek_id, Micros created)
{
    return run(conn_, "UPDATE vaults SET kek_id = ?, kek_created = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, kek_id).bind(2, created).bind(3, vault.value); });
}

Result<void> Store::Transaction::set_vault_defaults(VaultId vault, const Ownership& d)
{
    return run(conn_, "UPDATE vaults SET default_owner = ?, default_group = ?, default_mode = ? WHERE id = ?",
               [&](db::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(d.owner))
                       .bind(2, static_cast<std::int64_t>(d.group))
                       .bind(3, static_cast<std::int64_t>(d.mode))
                       .bind(4, vault.value);
               });
}

Result<void> Store::Transaction::set_ownership(SecretId secret, std::optional<uid_t> owner, std::optional<gid_t> group,
                                               std::optional<std::uint32_t> mode)
{
    const auto wide = [](auto v) {
        return v ? std::optional<std::int64_t>(static_cast<std::int64_t>(*v)) : std::nullopt;
    };
    return run(conn_, "UPDATE secrets SET owner = ?, grp = ?, mode = ? WHERE id = ?", [&](db::Query& q) {
        q.bind(1, wide(owner)).bind(2, wide(group)).bind(3, wide(mode)).bind(4, secret.value);
    });
}

Result<void> Store::Transaction::set_policy(VaultId vault, const PolicyRow& policy)
{
    return run(conn_,
               "INSERT INTO policies (vault_id, text, updated, updated_by) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (vault_id) DO UPDATE SET text = excluded.text, updated = excluded.updated, "
               "updated_by = excluded.updated_by",
               [&](db::Query& q) {
                   q.bind(1, vault.value)
                       .bind(2, policy.text)
                       .bind(3, policy.updated)
                       .bind(4, static_cast<std::int64_t>(policy.updated_by));
               });
}

Result<std::optional<SecretRow>> Store::Transaction::secret(SecretId id)
{
    return first<SecretRow>(
        conn_, "SELECT " SECRET_COLUMNS " FROM secrets WHERE id = ?",
        [&](db::Query& q) { q.bind(1, id.value); }, read_secret);
}

Result<std::optional<SecretRow>> Store::Transaction::secret_by_name(VaultId vault, std::string_view name)
{
    return first<SecretRow>(
        conn_,
        "SELECT " SECRET_COLUMNS " FROM secrets "
        "WHERE vault_id = ? AND name = ?",
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
}

Result<std::optional<VersionRow>> Store::Transaction::version_by_id(VersionId id)
{
    return first<VersionRow>(
        conn_, "SELECT " VERSION_COLUMNS " FROM versions WHERE id = ?", [&](db::Query& q) { q.bind(1, id.value); },
        read_version);
}

Result<std::optional<VersionRow>> Store::Transaction::version(SecretId secret, std::uint64_t number)
{
    return first<VersionRow>(
        conn_, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? AND version = ?",
        [&](db::Query& q) { q.bind(1, secret.value).bind(2, static_cast<std::int64_t>(number)); }, read_version);
}

Result<std::vector<Tag>> Store::Transaction::tags(VersionId version)
{
    return collect<Tag>(
        conn_, "SELECT name, value FROM tags WHERE version_id = ? ORDER BY name",
        [&](db::Query& q) { q.bind(1, version.value); },
        [](const db::Query& q) { return Tag{q.text(0), q.text(1)}; });
}

Result<SecretRow> Store::Transaction::ensure_secret(VaultId vault, std::string_view name, Micros now, uid_t by)
{
    // A certificate owns its name among secrets too (store.hpp, ObjectKind).
    auto certificate = first<std::int64_t>(
        conn_,
        "SELECT 1 FROM objects o WHERE o.vault_id = ?1 AND o.name = ?2 AND o.kind = 2 "
        "AND NOT EXISTS (SELECT 1 FROM secrets s WHERE s.vault_id = ?1 AND s.name = ?2)",
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); },
        [](const db::Query& q) { return q.int64(0); });
    if (!certificate)
        return tl::unexpected(certificate.error());
    if (*certificate)
        return fail(Errc::already_exists, "a certificate in this vault is named " + std::string(name));
    auto r = run(conn_,
                 "INSERT INTO secrets (vault_id, name, created, created_by) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 [&](db::Query& q) {
                     q.bind(1, vault.value).bind(2, name).bind(3, now).bind(4, static_cast<std::int64_t>(by));
                 });
    if (!r)
        return tl::unexpected(r.error());
    auto row = first<SecretRow>(
        conn_,
        "SELECT " SECRET_COLUMNS " FROM secrets "
        "WHERE vault_id = ? AND name = ?",
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row)
        return fail(Errc::storage, "secret row vanished inside its transaction");
    return std::move(**row);
}

Result<std::uint64_t> Store::Transaction::allocate_version(SecretId secret)
{
    auto n = first<std::int64_t>(
        conn_, "UPDATE secrets SET next_version = next_version + 1 WHERE id = ? RETURNING next_version - 1",
        [&](db::Query& q) { q.bind(1, secret.value); }, [](const db::Query& q) { return q.int64(0); });
    if (!n)
        return tl::unexpected(n.error());
    if (!*n)
        return fail(Errc::not_found, "the secret was removed");
    return static_cast<std::uint64_t>(**n);
}

Result<void> Store::Transaction::require_vault_kek(bool object, std::int64_t owner, std::string_view kek)
{
    // Locks the vault's row on PostgreSQL (FOR SHARE): a rekey, which holds
    // it FOR UPDATE while it re-seals, then waits for this row to commit and
    // re-seals it too -- or this waits for the rekey, and sees its KEK.
    const char* sql = object ? (postgresql_ ? "SELECT v.kek_id FROM vaults v JOIN objects o ON o.vault_id = v.id "
                                              "WHERE o.id = ? FOR SHARE OF v"
                                            : "SELECT v.kek_id FROM vaults v JOIN objects o ON o.vault_id = v.id "
                                              "WHERE o.id = ?")
                             : (postgresql_ ? "SELECT v.kek_id FROM vaults v JOIN secrets s ON s.vault_id = v.id "
                                              "WHERE s.id = ? FOR SHARE OF v"
                                            : "SELECT v.kek_id FROM vaults v JOIN secrets s ON s.vault_id = v.id "
                                              "WHERE s.id = ?");
    auto current = first<std::string>(
        conn_, sql, [&](db::Query& q) { q.bind(1, owner); }, [](const db::Query& q) { return q.text(0); });
    if (!current)
        return tl::unexpected(current.error());
    if (!*current)
        return fail(Errc::not_found, "the vault was removed");
    if (**current != kek)
        return fail(Errc::busy, "the vault got a new KEK (vault rekey) while this was sealed; do it again");
    return {};
}

Result<VersionId> Store::Transaction::insert_version(const SealedVersion& v)
{
    if (auto k = require_vault_kek(false, v.meta.secret.value, v.kek_id); !k)
        return tl::unexpected(k.error());
    auto r = db::integer(conn_,
                 "INSERT INTO versions (secret_id, version, kek_id, nonce, ciphertext, sealed_dek, size, created, "
                 "created_by, updated, enabled, not_before, expires, content_type) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, v.meta.secret.value)
                         .bind(2, static_cast<std::int64_t>(v.meta.number))
                         .bind(3, v.kek_id)
                         .bind_blob(4, v.nonce)
                         .bind_blob(5, v.ciphertext)
                         .bind_blob(6, v.sealed_dek)
                         .bind(7, static_cast<std::int64_t>(v.meta.size))
                         .bind(8, v.meta.created)
                         .bind(9, static_cast<std::int64_t>(v.meta.created_by))
                         .bind(10, v.meta.updated)
                         .bind(11, static_cast<std::int64_t>(v.meta.enabled))
                         .bind(12, v.meta.not_before)
                         .bind(13, v.meta.expires)
                         .bind(14, v.meta.content_type);
                 });
    if (!r)
        return tl::unexpected(r.error());
    // An enabled new version is what S serves from now on.
    if (v.meta.enabled)
        if (auto c = mark_changed(v.meta.secret, v.meta.created); !c)
            return tl::unexpected(c.error());
    return VersionId{*r};
}

Result<Store::Transaction::Served> Store::Transaction::served(SecretId secret, Micros at)
{
    // The version S stands for: the highest enabled one, else the highest.
    auto row = first<Served>(
        conn_,
        "SELECT id, enabled, not_before, expires FROM versions WHERE secret_id = ? "
        "ORDER BY enabled DESC, version DESC LIMIT 1",
        [&](db::Query& q) { q.bind(1, secret.value); },
        [at](const db::Query& q) {
            const auto nb = q.optional_int64(2);
            const auto exp = q.optional_int64(3);
            return Served{q.int64(0), q.int64(1) != 0 && !(nb && at < *nb) && !(exp && at >= *exp)};
        });
    if (!row)
        return tl::unexpected(row.error());
    return row->value_or(Served{});
}

Result<void> Store::Transaction::mark_changed(SecretId secret, Micros at)
{
    return run(conn_, "UPDATE secrets SET changed = ? WHERE id = ? AND changed < ?",
               [&](db::Query& q) { q.bind(1, at).bind(2, secret.value).bind(3, at); });
}

Result<void> Store::Transaction::update_version(const VersionRow& v)
{
    auto before = served(v.secret, v.updated);
    if (!before)
        return tl::unexpected(before.error());
    if (auto r = run(conn_,
                     "UPDATE versions SET updated = ?, enabled = ?, not_before = ?, expires = ?, content_type = ? "
                     "WHERE id = ?",
                     [&](db::Query& q) {
                         q.bind(1, v.updated)
                             .bind(2, static_cast<std::int64_t>(v.enabled))
                             .bind(3, v.not_before)
                             .bind(4, v.expires)
                             .bind(5, v.content_type)
                             .bind(6, v.id.value);
                     });
        !r)
        return r;
    // What S serves changed (another version, or readable no more or again):
    // its mtime moves on (a tag or content type change does not move it).
    auto after = served(v.secret, v.updated);
    if (!after)
        return tl::unexpected(after.error());
    if (*after != *before)
        return mark_changed(v.secret, v.updated);
    return {};
}

Result<void> Store::Transaction::replace_tags(VersionId version, const std::vector<Tag>& tags)
{
    if (auto r = run(conn_, "DELETE FROM tags WHERE version_id = ?", [&](db::Query& q) { q.bind(1, version.value); });
        !r)
        return r;
    for (const auto& t : tags) {
        if (auto r = run(conn_, "INSERT INTO tags (version_id, name, value) VALUES (?, ?, ?)",
                         [&](db::Query& q) { q.bind(1, version.value).bind(2, t.name).bind(3, t.value); });
            !r)
            return r;
    }
    return {};
}

Result<void> Store::Transaction::set_deleted(SecretId secret, std::optional<Micros> deleted_at,
                                             std::optional<Micros> purge_at)
{
    return run(conn_, "UPDATE secrets SET deleted_at = ?, purge_at = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, deleted_at).bind(2, purge_at).bind(3, secret.value); });
}

Result<void> Store::Transaction::purge_secret(SecretId secret)
{
    // Tags and versions go by ON DELETE CASCADE; secure_delete zeroes the pages.
    return run(conn_, "DELETE FROM secrets WHERE id = ?", [&](db::Query& q) { q.bind(1, secret.value); });
}

Result<std::int64_t> Store::Transaction::secret_count(VaultId vault)
{
    auto n = first<std::int64_t>(
        conn_, "SELECT (SELECT count(*) FROM secrets WHERE vault_id = ?1 AND next_version > 1) + "
            "(SELECT count(*) FROM objects WHERE vault_id = ?1)",
        [&](db::Query& q) { q.bind(1, vault.value); }, [](const db::Query& q) { return q.int64(0); });
    if (!n)
        return tl::unexpected(n.error());
    return n->value_or(0);
}

Result<void> Store::Transaction::remove_empty_secrets(VaultId vault)
{
    return run(conn_, "DELETE FROM secrets WHERE vault_id = ? AND next_version = 1",
               [&](db::Query& q) { q.bind(1, vault.value); });
}

Result<SecretId> Store::Transaction::insert_secret(VaultId vault, std::string_view name, Micros created,
                                                   std::uint64_t next_version)
{
    auto r = db::integer(conn_, "INSERT INTO secrets (vault_id, name, created, next_version) VALUES (?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, vault.value).bind(2, name).bind(3, created).bind(4,
                                                                              static_cast<std::int64_t>(next_version));
                 });
    if (!r)
        return tl::unexpected(r.error());
    return SecretId{*r};
}

Result<void> Store::Transaction::set_setting(std::string_view key, std::string_view value)
{
    return run(conn_,
               "INSERT INTO settings (host, key, value) VALUES (?, ?, ?) "
               "ON CONFLICT (host, key) DO UPDATE SET value = excluded.value",
               [&](db::Query& q) { q.bind(1, host_).bind(2, key).bind(3, value); });
}

Result<void> Store::Transaction::set_audit_anchor(const AuditAnchor& a)
{
    return run(conn_,
               "INSERT INTO audit_anchor (id, seq, hash, clean_shutdown, time, file_start, sig) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, "
               "hash = excluded.hash, clean_shutdown = excluded.clean_shutdown, time = excluded.time, "
               "file_start = excluded.file_start, sig = excluded.sig",
               [&](db::Query& q) {
                   q.bind(1, host_)
                       .bind(2, static_cast<std::int64_t>(a.seq))
                       .bind(3, a.hash)
                       .bind(4, static_cast<std::int64_t>(a.clean_shutdown))
                       .bind(5, a.time)
                       .bind(6, static_cast<std::int64_t>(a.file_start))
                       .bind_blob(7, a.sig);
               });
}

}  // namespace vaultfs::vault
