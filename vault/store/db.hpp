// db: the one SQL interface the Store speaks, with an engine behind it
// (vault/store/sqlite.hpp, vault/store/postgresql.hpp).
//
// The Store writes its SQL once, in the dialect both engines share:
// parameters are `?` (numbered left to right) or `?N`; ids come back with
// RETURNING; upserts are ON CONFLICT. What differs — schema text, checks,
// how a transaction starts — is each engine's own.
//
// A Connection caches one prepared Statement per SQL text. Neither is
// thread-safe: one thread uses a connection at a time (the Store hands them
// out from pools).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vault/model/error.hpp"

namespace vaultfs::vault::db {

// What a NULL parameter stands in for (PostgreSQL types its parameters);
// `any`: whatever the column is (the server infers it).
enum class Type { integer, text, blob, any };

// A prepared statement of one engine, owned by its Connection's cache.
class Statement {
public:
    virtual ~Statement() = default;
    // Parameters are 1-based.
    virtual void bind_int64(int index, std::int64_t v) = 0;
    virtual void bind_text(int index, std::string_view v) = 0;
    virtual void bind_blob(int index, std::span<const std::uint8_t> v) = 0;
    virtual void bind_null(int index, Type type) = 0;
    // true: a row is available; false: done.
    virtual Result<bool> step() = 0;
    virtual bool is_null(int column) const = 0;
    virtual std::int64_t int64(int column) const = 0;
    virtual std::string text(int column) const = 0;
    virtual std::vector<std::uint8_t> blob(int column) const = 0;
    // Forgets the result and the bindings, ready for the next use.
    virtual void reset() = 0;
    // The row's shape (copying a store between engines): columns, their
    // names, and each value's type (nullopt: NULL).
    virtual int column_count() const = 0;
    virtual std::string column_name(int column) const = 0;
    virtual std::optional<Type> column_type(int column) const = 0;
};

// A prepared statement in use; resets it on destruction.
class Query {
public:
    explicit Query(Statement* s) : s_(s) {}
    ~Query()
    {
        if (s_ != nullptr)
            s_->reset();
    }
    Query(Query&& other) noexcept : s_(std::exchange(other.s_, nullptr)) {}
    Query(const Query&) = delete;
    Query& operator=(const Query&) = delete;
    Query& operator=(Query&&) = delete;

    Query& bind(int index, std::int64_t v)
    {
        s_->bind_int64(index, v);
        return *this;
    }
    Query& bind(int index, std::string_view v)  // text, copied
    {
        s_->bind_text(index, v);
        return *this;
    }
    Query& bind(int index, const std::string& v) { return bind(index, std::string_view(v)); }
    Query& bind(int index, const char* v) { return bind(index, std::string_view(v)); }
    Query& bind_blob(int index, std::span<const std::uint8_t> v)
    {
        s_->bind_blob(index, v);
        return *this;
    }
    Query& bind_null(int index, Type type)
    {
        s_->bind_null(index, type);
        return *this;
    }
    Query& bind(int index, const std::optional<std::int64_t>& v)
    {
        return v ? bind(index, *v) : bind_null(index, Type::integer);
    }
    Query& bind(int index, const std::optional<std::string>& v)
    {
        return v ? bind(index, std::string_view(*v)) : bind_null(index, Type::text);
    }

    Result<bool> step() { return s_->step(); }
    // Runs a statement that returns no rows (or ignores them).
    Result<void> run()
    {
        auto r = step();
        if (!r)
            return tl::unexpected(r.error());
        return {};
    }

    std::int64_t int64(int column) const { return s_->int64(column); }
    bool is_null(int column) const { return s_->is_null(column); }
    std::optional<std::int64_t> optional_int64(int column) const
    {
        return is_null(column) ? std::nullopt : std::optional<std::int64_t>(int64(column));
    }
    std::string text(int column) const { return s_->text(column); }
    std::optional<std::string> optional_text(int column) const
    {
        return is_null(column) ? std::nullopt : std::optional<std::string>(text(column));
    }
    std::vector<std::uint8_t> blob(int column) const { return s_->blob(column); }
    int column_count() const { return s_->column_count(); }
    std::string column_name(int column) const { return s_->column_name(column); }
    std::optional<Type> column_type(int column) const { return s_->column_type(column); }

private:
    Statement* s_;
};

class Connection {
public:
    virtual ~Connection() = default;
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;

    // Runs one or more statements without parameters or results.
    virtual Result<void> exec(const char* sql) = 0;
    // Inside a transaction (also one that failed and awaits ROLLBACK).
    virtual bool in_transaction() const = 0;
    // The connection is lost: it will not work again (PostgreSQL).
    virtual bool broken() const { return false; }
    // What starts a write transaction.
    virtual const char* begin_write() const = 0;
    // Calls from now on give up at `deadline` (nullopt: none). Only a
    // server across a network needs one (PostgreSQL): SQLite's waits are
    // bounded by its busy timeout.
    virtual void set_deadline(std::optional<std::chrono::steady_clock::time_point> /*deadline*/) {}

    // A cached prepared statement for `sql`, a string literal: its pointer
    // is the cache key.
    Result<Query> query(const char* sql);
    // The same for SQL built at run time, cached by its text.
    Result<Query> query(const std::string& sql);

protected:
    Connection() = default;
    virtual Result<std::unique_ptr<Statement>> prepare(const char* sql) = 0;
    // Drops every prepared statement (a reconnected session has none).
    void forget_statements()
    {
        by_pointer_.clear();
        by_text_.clear();
    }

private:
    std::unordered_map<const char*, std::unique_ptr<Statement>> by_pointer_;
    std::unordered_map<std::string, std::unique_ptr<Statement>> by_text_;
};

// Runs a prepared query and collects every row through `read`.
template <class Row, class Sql, class Bind, class Read>
Result<std::vector<Row>> collect(Connection& c, const Sql& sql, Bind&& bind, Read&& read)
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

template <class Row, class Sql, class Bind, class Read>
Result<std::optional<Row>> first(Connection& c, const Sql& sql, Bind&& bind, Read&& read)
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

template <class Sql, class Bind>
Result<void> run(Connection& c, const Sql& sql, Bind&& bind)
{
    auto q = c.query(sql);
    if (!q)
        return tl::unexpected(q.error());
    bind(*q);
    return q->run();
}

// The one integer a query answers (0 when it returns no row).
template <class Sql, class Bind>
Result<std::int64_t> integer(Connection& c, const Sql& sql, Bind&& bind)
{
    auto v = first<std::int64_t>(c, sql, bind, [](const Query& q) { return q.int64(0); });
    if (!v)
        return tl::unexpected(v.error());
    return v->value_or(0);
}

}  // namespace vaultfs::vault::db
