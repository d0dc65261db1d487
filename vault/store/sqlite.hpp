// sqlite: the embedded engine (one host). An SqliteConnection owns one
// sqlite3* and implements db::Connection over it; see vault/store/store.hpp
// for how the Store uses it (WAL, one writer, pooled readers).
//
// Where it differs from PostgreSQL: a write transaction starts with BEGIN
// IMMEDIATE (the writer lock at once, never an upgrade that can fail);
// freed pages are zeroed (secure_delete); the database is one file whose
// health `PRAGMA quick_check` tells.
#pragma once

#include <sqlite3.h>

#include <memory>
#include <string>
#include <string_view>

#include "vault/store/db.hpp"

namespace vaultfs::vault::sqlite {

// Errc::no_space for SQLITE_FULL, Errc::already_exists for a unique key,
// Errc::storage otherwise; the message names what failed and SQLite's own
// explanation.
Error error_from(sqlite3* db, int rc, std::string_view what);

class Connection final : public db::Connection {
public:
    // Opens (or creates) the database at `path`; read_only opens without
    // write access. Sets busy timeout, foreign keys, and secure_delete.
    static Result<std::unique_ptr<Connection>> open(const std::string& path, bool read_only, bool create);
    ~Connection() override;

    sqlite3* get() const { return db_; }

    Result<void> exec(const char* sql) override;
    bool in_transaction() const override { return sqlite3_get_autocommit(db_) == 0; }
    const char* begin_write() const override { return "BEGIN IMMEDIATE"; }

private:
    explicit Connection(sqlite3* db) : db_(db) {}
    Result<std::unique_ptr<db::Statement>> prepare(const char* sql) override;
    sqlite3* db_;
};

}  // namespace vaultfs::vault::sqlite
