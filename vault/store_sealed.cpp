// The Store's sealed DEKs as one list (store.hpp, SealedDek): what moving a
// state to another token re-seals (vault/token_migration.hpp). Only sealed
// DEKs and their bindings; no ciphertext is read or written.
#include "vault/sqlite.hpp"
#include "vault/store.hpp"

namespace vaultfs::vault {

using sqlite::collect;
using sqlite::run;

Result<std::vector<SealedDek>> Store::Transaction::sealed_deks()
{
    auto versions = collect<SealedDek>(
        conn_,
        "SELECT v.id, s.vault_id, s.name, v.version, v.kek_id, v.sealed_dek FROM versions v "
        "JOIN secrets s ON s.id = v.secret_id ORDER BY v.id",
        [](sqlite::Query&) {},
        [](const sqlite::Query& q) {
            return SealedDek{SealedDek::Table::versions, q.int64(0), VaultId{q.int64(1)}, q.text(2),
                             static_cast<std::uint64_t>(q.int64(3)), q.text(4), q.blob(5), {}};
        });
    if (!versions)
        return versions;
    auto objects = collect<SealedDek>(
        conn_,
        "SELECT ov.id, o.vault_id, o.name, ov.version, ov.kek_id, ov.sealed_dek, ov.body FROM object_versions ov "
        "JOIN objects o ON o.id = ov.object_id WHERE length(ov.sealed_dek) > 0 ORDER BY ov.id",
        [](sqlite::Query&) {},
        [](const sqlite::Query& q) {
            return SealedDek{SealedDek::Table::object_versions, q.int64(0), VaultId{q.int64(1)}, q.text(2),
                             static_cast<std::uint64_t>(q.int64(3)), q.text(4), q.blob(5), q.text(6)};
        });
    if (!objects)
        return objects;
    versions->insert(versions->end(), std::make_move_iterator(objects->begin()),
                     std::make_move_iterator(objects->end()));
    return versions;
}

Result<void> Store::Transaction::replace_sealed_dek(const SealedDek& row, std::span<const std::uint8_t> sealed)
{
    const char* sql = row.table == SealedDek::Table::versions ? "UPDATE versions SET sealed_dek = ? WHERE id = ?"
                                                              : "UPDATE object_versions SET sealed_dek = ? WHERE id = ?";
    return run(conn_, sql, [&](sqlite::Query& q) { q.bind_blob(1, sealed).bind(2, row.row); });
}

Result<std::vector<std::string>> Store::Transaction::kek_ids()
{
    return collect<std::string>(
        conn_,
        "SELECT kek_id FROM vaults UNION SELECT kek_id FROM versions "
        "UNION SELECT kek_id FROM object_versions WHERE length(sealed_dek) > 0 ORDER BY 1",
        [](sqlite::Query&) {}, [](const sqlite::Query& q) { return q.text(0); });
}

Result<std::vector<std::string>> Store::Transaction::token_key_holders()
{
    return collect<std::string>(
        conn_,
        "SELECT v.name || '/' || CASE o.kind WHEN 1 THEN '.keys/' ELSE '.certs/' END || o.name || '@' || ov.version "
        "FROM object_versions ov JOIN objects o ON o.id = ov.object_id JOIN vaults v ON v.id = o.vault_id "
        "WHERE ov.token_key <> '' ORDER BY 1",
        [](sqlite::Query&) {}, [](const sqlite::Query& q) { return q.text(0); });
}

}  // namespace vaultfs::vault
