// The Store's hosts and the KEKs wrapped for them (docs/hosts.md "Several hosts";
// vault/hosts/enrolment.hpp runs the ceremony over these rows).
#include "vault/store/db.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault {

using db::collect;
using db::first;
using db::run;

namespace {

#define HOST_COLUMNS \
    "id, name, status, transport_key, transport_public, signing_public, requested, enrolled, enrolled_by, enrolment_sig"

HostRow read_host(const db::Query& q)
{
    return HostRow{q.int64(0), q.text(1),  q.text(2),           q.text(3),           q.blob(4),
                   q.blob(5),  q.int64(6), q.optional_int64(7), q.optional_text(8), q.blob(9)};
}

KekGrantRow read_grant(const db::Query& q)
{
    return KekGrantRow{q.text(0), q.int64(1), q.blob(2), q.blob(3), q.text(4), q.int64(5)};
}

Result<std::optional<HostRow>> host_named(db::Connection& c, std::string_view name)
{
    return first<HostRow>(
        c, "SELECT " HOST_COLUMNS " FROM hosts WHERE name = ?", [&](db::Query& q) { q.bind(1, name); }, read_host);
}

Result<std::vector<HostRow>> all_hosts(db::Connection& c)
{
    return collect<HostRow>(
        c, "SELECT " HOST_COLUMNS " FROM hosts ORDER BY id", [](db::Query&) {}, read_host);
}

Result<std::optional<std::vector<std::uint8_t>>> check_of(db::Connection& c, std::string_view kek)
{
    return first<std::vector<std::uint8_t>>(
        c, "SELECT sealed FROM kek_checks WHERE kek_id = ?", [&](db::Query& q) { q.bind(1, kek); },
        [](const db::Query& q) { return q.blob(0); });
}

}  // namespace

Result<std::vector<HostRow>> Store::hosts()
{
    return read_one<std::vector<HostRow>>([&](db::Connection& c) { return all_hosts(c); });
}

Result<std::optional<HostRow>> Store::host_by_name(std::string_view name)
{
    return read_one<std::optional<HostRow>>([&](db::Connection& c) { return host_named(c, name); });
}

Result<std::vector<KekGrantRow>> Store::kek_grants_for(std::int64_t host)
{
    return read_one<std::vector<KekGrantRow>>([&](db::Connection& c) {
        return collect<KekGrantRow>(
            c,
            "SELECT kek_id, host, wrapped_key, wrapped_kek, granted_by, granted FROM kek_grants WHERE host = ? "
            "ORDER BY kek_id",
            [&](db::Query& q) { q.bind(1, host); }, read_grant);
    });
}

Result<std::vector<Store::MissingGrant>> Store::missing_grants()
{
    return read_one<std::vector<MissingGrant>>([&](db::Connection& c) {
        return collect<MissingGrant>(
            c,
            "SELECT v.kek_id, h.id FROM vaults v JOIN hosts h ON h.status = 'enrolled' AND h.id <> ? "
            "WHERE NOT EXISTS (SELECT 1 FROM kek_grants g WHERE g.kek_id = v.kek_id AND g.host = h.id) "
            "ORDER BY h.id, v.kek_id",
            [&](db::Query& q) { q.bind(1, host_id_); },
            [](const db::Query& q) { return MissingGrant{q.text(0), q.int64(1)}; });
    });
}

Result<std::optional<std::vector<std::uint8_t>>> Store::kek_check(std::string_view kek_id)
{
    return read_one<std::optional<std::vector<std::uint8_t>>>([&](db::Connection& c) { return check_of(c, kek_id); });
}

Result<std::int64_t> Store::Transaction::insert_host(const HostRow& h)
{
    return db::integer(conn_,
                       "INSERT INTO hosts (name, status, transport_key, transport_public, signing_public, requested, "
                       "enrolled, enrolled_by, enrolment_sig) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                       [&](db::Query& q) {
                           q.bind(1, h.name)
                               .bind(2, h.status)
                               .bind(3, h.transport_key)
                               .bind_blob(4, h.transport_public)
                               .bind_blob(5, h.signing_public)
                               .bind(6, h.requested)
                               .bind(7, h.enrolled)
                               .bind(8, h.enrolled_by)
                               .bind_blob(9, h.enrolment_sig);
                       });
}

Result<std::optional<HostRow>> Store::Transaction::host_by_name(std::string_view name)
{
    return host_named(conn_, name);
}

Result<std::vector<HostRow>> Store::Transaction::hosts() { return all_hosts(conn_); }

Result<void> Store::Transaction::enrol_host(std::int64_t host, Micros when, std::string_view by,
                                           std::span<const std::uint8_t> sig)
{
    return run(conn_,
               "UPDATE hosts SET status = 'enrolled', enrolled = ?, enrolled_by = ?, enrolment_sig = ? WHERE id = ?",
               [&](db::Query& q) { q.bind(1, when).bind(2, by).bind_blob(3, sig).bind(4, host); });
}

Result<void> Store::Transaction::remove_host(std::int64_t host)
{
    for (const char* sql : {"DELETE FROM kek_grants WHERE host = ?", "DELETE FROM settings WHERE host = ?",
                            "DELETE FROM audit_anchor WHERE id = ?", "DELETE FROM hosts WHERE id = ?"}) {
        if (auto r = run(conn_, sql, [&](db::Query& q) { q.bind(1, host); }); !r)
            return r;
    }
    return {};
}

Result<void> Store::Transaction::put_kek_grant(const KekGrantRow& g)
{
    return run(conn_,
               "INSERT INTO kek_grants (kek_id, host, wrapped_key, wrapped_kek, granted_by, granted) "
               "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kek_id, host) DO UPDATE SET wrapped_key = excluded.wrapped_key, "
               "wrapped_kek = excluded.wrapped_kek, granted_by = excluded.granted_by, granted = excluded.granted",
               [&](db::Query& q) {
                   q.bind(1, g.kek_id)
                       .bind(2, g.host)
                       .bind_blob(3, g.wrapped_key)
                       .bind_blob(4, g.wrapped_kek)
                       .bind(5, g.granted_by)
                       .bind(6, g.granted);
               });
}

Result<void> Store::Transaction::put_kek_check(std::string_view kek_id, std::span<const std::uint8_t> sealed)
{
    return run(conn_, "INSERT INTO kek_checks (kek_id, sealed) VALUES (?, ?) ON CONFLICT (kek_id) DO NOTHING",
               [&](db::Query& q) { q.bind(1, kek_id).bind_blob(2, sealed); });
}

Result<void> Store::Transaction::delete_kek_check(std::string_view kek_id)
{
    return run(conn_, "DELETE FROM kek_checks WHERE kek_id = ?", [&](db::Query& q) { q.bind(1, kek_id); });
}

Result<void> Store::Transaction::delete_kek_grant(std::string_view kek_id, std::int64_t host)
{
    return run(conn_, "DELETE FROM kek_grants WHERE kek_id = ? AND host = ?",
               [&](db::Query& q) { q.bind(1, kek_id).bind(2, host); });
}

Result<std::optional<std::vector<std::uint8_t>>> Store::Transaction::kek_check(std::string_view kek_id)
{
    return check_of(conn_, kek_id);
}

Result<std::vector<std::string>> Store::Transaction::vault_kek_ids()
{
    return collect<std::string>(
        conn_, "SELECT kek_id FROM vaults ORDER BY id", [](db::Query&) {},
        [](const db::Query& q) { return q.text(0); });
}

}  // namespace vaultfs::vault
