// The Store's sealed DEKs as one list (store.hpp, SealedDek): what moving a
// state to another token (vault/state/token_migration.hpp) or a vault to a new KEK
// (vault/kek/rekey.hpp) re-seals. Only sealed DEKs and their bindings; no
// ciphertext is read or written.
#include "vault/store/db.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault {

using db::collect;
using db::run;

namespace {

// Where a SealedDek lives; its number is SealedDek::Table's, as stored in
// the undo log.
const char* table_name(SealedDek::Table t)
{
    return t == SealedDek::Table::versions ? "versions" : "object_versions";
}


SealedDek read_sealed(const db::Query& q)
{
    return SealedDek{static_cast<SealedDek::Table>(q.int64(0)), q.int64(1), VaultId{q.int64(2)}, q.text(3),
                     static_cast<std::uint64_t>(q.int64(4)), q.text(5), q.blob(6), q.text(7)};
}

#define SEALED_ROWS(WHERE_SECRET, WHERE_OBJECT)                                                                     \
    "SELECT 0, v.id, s.vault_id, s.name, v.version, v.kek_id, v.sealed_dek, '' FROM versions v "                    \
    "JOIN secrets s ON s.id = v.secret_id " WHERE_SECRET                                                             \
    " UNION ALL "                                                                                                    \
    "SELECT 1, ov.id, o.vault_id, o.name, ov.version, ov.kek_id, ov.sealed_dek, ov.body FROM object_versions ov "   \
    "JOIN objects o ON o.id = ov.object_id WHERE length(ov.sealed_dek) > 0 " WHERE_OBJECT " ORDER BY 1, 2"

}  // namespace

Result<std::vector<SealedDek>> Store::Transaction::sealed_deks()
{
    return collect<SealedDek>(conn_, SEALED_ROWS("", ""), [](db::Query&) {}, read_sealed);
}

Result<std::vector<SealedRow>> Store::Transaction::sealed_rows(VaultId vault, SealedDek::Table table,
                                                               std::int64_t after, std::size_t limit)
{
    const char* sql =
        table == SealedDek::Table::versions
            ? "SELECT v.id, s.name, v.version, v.kek_id, v.nonce, v.ciphertext, v.sealed_dek, '' FROM versions v "
              "JOIN secrets s ON s.id = v.secret_id WHERE s.vault_id = ? AND v.id > ? ORDER BY v.id LIMIT ?"
            : "SELECT ov.id, o.name, ov.version, ov.kek_id, ov.nonce, ov.sealed_key, ov.sealed_dek, ov.body "
              "FROM object_versions ov JOIN objects o ON o.id = ov.object_id WHERE o.vault_id = ? AND ov.id > ? "
              "AND length(ov.sealed_dek) > 0 ORDER BY ov.id LIMIT ?";
    return collect<SealedRow>(
        conn_, sql,
        [&](db::Query& q) { q.bind(1, vault.value).bind(2, after).bind(3, static_cast<std::int64_t>(limit)); },
        [&](const db::Query& q) {
            return SealedRow{table,      q.int64(0), q.text(1), static_cast<std::uint64_t>(q.int64(2)), q.text(3),
                             q.blob(4),  q.blob(5),  q.blob(6), q.text(7)};
        });
}

Result<void> Store::Transaction::replace_sealed_row(const SealedRow& row)
{
    const char* sql = row.table == SealedDek::Table::versions
                          ? "UPDATE versions SET kek_id = ?, nonce = ?, ciphertext = ?, sealed_dek = ? WHERE id = ?"
                          : "UPDATE object_versions SET kek_id = ?, nonce = ?, sealed_key = ?, sealed_dek = ? "
                            "WHERE id = ?";
    return run(conn_, sql, [&](db::Query& q) {
        q.bind(1, row.kek_id).bind_blob(2, row.nonce).bind_blob(3, row.ciphertext).bind_blob(4, row.sealed_dek).bind(5, row.row);
    });
}

// The undo log of a migration: each replaced sealed DEK as it was, kept in
// the same transaction as its replacement, until the migration is finished
// or rolled back.
Result<void> Store::Transaction::replace_sealed_dek(const SealedDek& row, std::span<const std::uint8_t> sealed)
{
    if (auto r = run(conn_, "INSERT INTO migration_undo (tbl, row, sealed_dek) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                     [&](db::Query& q) {
                         q.bind(1, static_cast<std::int64_t>(row.table)).bind(2, row.row).bind_blob(3, row.sealed_dek);
                     });
        !r)
        return r;
    const std::string sql = std::string("UPDATE ") + table_name(row.table) + " SET sealed_dek = ? WHERE id = ?";
    return run(conn_, sql, [&](db::Query& q) { q.bind_blob(1, sealed).bind(2, row.row); });
}

Result<void> Store::Transaction::undo_sealed_deks()
{
    for (const auto table : {SealedDek::Table::versions, SealedDek::Table::object_versions}) {
        const std::string name = table_name(table);
        const std::string sql = "UPDATE " + name +
                                " SET sealed_dek = (SELECT u.sealed_dek FROM migration_undo u WHERE u.tbl = ?1 AND "
                                "u.row = " + name + ".id) WHERE id IN (SELECT row FROM migration_undo WHERE tbl = ?1)";
        const auto tbl = static_cast<std::int64_t>(table);
        if (auto r = run(conn_, sql, [&](db::Query& q) { q.bind(1, tbl); }); !r)
            return r;
    }
    return forget_sealed_deks();
}

Result<void> Store::Transaction::forget_sealed_deks()
{
    return run(conn_, "DELETE FROM migration_undo", [](db::Query&) {});
}

Result<void> Store::Transaction::delete_setting(std::string_view key)
{
    return run(conn_, "DELETE FROM settings WHERE host = ? AND key = ?",
               [&](db::Query& q) { q.bind(1, host_).bind(2, key); });
}

Result<std::vector<std::string>> Store::Transaction::kek_ids()
{
    return collect<std::string>(
        conn_,
        "SELECT kek_id FROM vaults UNION SELECT kek_id FROM versions "
        "UNION SELECT kek_id FROM object_versions WHERE length(sealed_dek) > 0 ORDER BY 1",
        [](db::Query&) {}, [](const db::Query& q) { return q.text(0); });
}

Result<std::vector<std::string>> Store::Transaction::token_key_holders()
{
    return collect<std::string>(
        conn_,
        "SELECT v.name || '/' || CASE o.kind WHEN 1 THEN '.keys/' ELSE '.certs/' END || o.name || '@' || ov.version "
        "FROM object_versions ov JOIN objects o ON o.id = ov.object_id JOIN vaults v ON v.id = o.vault_id "
        "WHERE ov.token_key <> '' ORDER BY 1",
        [](db::Query&) {}, [](const db::Query& q) { return q.text(0); });
}

}  // namespace vaultfs::vault
