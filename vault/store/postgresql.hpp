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
// - None of those fires against a server that is stopped (SIGSTOP, a paused
//   VM: its kernel still acknowledges) or that waits on a lock. So every
//   call waits in poll() on the session's socket, never in libpq's blocking
//   reads, and gives up at the deadline the Store set (set_deadline): the
//   session is then dropped (broken()), since a reply may still come to a
//   request nobody waits for, and the next use opens another.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "vault/store/db.hpp"

struct pg_conn;
struct pg_result;

namespace vaultfs::vault::pg {

// The connection string without its password (for messages and logs).
std::string redact(const std::string& conninfo);

// "postgresql://…", "postgres://…" or a key=value string with host=.
bool is_conninfo(const std::string& s);

using Deadline = std::chrono::steady_clock::time_point;

class Statement;

class Connection final : public db::Connection {
public:
    // Opens a session; with a deadline, connecting gives up at it.
    static Result<std::unique_ptr<Connection>> open(const std::string& conninfo,
                                                    std::optional<Deadline> deadline = std::nullopt);
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

    // Every call from now on fails (Errc::storage) and drops the session
    // if the server has not answered by `deadline`; nullopt: no deadline.
    void set_deadline(std::optional<Deadline> deadline) override;

private:
    friend class Statement;
    explicit Connection(pg_conn* c) : conn_(c) {}
    Result<std::unique_ptr<db::Statement>> prepare(const char* sql) override;
    // Sends one command (`send`: a PQsend* call) and collects its result
    // by the deadline: the first failed result, or else the last.
    Result<pg_result*> await(const char* what, const std::function<int()>& send);
    pg_conn* conn_;
    std::uint64_t statements_ = 0;
    std::optional<Deadline> deadline_;
    long long budget_ms_ = 0;  // the time the deadline gave, for messages
    bool dead_ = false;        // dropped at a deadline or a failed send
};

}  // namespace vaultfs::vault::pg
