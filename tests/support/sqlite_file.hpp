// A test's own connection to a SQLite file (a state's vault.db), to look at
// or edit rows behind the store's back. Every failure fails the test.
#pragma once

#include <catch2/catch.hpp>

#include <sqlite3.h>

#include <cstdint>
#include <string>

namespace vaultfs::testing {

class SqliteFile {
public:
    explicit SqliteFile(const std::string& path, int flags = SQLITE_OPEN_READWRITE)
    {
        REQUIRE(sqlite3_open_v2(path.c_str(), &db_, flags, nullptr) == SQLITE_OK);
        sqlite3_busy_timeout(db_, 5000);
    }
    ~SqliteFile() { sqlite3_close_v2(db_); }
    SqliteFile(const SqliteFile&) = delete;
    SqliteFile& operator=(const SqliteFile&) = delete;

    // Runs `sql`; returns how many rows it changed.
    int exec(const std::string& sql)
    {
        char* msg = nullptr;
        const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg);
        INFO(sql << ": " << (msg != nullptr ? msg : ""));
        sqlite3_free(msg);
        REQUIRE(rc == SQLITE_OK);
        return sqlite3_changes(db_);
    }

    // The first column of the first row `sql` yields (there must be one).
    std::int64_t integer(const std::string& sql)
    {
        sqlite3_stmt* st = first_row(sql);
        const auto v = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        return v;
    }
    std::string text(const std::string& sql)
    {
        sqlite3_stmt* st = first_row(sql);
        std::string v(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)));
        sqlite3_finalize(st);
        return v;
    }

protected:
    sqlite3* handle() { return db_; }

private:
    sqlite3_stmt* first_row(const std::string& sql)
    {
        sqlite3_stmt* st = nullptr;
        REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
        INFO(sql);
        REQUIRE(sqlite3_step(st) == SQLITE_ROW);
        return st;
    }

    sqlite3* db_ = nullptr;
};

}  // namespace vaultfs::testing
