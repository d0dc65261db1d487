// sqlite: RAII owners for SQLite handles, used only by vault/store.cpp.
//
// A Connection owns one sqlite3* and a cache of prepared statements. A
// Statement borrowed from the cache is reset and unbound when the borrow
// ends. Neither is thread-safe: one thread uses a connection at a time (the
// store hands connections out from pools).
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vault/error.hpp"

namespace vaultfs::vault::sqlite {

// Errc::no_space for SQLITE_FULL, Errc::storage otherwise; the message names
// what failed and SQLite's own explanation.
Error error_from(sqlite3* db, int rc, std::string_view what);

class Statement {
public:
    explicit Statement(sqlite3_stmt* stmt) : stmt_(stmt) {}
    ~Statement() { sqlite3_finalize(stmt_); }
    Statement(const Statement&) = delete;
    Statement& operator=(const Statement&) = delete;

    sqlite3_stmt* get() const { return stmt_; }

private:
    sqlite3_stmt* stmt_;
};

// A prepared statement in use; resets and clears its bindings on destruction.
class Query {
public:
    Query(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
    ~Query();
    Query(Query&& other) noexcept : db_(other.db_), stmt_(std::exchange(other.stmt_, nullptr)) {}
    Query(const Query&) = delete;
    Query& operator=(const Query&) = delete;
    Query& operator=(Query&&) = delete;

    // Parameters are 1-based, as in SQLite.
    Query& bind(int index, std::int64_t v);
    Query& bind(int index, std::string_view v);  // text, copied
    Query& bind_blob(int index, std::span<const std::uint8_t> v);
    Query& bind_null(int index);
    template <class T>
    Query& bind(int index, const std::optional<T>& v)
    {
        return v ? bind(index, *v) : bind_null(index);
    }

    // true: a row is available; false: done.
    Result<bool> step();
    // Runs a statement that returns no rows.
    Result<void> run();

    std::int64_t int64(int column) const { return sqlite3_column_int64(stmt_, column); }
    bool is_null(int column) const { return sqlite3_column_type(stmt_, column) == SQLITE_NULL; }
    std::optional<std::int64_t> optional_int64(int column) const;
    std::string text(int column) const;
    std::optional<std::string> optional_text(int column) const;
    std::vector<std::uint8_t> blob(int column) const;

private:
    sqlite3* db_;
    sqlite3_stmt* stmt_;
};

class Connection {
public:
    // Opens (or creates) the database at `path`; read_only opens without
    // write access. Sets busy timeout, foreign keys, and secure_delete.
    static Result<std::unique_ptr<Connection>> open(const std::string& path, bool read_only, bool create);
    ~Connection();
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;

    sqlite3* get() const { return db_; }

    // Runs one or more statements without results.
    Result<void> exec(const char* sql);
    // A cached prepared statement for `sql` (a string literal: the pointer is
    // the cache key).
    Result<Query> query(const char* sql);

private:
    explicit Connection(sqlite3* db) : db_(db) {}
    sqlite3* db_;
    std::unordered_map<const char*, std::unique_ptr<Statement>> cache_;
};

// Runs a prepared query and collects every row through `read`.
template <class Row, class Bind, class Read>
Result<std::vector<Row>> collect(sqlite::Connection& c, const char* sql, Bind&& bind, Read&& read)
{
    auto q = c.query(sql);
    if (!q)
        return tl::unexpected(q.error());
    bind(*q);
    std::vector<Row> rows;
    for (;;) {
        auto more = q->step();
        if (!more)
            return tl::unexpected(more.error());
        if (!*more)
            return rows;
        rows.push_back(read(*q));
    }
}

template <class Row, class Bind, class Read>
Result<std::optional<Row>> first(sqlite::Connection& c, const char* sql, Bind&& bind, Read&& read)
{
    auto q = c.query(sql);
    if (!q)
        return tl::unexpected(q.error());
    bind(*q);
    auto more = q->step();
    if (!more)
        return tl::unexpected(more.error());
    if (!*more)
        return std::optional<Row>();
    return std::optional<Row>(read(*q));
}

template <class Bind>
Result<void> run(sqlite::Connection& c, const char* sql, Bind&& bind)
{
    auto q = c.query(sql);
    if (!q)
        return tl::unexpected(q.error());
    bind(*q);
    return q->run();
}

}  // namespace vaultfs::vault::sqlite
