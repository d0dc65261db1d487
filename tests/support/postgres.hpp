// Test support: a real PostgreSQL 15 server of the test's own — initdb into
// a temporary directory, run as the `postgres` user on a free port,
// stopped (immediate) and removed at the end. No system service is used.
#pragma once

#include <memory>
#include <string>

namespace vaultfs::testing {

class PgServer {
public:
    // A new primary. `options`: extra `-c name=value` settings.
    explicit PgServer(const std::string& options = "");
    ~PgServer();
    PgServer(const PgServer&) = delete;
    PgServer& operator=(const PgServer&) = delete;

    // A streaming standby of `primary` (pg_basebackup -R), started.
    static std::unique_ptr<PgServer> standby_of(PgServer& primary, const std::string& name);

    int port() const { return port_; }
    const std::string& dir() const { return dir_; }
    // postgresql://postgres@127.0.0.1:PORT/DB
    std::string url(const std::string& db) const;
    // A new empty database; its URL.
    std::string new_database();

    bool start();
    // pg_ctl stop: -m immediate (a crash, as kill -9 of the server) or fast.
    void stop(bool immediate = true);
    bool promote();
    bool running() const { return running_; }
    // psql -Atc SQL against DB; its output ("" and ok=false on failure).
    std::string psql(const std::string& sql, const std::string& db = "postgres", bool* ok = nullptr) const;
    std::string log() const;

private:
    PgServer(int port, std::string dir, std::string options);
    int port_ = 0;
    std::string dir_;
    std::string options_;
    bool running_ = false;
    int databases_ = 0;
};

// One primary per test process, started on first use.
PgServer& shared_pg();

// `postgres`'s own commands, run through runuser; exit status.
int as_postgres(const std::string& command);

}  // namespace vaultfs::testing
