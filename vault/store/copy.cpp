#include "vault/store/copy.hpp"

#include "vault/store/db.hpp"

namespace vaultfs::vault {

namespace {

// In the order foreign keys need them.
constexpr const char* tables[] = {"vaults",  "policies",        "secrets",  "versions",     "tags",
                                  "objects", "object_versions", "settings", "audit_anchor", "kek_checks"};
// Tables whose ids come from a sequence on PostgreSQL.
constexpr const char* sequenced[] = {"vaults", "secrets", "versions", "objects", "object_versions"};

}  // namespace

Result<std::size_t> copy_store(Store& from, Store& to)
{
    std::size_t copied = 0;
    auto w = to.write([&](Store::Transaction& tx) -> Result<void> {
        db::Connection& out = tx.connection();
        for (const char* table : tables) {
            const std::string select = std::string("SELECT * FROM ") + table;
            auto r = from.each_row(select, [&](const db::Query& row) -> Result<void> {
                std::string columns, marks;
                for (int i = 0; i < row.column_count(); ++i) {
                    columns += (i ? ", " : "") + row.column_name(i);
                    marks += i ? ", ?" : "?";
                }
                auto q = out.query(std::string("INSERT INTO ") + table + " (" + columns + ") VALUES (" + marks + ")");
                if (!q)
                    return tl::unexpected(q.error());
                for (int i = 0; i < row.column_count(); ++i) {
                    const auto type = row.column_type(i);
                    if (!type)
                        q->bind_null(i + 1, db::Type::any);
                    else if (*type == db::Type::integer)
                        q->bind(i + 1, row.int64(i));
                    else if (*type == db::Type::blob)
                        q->bind_blob(i + 1, row.blob(i));
                    else
                        q->bind(i + 1, row.text(i));
                }
                if (auto ran = q->run(); !ran)
                    return fail(ran.error().code, std::string("copying a row of ") + table + ": " + ran.error().message);
                ++copied;
                return {};
            });
            if (!r)
                return r;
        }
        if (!to.shared())
            return {};
        for (const char* table : sequenced) {
            const std::string sql = std::string("SELECT setval(pg_get_serial_sequence('") + table +
                                    "', 'id'), (SELECT coalesce(max(id), 0) + 1 FROM " + table + "), false)";
            if (auto r = db::run(out, sql, [](db::Query&) {}); !r)
                return r;
        }
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    return copied;
}

}  // namespace vaultfs::vault
