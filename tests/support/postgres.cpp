#include "tests/support/postgres.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace vaultfs::testing {

namespace {

const std::string bin = "/usr/lib/postgresql/15/bin";

int free_port()
{
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t n = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
    ::close(fd);
    return ntohs(a.sin_port);
}

std::string new_dir()
{
    // Under /tmp, not $TMPDIR: `postgres` must reach it from any clone.
    char tmpl[] = "/tmp/vaultfs-pg-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    const std::string dir = tmpl;
    REQUIRE(std::system(("chown postgres:postgres " + dir + " && chmod 0700 " + dir).c_str()) == 0);
    return dir;
}

}  // namespace

int as_postgres(const std::string& command)
{
    const int rc = std::system(("cd /tmp && runuser -u postgres -- " + command).c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

PgServer::PgServer(int port, std::string dir, std::string options)
    : port_(port), dir_(std::move(dir)), options_(std::move(options))
{
}

PgServer::PgServer(const std::string& options) : port_(free_port()), dir_(new_dir()), options_(options)
{
    REQUIRE(std::filesystem::exists(bin + "/postgres"));
    REQUIRE(as_postgres(bin + "/initdb -A trust -U postgres -D " + dir_ + "/data > " + dir_ + "/initdb.log 2>&1") ==
            0);
    // Streaming replication from 127.0.0.1 (trust, as everything here).
    std::ofstream(dir_ + "/data/pg_hba.conf", std::ios::app) << "host replication postgres 127.0.0.1/32 trust\n";
    INFO(log());
    REQUIRE(start());
}

std::unique_ptr<PgServer> PgServer::standby_of(PgServer& primary, const std::string& name)
{
    std::unique_ptr<PgServer> s(new PgServer(free_port(), new_dir(), primary.options_));
    REQUIRE(as_postgres(bin + "/pg_basebackup -h 127.0.0.1 -p " + std::to_string(primary.port_) +
                        " -U postgres -X stream -R -c fast -D " + s->dir_ + "/data -d 'application_name=" + name +
                        "' > " + s->dir_ + "/basebackup.log 2>&1") == 0);
    // A standby promoted later has no standby of its own to wait for.
    std::ofstream(s->dir_ + "/data/postgresql.auto.conf", std::ios::app)
        << "synchronous_standby_names = ''\n"
        << "primary_conninfo = 'host=127.0.0.1 port=" << primary.port_ << " user=postgres application_name=" << name
        << "'\n";
    REQUIRE(std::system(("chown postgres:postgres " + s->dir_ + "/data/postgresql.auto.conf").c_str()) == 0);
    INFO(s->log());
    REQUIRE(s->start());
    return s;
}

PgServer::~PgServer()
{
    if (running_)
        stop(true);
    std::filesystem::remove_all(dir_);
}

std::string PgServer::url(const std::string& db) const
{
    return "postgresql://postgres@127.0.0.1:" + std::to_string(port_) + "/" + db;
}

std::string PgServer::new_database()
{
    const std::string name = "vaultfs_" + std::to_string(::getpid()) + "_" + std::to_string(++databases_);
    bool ok = false;
    psql("CREATE DATABASE " + name, "postgres", &ok);
    REQUIRE(ok);
    return url(name);
}

bool PgServer::start()
{
    const std::string opts = "-c listen_addresses=127.0.0.1 -c port=" + std::to_string(port_) +
                             " -c unix_socket_directories=" + dir_ + " -c fsync=on " + options_;
    running_ = as_postgres(bin + "/pg_ctl -w -t 60 -D " + dir_ + "/data -l " + dir_ + "/server.log -o '" + opts +
                           "' start > /dev/null 2>&1") == 0;
    return running_;
}

void PgServer::stop(bool immediate)
{
    as_postgres(bin + "/pg_ctl -w -D " + dir_ + "/data -m " + (immediate ? "immediate" : "fast") +
                " stop > /dev/null 2>&1");
    running_ = false;
}

bool PgServer::promote()
{
    return as_postgres(bin + "/pg_ctl -w -t 60 -D " + dir_ + "/data promote > /dev/null 2>&1") == 0;
}

std::string PgServer::psql(const std::string& sql, const std::string& db, bool* ok) const
{
    const std::string cmd = "psql -X -q -At -h 127.0.0.1 -p " + std::to_string(port_) + " -U postgres -d " + db +
                            " -c \"" + sql + "\" 2>&1";
    FILE* p = ::popen(cmd.c_str(), "r");
    std::string out;
    std::array<char, 4096> buf{};
    while (p != nullptr) {
        const std::size_t n = std::fread(buf.data(), 1, buf.size(), p);
        if (n == 0)
            break;
        out.append(buf.data(), n);
    }
    const int rc = p != nullptr ? ::pclose(p) : -1;
    if (ok != nullptr)
        *ok = rc == 0;
    while (!out.empty() && out.back() == '\n')
        out.pop_back();
    return out;
}

std::string PgServer::log() const
{
    std::ifstream f(dir_ + "/server.log");
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

PgServer& shared_pg()
{
    static std::unique_ptr<PgServer> server;
    if (!server)
        server = std::make_unique<PgServer>();
    return *server;
}

}  // namespace vaultfs::testing
