#include "vault/store/sqlite.hpp"

namespace vaultfs::vault::sqlite {

Error error_from(sqlite3* db, int rc, std::string_view what)
{
    std::string message(what);
    message += ": ";
    message += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    const int primary = rc & 0xff;
    if (primary == SQLITE_FULL)
        return Error{Errc::no_space, std::move(message)};
    if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY)
        return Error{Errc::already_exists, std::move(message)};
    return Error{Errc::storage, std::move(message)};
}

namespace {

class Statement final : public db::Statement {
public:
    Statement(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
    ~Statement() override { sqlite3_finalize(stmt_); }

    void bind_int64(int index, std::int64_t v) override { sqlite3_bind_int64(stmt_, index, v); }
    void bind_text(int index, std::string_view v) override
    {
        sqlite3_bind_text64(stmt_, index, v.data(), v.size(), SQLITE_TRANSIENT, SQLITE_UTF8);
    }
    void bind_blob(int index, std::span<const std::uint8_t> v) override
    {
        // A zero-length blob must still be a blob, not NULL.
        static const std::uint8_t empty = 0;
        sqlite3_bind_blob64(stmt_, index, v.empty() ? &empty : v.data(), v.size(), SQLITE_TRANSIENT);
    }
    void bind_null(int index, db::Type) override { sqlite3_bind_null(stmt_, index); }

    Result<bool> step() override
    {
        const int rc = sqlite3_step(stmt_);
        if (rc == SQLITE_ROW)
            return true;
        if (rc == SQLITE_DONE)
            return false;
        return tl::unexpected(error_from(db_, rc, "query failed"));
    }

    bool is_null(int column) const override { return sqlite3_column_type(stmt_, column) == SQLITE_NULL; }
    std::int64_t int64(int column) const override { return sqlite3_column_int64(stmt_, column); }
    std::string text(int column) const override
    {
        const auto* p = sqlite3_column_text(stmt_, column);
        const int n = sqlite3_column_bytes(stmt_, column);
        return p != nullptr ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n))
                            : std::string();
    }
    std::vector<std::uint8_t> blob(int column) const override
    {
        const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(stmt_, column));
        const int n = sqlite3_column_bytes(stmt_, column);
        return p != nullptr ? std::vector<std::uint8_t>(p, p + n) : std::vector<std::uint8_t>();
    }
    void reset() override
    {
        sqlite3_reset(stmt_);
        sqlite3_clear_bindings(stmt_);
    }
    int column_count() const override { return sqlite3_column_count(stmt_); }
    std::string column_name(int column) const override { return sqlite3_column_name(stmt_, column); }
    std::optional<db::Type> column_type(int column) const override
    {
        switch (sqlite3_column_type(stmt_, column)) {
        case SQLITE_NULL:
            return std::nullopt;
        case SQLITE_INTEGER:
            return db::Type::integer;
        case SQLITE_BLOB:
            return db::Type::blob;
        default:
            return db::Type::text;
        }
    }

private:
    sqlite3* db_;
    sqlite3_stmt* stmt_;
};

}  // namespace

Result<std::unique_ptr<Connection>> Connection::open(const std::string& path, bool read_only, bool create)
{
    int flags = SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_PRIVATECACHE;
    flags |= read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE;
    if (create && !read_only)
        flags |= SQLITE_OPEN_CREATE;
    sqlite3* db = nullptr;
    const int rc = sqlite3_open_v2(path.c_str(), &db, flags, nullptr);
    if (rc != SQLITE_OK) {
        auto err = error_from(db, rc, "cannot open database " + path);
        sqlite3_close_v2(db);
        return tl::unexpected(err);
    }
    std::unique_ptr<Connection> conn(new Connection(db));
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, 5000);
    // secure_delete: freed pages (purged secrets, old ciphertexts) are zeroed.
    if (auto r = conn->exec("PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;"); !r)
        return tl::unexpected(r.error());
    return conn;
}

Connection::~Connection()
{
    forget_statements();
    sqlite3_close_v2(db_);
}

Result<void> Connection::exec(const char* sql)
{
    char* msg = nullptr;
    const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &msg);
    if (rc != SQLITE_OK) {
        std::string what = msg != nullptr ? msg : sqlite3_errstr(rc);
        sqlite3_free(msg);
        Error e = error_from(db_, rc, "statement failed");
        e.message = "statement failed: " + what;
        return tl::unexpected(std::move(e));
    }
    return {};
}

Result<std::unique_ptr<db::Statement>> Connection::prepare(const char* sql)
{
    sqlite3_stmt* stmt = nullptr;
    const int rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    if (rc != SQLITE_OK)
        return tl::unexpected(error_from(db_, rc, "cannot prepare statement"));
    return std::unique_ptr<db::Statement>(new Statement(db_, stmt));
}

}  // namespace vaultfs::vault::sqlite
