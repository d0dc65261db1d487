// The Store's keys and certificates (store.hpp, ObjectKind): two tables
// beside secrets and versions, read fresh on every call (they are looked
// up per path walk and per open, not per read, so no cache is kept).
#include "vault/store/db.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault {

namespace {

using db::collect;
using db::first;
using db::run;

#define OBJECT_COLUMNS "id, vault_id, kind, name, created, created_by, spec, next_version"
#define OBJECT_VERSION_COLUMNS                                                                              \
    "id, object_id, version, created, created_by, enabled, not_before, expires, token_key, public_der, body, " \
    "kek_id, nonce, sealed_key, sealed_dek, notified"

ObjectRow read_object(const db::Query& q)
{
    return ObjectRow{ObjectId{q.int64(0)},
                     VaultId{q.int64(1)},
                     static_cast<ObjectKind>(q.int64(2)),
                     q.text(3),
                     q.int64(4),
                     static_cast<uid_t>(q.int64(5)),
                     q.text(6),
                     static_cast<std::uint64_t>(q.int64(7))};
}

ObjectVersionRow read_object_version(const db::Query& q)
{
    return ObjectVersionRow{ObjectVersionId{q.int64(0)},
                            ObjectId{q.int64(1)},
                            static_cast<std::uint64_t>(q.int64(2)),
                            q.int64(3),
                            static_cast<uid_t>(q.int64(4)),
                            q.int64(5) != 0,
                            q.optional_int64(6),
                            q.optional_int64(7),
                            q.text(8),
                            q.blob(9),
                            q.text(10),
                            q.text(11),
                            q.blob(12),
                            q.blob(13),
                            q.blob(14),
                            q.int64(15)};
}

constexpr const char* version_by_number_sql =
    "SELECT " OBJECT_VERSION_COLUMNS " FROM object_versions WHERE object_id = ? AND version = ?";
constexpr const char* current_version_sql =
    "SELECT " OBJECT_VERSION_COLUMNS " FROM object_versions WHERE object_id = ? "
    "ORDER BY enabled DESC, version DESC LIMIT 1";

Result<std::optional<ObjectVersionRow>> version_on(db::Connection& c, ObjectId object,
                                                   std::optional<std::uint64_t> number)
{
    if (number)
        return first<ObjectVersionRow>(
            c, version_by_number_sql,
            [&](db::Query& q) { q.bind(1, object.value).bind(2, static_cast<std::int64_t>(*number)); },
            read_object_version);
    return first<ObjectVersionRow>(
        c, current_version_sql, [&](db::Query& q) { q.bind(1, object.value); }, read_object_version);
}

}  // namespace

// ---- reads -------------------------------------------------------------------

Result<std::optional<ObjectRow>> Store::object_by_name(VaultId vault, ObjectKind kind, std::string_view name)
{
    return read_one<std::optional<ObjectRow>>([&](db::Connection& c) {
        return first<ObjectRow>(
            c, "SELECT " OBJECT_COLUMNS " FROM objects WHERE vault_id = ? AND kind = ? AND name = ?",
            [&](db::Query& q) { q.bind(1, vault.value).bind(2, static_cast<std::int64_t>(kind)).bind(3, name); },
            read_object);
    });
}

Result<std::optional<ObjectRow>> Store::object_by_id(ObjectId id)
{
    return read_one<std::optional<ObjectRow>>([&](db::Connection& c) {
        return first<ObjectRow>(
            c, "SELECT " OBJECT_COLUMNS " FROM objects WHERE id = ?", [&](db::Query& q) { q.bind(1, id.value); },
            read_object);
    });
}

Result<std::vector<ObjectRow>> Store::objects(VaultId vault, ObjectKind kind)
{
    return read_one<std::vector<ObjectRow>>([&](db::Connection& c) {
        return collect<ObjectRow>(
            c, "SELECT " OBJECT_COLUMNS " FROM objects WHERE vault_id = ? AND kind = ? ORDER BY id",
            [&](db::Query& q) { q.bind(1, vault.value).bind(2, static_cast<std::int64_t>(kind)); }, read_object);
    });
}

Result<std::vector<ObjectRow>> Store::all_objects()
{
    return read_one<std::vector<ObjectRow>>([&](db::Connection& c) {
        return collect<ObjectRow>(
            c, "SELECT " OBJECT_COLUMNS " FROM objects ORDER BY id", [](db::Query&) {}, read_object);
    });
}

Result<std::optional<ObjectVersionRow>> Store::object_version(ObjectId object, std::optional<std::uint64_t> number)
{
    return read_one<std::optional<ObjectVersionRow>>([&](db::Connection& c) {
        return version_on(c, object, number);
    });
}

Result<std::optional<ObjectVersionRow>> Store::object_version_by_id(ObjectVersionId id)
{
    return read_one<std::optional<ObjectVersionRow>>([&](db::Connection& c) {
        return first<ObjectVersionRow>(
            c, "SELECT " OBJECT_VERSION_COLUMNS " FROM object_versions WHERE id = ?",
            [&](db::Query& q) { q.bind(1, id.value); }, read_object_version);
    });
}

Result<std::vector<ObjectVersionRow>> Store::object_versions(ObjectId object)
{
    return read_one<std::vector<ObjectVersionRow>>([&](db::Connection& c) {
        return collect<ObjectVersionRow>(
            c, "SELECT " OBJECT_VERSION_COLUMNS " FROM object_versions WHERE object_id = ? ORDER BY version",
            [&](db::Query& q) { q.bind(1, object.value); }, read_object_version);
    });
}

// ---- writes ------------------------------------------------------------------

Result<ObjectId> Store::Transaction::insert_object(const ObjectRow& row)
{
    auto taken = first<std::int64_t>(
        conn_,
        "SELECT 1 FROM objects WHERE vault_id = ?1 AND name = ?2 "
        "UNION ALL SELECT 1 FROM secrets WHERE ?3 = 2 AND vault_id = ?1 AND name = ?2 AND next_version > 1",
        [&](db::Query& q) {
            q.bind(1, row.vault.value).bind(2, row.name).bind(3, static_cast<std::int64_t>(row.kind));
        },
        [](const db::Query& q) { return q.int64(0); });
    if (!taken)
        return tl::unexpected(taken.error());
    if (*taken)
        return fail(Errc::already_exists, "the name " + row.name + " is taken in this vault");
    auto r = db::integer(conn_,
                 "INSERT INTO objects (vault_id, kind, name, created, created_by, spec) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, row.vault.value)
                         .bind(2, static_cast<std::int64_t>(row.kind))
                         .bind(3, row.name)
                         .bind(4, row.created)
                         .bind(5, static_cast<std::int64_t>(row.created_by))
                         .bind(6, row.spec);
                 });
    if (!r)
        return tl::unexpected(r.error());
    return ObjectId{*r};
}

Result<void> Store::Transaction::update_object_spec(ObjectId object, std::string_view spec)
{
    return run(conn_, "UPDATE objects SET spec = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, spec).bind(2, object.value); });
}

Result<void> Store::Transaction::insert_object_version(ObjectVersionRow& row)
{
    if (!row.sealed_dek.empty())
        if (auto k = require_vault_kek(true, row.object.value, row.kek_id); !k)
            return k;
    auto number = first<std::int64_t>(
        conn_, "UPDATE objects SET next_version = next_version + 1 WHERE id = ? RETURNING next_version - 1",
        [&](db::Query& q) { q.bind(1, row.object.value); }, [](const db::Query& q) { return q.int64(0); });
    if (!number)
        return tl::unexpected(number.error());
    if (!*number)
        return fail(Errc::not_found, "the object is gone");
    row.number = static_cast<std::uint64_t>(**number);
    auto r = db::integer(conn_,
                 "INSERT INTO object_versions (object_id, version, created, created_by, enabled, not_before, expires, "
                 "token_key, public_der, body, kek_id, nonce, sealed_key, sealed_dek, notified) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                 [&](db::Query& q) {
                     q.bind(1, row.object.value)
                         .bind(2, static_cast<std::int64_t>(row.number))
                         .bind(3, row.created)
                         .bind(4, static_cast<std::int64_t>(row.created_by))
                         .bind(5, static_cast<std::int64_t>(row.enabled))
                         .bind(6, row.not_before)
                         .bind(7, row.expires)
                         .bind(8, row.token_key)
                         .bind_blob(9, row.public_der)
                         .bind(10, row.body)
                         .bind(11, row.kek_id)
                         .bind_blob(12, row.nonce)
                         .bind_blob(13, row.sealed_key)
                         .bind_blob(14, row.sealed_dek)
                         .bind(15, row.notified);
                 });
    if (!r)
        return tl::unexpected(r.error());
    row.id = ObjectVersionId{*r};
    return {};
}

Result<void> Store::Transaction::update_object_version(const ObjectVersionRow& row)
{
    return run(conn_,
               "UPDATE object_versions SET enabled = ?, not_before = ?, expires = ?, token_key = ?, public_der = ?, "
               "body = ?, kek_id = ?, nonce = ?, sealed_key = ?, sealed_dek = ?, notified = ? WHERE id = ?",
               [&](db::Query& q) {
                   q.bind(1, static_cast<std::int64_t>(row.enabled))
                       .bind(2, row.not_before)
                       .bind(3, row.expires)
                       .bind(4, row.token_key)
                       .bind_blob(5, row.public_der)
                       .bind(6, row.body)
                       .bind(7, row.kek_id)
                       .bind_blob(8, row.nonce)
                       .bind_blob(9, row.sealed_key)
                       .bind_blob(10, row.sealed_dek)
                       .bind(11, row.notified)
                       .bind(12, row.id.value);
               });
}

Result<std::optional<ObjectVersionRow>> Store::Transaction::object_version(ObjectId object,
                                                                          std::optional<std::uint64_t> number)
{
    return version_on(conn_, object, number);
}

Result<void> Store::Transaction::delete_object(ObjectId object)
{
    return run(conn_, "DELETE FROM objects WHERE id = ?", [&](db::Query& q) { q.bind(1, object.value); });
}

}  // namespace vaultfs::vault
