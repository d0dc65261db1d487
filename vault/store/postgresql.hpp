// postgresql: the engine for several hosts, over libpq. A pg::Connection
// implements db::Connection; the Store opens a writer, a pool of readers
// and one listener (vault/store/feed.hpp) on the same connection string.
//
// Where it differs from SQLite:
// - `?`/`?N` parameters become `$N`; every parameter is sent typed and in
//   binary (BIGINT, TEXT, BYTEA), and results come back in binary.
// - A connection can be lost (a stopped server, a failover). broken() says
//   so and the Store opens another; libpq's multi-host strings
//   (`host=a,b target_session_attrs=read-write`) find the new primary.
// - Timeouts are set so that a dead server is noticed in seconds, not at
//   the kernel's TCP timeout: connect_timeout, tcp_user_timeout, keepalives
//   (each can be overridden in the connection string).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "vault/store/db.hpp"

struct pg_conn;

namespace vaultfs::vault::pg {

// The connection string without its password (for messages and logs).
std::string redact(const std::string& conninfo);

// "postgresql://…", "postgres://…" or a key=value string with host=.
bool is_conninfo(const std::string& s);

class Connection final : public db::Connection {
public:
    static Result<std::unique_ptr<Connection>> open(const std::string& conninfo);
    ~Connection() override;

    Result<void> exec(const char* sql) override;
    bool in_transaction() const override;
    bool broken() const override;
    const char* begin_write() const override { return "BEGIN"; }

    // Waits up to `timeout` for a notification on a channel this session
    // LISTENs to. true: at least one arrived (all are consumed).
    Result<bool> wait_notification(std::chrono::milliseconds timeout);

    // The server this session is connected to, "host:port".
    std::string server() const;

private:
    explicit Connection(pg_conn* c) : conn_(c) {}
    Result<std::unique_ptr<db::Statement>> prepare(const char* sql) override;
    pg_conn* conn_;
    std::uint64_t statements_ = 0;
};

}  // namespace vaultfs::vault::pg
