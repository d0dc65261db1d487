// Store: the read side -- queries on a pooled reader connection, and the caches
// in front of them (see store.hpp).
#include "vault/store/store.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <tuple>

#include "vault/store/schema.hpp"
#include "vault/store/store_detail.hpp"

namespace vaultfs::vault {

using namespace store_detail;

// ---- reads -------------------------------------------------------------------

Result<std::optional<VaultRow>> Store::vault_by_name(std::string_view name)
{
    return with_reader([&](db::Connection& c) {
        return first<VaultRow>(
            c,
            "SELECT " VAULT_COLUMNS " FROM vaults WHERE name = ?",
            [&](db::Query& q) { q.bind(1, name); }, read_vault);
    });
}

Result<std::optional<VaultRow>> Store::vault_by_id(VaultId id)
{
    return with_reader([&](db::Connection& c) {
        return first<VaultRow>(
            c, "SELECT " VAULT_COLUMNS " FROM vaults WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_vault);
    });
}

Result<std::vector<VaultRow>> Store::vaults()
{
    return with_reader([&](db::Connection& c) {
        return collect<VaultRow>(
            c, "SELECT " VAULT_COLUMNS " FROM vaults ORDER BY id",
            [](db::Query&) {}, read_vault);
    });
}

Result<std::optional<PolicyRow>> Store::policy(VaultId vault)
{
    return with_reader([&](db::Connection& c) {
        return first<PolicyRow>(
            c, "SELECT text, updated, updated_by FROM policies WHERE vault_id = ?",
            [&](db::Query& q) { q.bind(1, vault.value); },
            [](const db::Query& q) {
                return PolicyRow{q.text(0), q.int64(1), static_cast<uid_t>(q.int64(2))};
            });
    });
}

Result<std::optional<SecretRow>> Store::secret_by_name(VaultId vault, std::string_view name)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND name = ?",
            [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_secret);
    });
}

Result<std::optional<SecretRow>> Store::secret_by_id(SecretId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretRow>(
            c, "SELECT " SECRET_COLUMNS " FROM secrets WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_secret);
    });
}

Result<std::vector<SecretRow>> Store::live_secrets(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS LIVE_PAGE, [&](db::Query& q) { bind_live_page(q, vault, after, limit); },
            read_secret);
    });
}

Result<std::vector<SecretName>> Store::live_names(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretName>(
            c,
            "SELECT id, name" LIVE_PAGE, [&](db::Query& q) { bind_live_page(q, vault, after, limit); },
            [](const db::Query& q) { return SecretName{SecretId{q.int64(0)}, q.text(1)}; });
    });
}

Result<std::vector<SecretVersion>> Store::live_secrets_with_current(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s JOIN versions v ON v.id = (SELECT id FROM versions "
            "WHERE secret_id = s.id ORDER BY enabled DESC, version DESC LIMIT 1) "
            "WHERE s.vault_id = ? AND s.deleted_at IS NULL AND s.id > ? AND s.next_version > 1 ORDER BY s.id LIMIT ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_joined);
    });
}

Result<std::vector<SecretRow>> Store::deleted_secrets(VaultId vault, SecretId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE vault_id = ? AND deleted_at IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            read_secret);
    });
}

Result<std::vector<SecretRow>> Store::purge_due(Micros now, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<SecretRow>(
            c,
            "SELECT " SECRET_COLUMNS " FROM secrets "
            "WHERE purge_at IS NOT NULL AND purge_at <= ? ORDER BY purge_at LIMIT ?",
            [&](db::Query& q) { q.bind(1, now).bind(2, static_cast<std::int64_t>(limit)); }, read_secret);
    });
}

Result<std::int64_t> Store::secret_count(VaultId vault)
{
    return with_reader([&](db::Connection& c) -> Result<std::int64_t> {
        auto n = first<std::int64_t>(
            c, "SELECT (SELECT count(*) FROM secrets WHERE vault_id = ?1 AND next_version > 1) + "
            "(SELECT count(*) FROM objects WHERE vault_id = ?1)",
            [&](db::Query& q) { q.bind(1, vault.value); }, [](const db::Query& q) { return q.int64(0); });
        if (!n)
            return tl::unexpected(n.error());
        return n->value_or(0);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version(VaultId vault, std::string_view name,
                                                               std::optional<std::uint64_t> number)
{
    if (!number) {
        const std::string key = std::to_string(vault.value) + "/" + std::string(name);
        return cached(by_name_, key, [&] { return secret_with_version_uncached(vault, name); });
    }
    return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s JOIN versions v ON v.secret_id = s.id "
            "WHERE s.vault_id = ? AND s.name = ? AND v.version = ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, name).bind(3, static_cast<std::int64_t>(*number));
            },
            read_joined);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_uncached(VaultId vault, std::string_view name)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s LEFT JOIN versions v ON v.secret_id = s.id "
            "WHERE s.vault_id = ? AND s.name = ? ORDER BY v.enabled DESC, v.version DESC LIMIT 1",
            [&](db::Query& q) { q.bind(1, vault.value).bind(2, name); }, read_joined);
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_current(SecretId id)
{
    return cached(by_id_, id.value, [&] {
        return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c,
            "SELECT " JOINED_COLUMNS " FROM secrets s LEFT JOIN versions v ON v.secret_id = s.id "
            "WHERE s.id = ? ORDER BY v.enabled DESC, v.version DESC LIMIT 1",
            [&](db::Query& q) { q.bind(1, id.value); }, read_joined);
        });
    });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_id(VersionId id)
{
    return cached(by_version_, id.value, [&] { return secret_with_version_id_uncached(id); });
}

Result<std::optional<SecretVersion>> Store::secret_with_version_id_uncached(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SecretVersion>(
            c, "SELECT " JOINED_COLUMNS " FROM versions v JOIN secrets s ON s.id = v.secret_id WHERE v.id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_joined);
    });
}

Result<std::optional<SealedRead>> Store::sealed_for_read(VersionId id)
{
    if (auto r = fresh(); !r)
        return tl::unexpected(r.error());
    const std::uint64_t generation = generation_.load();
    {
        std::lock_guard lock(cache_mutex_);
        if (const auto it = sealed_.find(id.value); it != sealed_.end() && it->second.first == generation)
            return std::optional<SealedRead>(it->second.second);
    }
    auto read = sealed_for_read_uncached(id);
    if (!read || !*read)
        return read;
    const std::size_t bytes = (*read)->sealed.ciphertext.size() + (*read)->sealed.sealed_dek.size() + 256;
    std::lock_guard lock(cache_mutex_);
    if (sealed_bytes_ + bytes > sealed_limit) {
        sealed_.clear();
        sealed_bytes_ = 0;
    }
    if (sealed_.insert_or_assign(id.value, std::make_pair(generation, **read)).second)
        sealed_bytes_ += bytes;
    return read;
}

Result<std::optional<SealedRead>> Store::sealed_for_read_uncached(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SealedRead>(
            c,
            "SELECT " JOINED_COLUMNS ", v.kek_id, v.nonce, v.ciphertext, v.sealed_dek "
            "FROM versions v JOIN secrets s ON s.id = v.secret_id WHERE v.id = ?",
            [&](db::Query& q) { q.bind(1, id.value); },
            [](const db::Query& q) {
                constexpr int c = secret_column_count + 11;  // after the version's columns
                return SealedRead{read_secret(q), SealedVersion{read_version_at(q, secret_column_count), q.text(c),
                                                                q.blob(c + 1), q.blob(c + 2), q.blob(c + 3)}};
            });
    });
}

Result<std::optional<VersionRow>> Store::version(SecretId secret, std::uint64_t number)
{
    return with_reader([&](db::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? AND version = ?",
            [&](db::Query& q) { q.bind(1, secret.value).bind(2, static_cast<std::int64_t>(number)); },
            read_version);
    });
}

Result<std::vector<Change>> Store::changes_since(Micros since, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<Change>(
            c,
            "SELECT * FROM ("
            "SELECT s.id, 0, v.name, s.name, 0, s.changed FROM secrets s JOIN vaults v ON v.id = s.vault_id "
            "WHERE s.changed >= ?1 AND s.deleted_at IS NULL "
            "UNION ALL "
            "SELECT o.id, 1, v.name, o.name, ov.version, ov.created FROM object_versions ov "
            "JOIN objects o ON o.id = ov.object_id JOIN vaults v ON v.id = o.vault_id "
            "WHERE o.kind = ?2 AND ov.created >= ?1"
            ") AS c ORDER BY 6 LIMIT ?3",
            [&](db::Query& q) {
                q.bind(1, since)
                    .bind(2, static_cast<std::int64_t>(ObjectKind::certificate))
                    .bind(3, static_cast<std::int64_t>(limit));
            },
            [](const db::Query& q) {
                return Change{q.int64(0), q.int64(1) != 0, q.text(2), q.text(3),
                              static_cast<std::uint64_t>(q.int64(4)), q.int64(5)};
            });
    });
}

Result<std::vector<Expiring>> Store::expiring()
{
    auto rows = with_reader([&](db::Connection& c) {
        return collect<std::pair<Expiring, std::string>>(
            c,
            "SELECT 0, v.name, s.name, ver.version, ver.id, ver.expires, '' FROM secrets s "
            "JOIN vaults v ON v.id = s.vault_id JOIN versions ver ON ver.secret_id = s.id "
            "WHERE s.deleted_at IS NULL AND ver.expires IS NOT NULL AND ver.version = "
            "(SELECT MAX(x.version) FROM versions x WHERE x.secret_id = s.id AND x.enabled = 1) "
            "UNION ALL "
            // A certificate's expiry is its not_after, in the version's body.
            "SELECT o.kind, v.name, o.name, ov.version, ov.id, ov.expires, "
            "CASE WHEN o.kind = ?1 THEN ov.body ELSE '' END FROM objects o "
            "JOIN vaults v ON v.id = o.vault_id JOIN object_versions ov ON ov.object_id = o.id "
            "WHERE (ov.expires IS NOT NULL OR o.kind = ?1) AND ov.version = "
            "(SELECT MAX(y.version) FROM object_versions y WHERE y.object_id = o.id AND y.enabled = 1)",
            [](db::Query& q) { q.bind(1, static_cast<std::int64_t>(ObjectKind::certificate)); },
            [](const db::Query& q) {
                return std::pair{Expiring{static_cast<Expiring::Kind>(q.int64(0)), q.text(1), q.text(2),
                                          static_cast<std::uint64_t>(q.int64(3)), q.int64(4),
                                          q.is_null(5) ? 0 : q.int64(5)},
                                 q.text(6)};
            });
    });
    if (!rows)
        return tl::unexpected(rows.error());
    std::vector<Expiring> out;
    for (auto& [e, body] : *rows) {
        if (e.kind == Expiring::Kind::certificate && !body.empty()) {
            const auto j = nlohmann::json::parse(body, nullptr, false);
            if (j.is_object() && j.contains("not_after") && j["not_after"].is_number_integer()) {
                const Micros not_after = j["not_after"].get<Micros>();
                e.expires = e.expires == 0 ? not_after : std::min(e.expires, not_after);
            }
        }
        if (e.expires != 0)
            out.push_back(std::move(e));
    }
    std::sort(out.begin(), out.end(), [](const Expiring& a, const Expiring& b) {
        return std::tie(a.expires, a.vault, a.name) < std::tie(b.expires, b.vault, b.name);
    });
    return out;
}

Result<std::optional<VersionRow>> Store::version_by_id(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_version);
    });
}

Result<std::optional<VersionRow>> Store::current_version(SecretId secret)
{
    return with_reader([&](db::Connection& c) {
        return first<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? ORDER BY enabled DESC, version DESC LIMIT 1",
            [&](db::Query& q) { q.bind(1, secret.value); }, read_version);
    });
}

Result<std::vector<VersionRow>> Store::versions_of(SecretId secret)
{
    return with_reader([&](db::Connection& c) {
        return collect<VersionRow>(
            c, "SELECT " VERSION_COLUMNS " FROM versions WHERE secret_id = ? ORDER BY version",
            [&](db::Query& q) { q.bind(1, secret.value); }, read_version);
    });
}

Result<std::vector<VersionEntry>> Store::versions_in_vault(VaultId vault, VersionId after, std::size_t limit)
{
    return with_reader([&](db::Connection& c) {
        return collect<VersionEntry>(
            c,
            "SELECT v.id, s.name, v.version FROM versions v JOIN secrets s ON s.id = v.secret_id "
            "WHERE s.vault_id = ? AND s.deleted_at IS NULL AND v.id > ? ORDER BY v.id LIMIT ?",
            [&](db::Query& q) {
                q.bind(1, vault.value).bind(2, after.value).bind(3, static_cast<std::int64_t>(limit));
            },
            [](const db::Query& q) {
                return VersionEntry{VersionId{q.int64(0)}, q.text(1), static_cast<std::uint64_t>(q.int64(2))};
            });
    });
}

Result<std::optional<SealedVersion>> Store::sealed_version(VersionId id)
{
    return with_reader([&](db::Connection& c) {
        return first<SealedVersion>(
            c, "SELECT " VERSION_COLUMNS ", kek_id, nonce, ciphertext, sealed_dek FROM versions WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); },
            [](const db::Query& q) {
                return SealedVersion{read_version(q), q.text(11), q.blob(12), q.blob(13), q.blob(14)};
            });
    });
}

Result<std::vector<Tag>> Store::tags(VersionId version)
{
    return with_reader([&](db::Connection& c) {
        return collect<Tag>(
            c, "SELECT name, value FROM tags WHERE version_id = ? ORDER BY name",
            [&](db::Query& q) { q.bind(1, version.value); },
            [](const db::Query& q) { return Tag{q.text(0), q.text(1)}; });
    });
}

Result<std::optional<std::string>> Store::setting(std::string_view key)
{
    return with_reader([&](db::Connection& c) {
        return first<std::string>(
            c, "SELECT value FROM settings WHERE host = ? AND key = ?",
            [&](db::Query& q) { q.bind(1, host_id_).bind(2, key); },
            [](const db::Query& q) { return q.text(0); });
    });
}

Result<std::vector<std::string>> Store::setting_on_all_hosts(std::string_view key)
{
    return with_reader([&](db::Connection& c) {
        return collect<std::string>(
            c, "SELECT value FROM settings WHERE key = ? ORDER BY host", [&](db::Query& q) { q.bind(1, key); },
            [](const db::Query& q) { return q.text(0); });
    });
}

Result<std::vector<std::pair<std::int64_t, std::string>>> Store::setting_by_host(std::string_view key)
{
    return with_reader([&](db::Connection& c) {
        return collect<std::pair<std::int64_t, std::string>>(
            c, "SELECT host, value FROM settings WHERE key = ? ORDER BY host", [&](db::Query& q) { q.bind(1, key); },
            [](const db::Query& q) { return std::pair<std::int64_t, std::string>{q.int64(0), q.text(1)}; });
    });
}

Result<std::optional<AuditAnchor>> Store::audit_anchor()
{
    return with_reader([&](db::Connection& c) {
        return first<AuditAnchor>(
            c, "SELECT seq, hash, clean_shutdown, time, file_start, sig FROM audit_anchor WHERE id = ?",
            [&](db::Query& q) { q.bind(1, host_id_); },
            [](const db::Query& q) {
                return AuditAnchor{static_cast<std::uint64_t>(q.int64(0)), q.text(1), q.int64(2) != 0, q.int64(3),
                                   static_cast<std::uint64_t>(q.int64(4)), q.blob(5)};
            });
    });
}

Result<void> Store::each_row(const std::string& sql, const std::function<Result<void>(const db::Query&)>& f)
{
    return with_reader(
        [&](db::Connection& c) -> Result<void> {
        auto q = c.query(sql);
        if (!q)
            return tl::unexpected(q.error());
        for (;;) {
            auto more = q->step();
            if (!more)
                return tl::unexpected(more.error());
            if (!*more)
                return {};
            if (auto r = f(*q); !r)
                return r;
        }
        },
        false);
}

Result<void> Store::integrity_check()
{
    if (shared_)
        return with_reader([&](db::Connection& c) { return schema::prepare_postgresql(c, path_, false, false); },
                           false);
    return with_reader([&](db::Connection& c) { return schema::check_sqlite(c, path_, true); }, false);
}

}  // namespace vaultfs::vault
