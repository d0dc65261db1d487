// Owners, groups and modes: the secret's own, the same for every caller,
// set by a vault's managers -- metadata for the consumers that check it
// (ssh, PostgreSQL), never what decides access (the policy does).
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

std::string shown(const std::string& path)
{
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0)
        return "errno " + std::to_string(errno);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%o %u:%u", st.st_mode & 07777, st.st_uid, st.st_gid);
    return buf;
}

Outcome shown_as(const TestUser& who, const std::string& path)
{
    return as(who, [&] { return Outcome{0, shown(path)}; });
}

int chmod_as(const TestUser& who, const std::string& path, mode_t mode)
{
    return as(who, [&] { return Outcome{::chmod(path.c_str(), mode) == 0 ? 0 : errno, {}}; }).err;
}

// A vault `own` with one secret `s`: alice may read it, bob may write it.
struct OwnVault {
    OwnVault()
    {
        REQUIRE(make_dir(m.path("own")).err == 0);
        REQUIRE(write_file(m.path("own/s"), "value").err == 0);
        REQUIRE(write_file(m.path("own/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(alice.uid) +
                                                      " get,list\nallow uid:" + std::to_string(bob.uid) +
                                                      " set,list\n")
                    .err == 0);
    }
    TestUser alice{"a"}, bob{"b"};
    Mount m;
};

}  // namespace

TEST_CASE("owner, group and mode are the secret's own, whoever asks, and ls -l says the same", "[fs][owner]")
{
    OwnVault v;
    auto& [alice, bob, m] = v;
    // One caller's view is cached for a second; it is every caller's.
    CHECK(shown(m.path("own/s")) == "400 0:0");
    CHECK(ok(shown_as(alice, m.path("own/s"))) == "400 0:0");
    CHECK(ok(shown_as(bob, m.path("own/s"))) == "400 0:0");
    CHECK(ok(shown_as(bob, m.path("own/s@1"))) == "400 0:0");
    const std::string ls = "ls -ln " + m.path("own") + " | awk 'NR > 1 {print $1, $3, $4, $9}'";
    CHECK(ok(as(alice, [&] { return shell(ls); })) == "-r-------- 0 0 s\n");
    CHECK(ok(as(bob, [&] { return shell(ls); })) == "-r-------- 0 0 s\n");
}

TEST_CASE("managers chown and chmod (audited); others may only set what is shown; the policy still decides",
          "[fs][owner]")
{
    OwnVault v;
    auto& [alice, bob, m] = v;
    REQUIRE(::chown(m.path("own/s").c_str(), alice.uid, alice.gid) == 0);
    REQUIRE(::chmod(m.path("own/s").c_str(), 0644) == 0);
    const std::string as_alice = "644 " + std::to_string(alice.uid) + ":" + std::to_string(alice.gid);
    CHECK(shown(m.path("own/s")) == as_alice);
    CHECK(ok(shown_as(bob, m.path("own/s"))) == as_alice);
    CHECK(shown(m.path("own/s@1")) == "444 " + std::to_string(alice.uid) + ":" + std::to_string(alice.gid));
    auto rec = m.last_audit("chown", 0);
    CHECK(rec["attribute"] == "owner " + std::to_string(alice.uid) + ":" + std::to_string(alice.gid));
    CHECK(rec["result"] == "ok");
    CHECK(m.last_audit("chmod", 0)["attribute"] == "mode 0644");
    // 0644 is metadata: bob (set, list) still cannot read it.
    CHECK(as(bob, [&] { return read_file(m.path("own/s")); }).err == EACCES);
    // What is shown, set again: fine for anyone, and nothing to record.
    const auto before = m.audit_count();
    CHECK(chmod_as(alice, m.path("own/s"), 0644) == 0);
    CHECK(m.audit_count() == before);
    // A change by someone who does not manage the vault: EPERM, audited.
    CHECK(chmod_as(alice, m.path("own/s"), 0600) == EPERM);
    rec = m.last_audit("chmod", alice.uid);
    CHECK(rec["decision"] == "deny");
    CHECK(rec["result"] == "EPERM");
    CHECK(as(bob, [&] { return Outcome{::chown(m.path("own/s").c_str(), bob.uid, bob.gid) == 0 ? 0 : errno, {}}; })
              .err == EPERM);
    CHECK(shown(m.path("own/s")) == as_alice);
    // Only permission bits.
    CHECK(::chmod(m.path("own/s").c_str(), 04755) == -1);
    CHECK(errno == EINVAL);
    // New versions keep the secret's owner and mode.
    REQUIRE(write_file(m.path("own/s"), "value 2").err == 0);
    CHECK(shown(m.path("own/s")) == as_alice);
}

TEST_CASE("a vault's defaults decide what its new secrets show", "[fs][owner]")
{
    TestUser alice("a");
    TestGroup readers("r");
    Mount m;
    REQUIRE(make_dir(m.path("defaults")).err == 0);
    REQUIRE(write_file(m.path("defaults/old"), "x").err == 0);
    CHECK(ok(get_xattr(m.path("defaults"), "user.vault.default_mode")) == "0400");
    REQUIRE(set_xattr(m.path("defaults"), "user.vault.default_mode", "0440").err == 0);
    REQUIRE(set_xattr(m.path("defaults"), "user.vault.default_owner", alice.name).err == 0);
    REQUIRE(set_xattr(m.path("defaults"), "user.vault.default_group", readers.name).err == 0);
    CHECK(set_xattr(m.path("defaults"), "user.vault.default_mode", "4755").err == EINVAL);
    CHECK(set_xattr(m.path("defaults"), "user.vault.default_owner", "no-such-user-x").err == EINVAL);
    REQUIRE(write_file(m.path("defaults/new"), "y").err == 0);
    CHECK(shown(m.path("defaults/new")) ==
          "440 " + std::to_string(alice.uid) + ":" + std::to_string(readers.gid));
    // Unless a secret was given its own, it follows the defaults.
    CHECK(shown(m.path("defaults/old")) ==
          "440 " + std::to_string(alice.uid) + ":" + std::to_string(readers.gid));
    CHECK(ok(get_xattr(m.path("defaults"), "user.vault.default_owner")) == std::to_string(alice.uid));
    // Setting them needs manage.
    REQUIRE(write_file(m.path("defaults/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(alice.uid) + " get\n")
                .err == 0);
    CHECK(as(alice, [&] { return set_xattr(m.path("defaults"), "user.vault.default_mode", "0444"); }).err == EACCES);
}

TEST_CASE("ssh accepts a key file set up as it requires, and refuses one that is not", "[fs][owner][ssh]")
{
    TestUser alice("a");
    Mount m;
    const std::string key = m.root + "/id_ed25519";
    REQUIRE(shell("ssh-keygen -q -t ed25519 -N '' -C test -f " + key).err == 0);
    REQUIRE(make_dir(m.path("keys")).err == 0);
    REQUIRE(shell("cp " + key + " " + m.path("keys/alice-ssh")).err == 0);
    REQUIRE(write_file(m.path("keys/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(alice.uid) + " get\n").err ==
            0);
    REQUIRE(::chown(m.path("keys/alice-ssh").c_str(), alice.uid, alice.gid) == 0);
    const std::string pub = slurp(key + ".pub").substr(0, slurp(key + ".pub").rfind(' '));
    // Owned by her and readable by others: ssh refuses to use it.
    REQUIRE(::chmod(m.path("keys/alice-ssh").c_str(), 0644) == 0);
    auto r = as(alice, [&] { return shell("ssh-keygen -y -f " + m.path("keys/alice-ssh") + " 2>&1"); });
    CHECK(r.err != 0);
    CHECK(r.data.find("UNPROTECTED PRIVATE KEY FILE") != std::string::npos);
    // 0600: it loads.
    REQUIRE(::chmod(m.path("keys/alice-ssh").c_str(), 0600) == 0);
    r = as(alice, [&] { return shell("ssh-keygen -y -f " + m.path("keys/alice-ssh") + " 2>&1"); });
    INFO(r.data);
    CHECK(r.err == 0);
    CHECK(r.data.rfind(pub, 0) == 0);
}

TEST_CASE("PostgreSQL takes its ssl_key_file from a vault when owner and mode are what it requires",
          "[fs][owner][postgres]")
{
    const std::string bin = "/usr/lib/postgresql/15/bin";
    REQUIRE(std::filesystem::exists(bin + "/postgres"));
    TestUser pg("pg");
    Mount m;
    const std::string data = m.root + "/pgdata", sock = m.root + "/pgsock", logf = sock + "/pg.log";
    REQUIRE(::mkdir(data.c_str(), 0700) == 0);
    REQUIRE(::mkdir(sock.c_str(), 0755) == 0);
    REQUIRE(::chown(data.c_str(), pg.uid, pg.gid) == 0);
    REQUIRE(::chown(sock.c_str(), pg.uid, pg.gid) == 0);
    auto r = as(pg, [&] { return shell(bin + "/initdb -A trust -U postgres -D " + data + " >/dev/null 2>&1"); });
    REQUIRE(r.err == 0);
    // A self-signed certificate; its key goes into the vault.
    const std::string crt = m.root + "/server.crt", key = m.root + "/server.key";
    REQUIRE(shell("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -keyout " + key + " -out " +
                  crt + " 2>/dev/null")
                .err == 0);
    REQUIRE(::chmod(crt.c_str(), 0644) == 0);
    REQUIRE(make_dir(m.path("dbs")).err == 0);
    REQUIRE(shell("cp " + key + " " + m.path("dbs/server-key")).err == 0);
    REQUIRE(write_file(m.path("dbs/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(pg.uid) + " get\n").err == 0);
    REQUIRE(::chown(m.path("dbs/server-key").c_str(), pg.uid, pg.gid) == 0);

    // A free port: bind to 0 and read what the kernel chose.
    const auto port = shell("/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0)); "
                            "print(s.getsockname()[1])'");
    REQUIRE(port.err == 0);
    const std::string p = port.data.substr(0, port.data.find('\n'));
    const std::string opts = "-c ssl=on -c ssl_cert_file=" + crt + " -c ssl_key_file=" + m.path("dbs/server-key") +
                             " -c listen_addresses=127.0.0.1 -c port=" + p + " -c unix_socket_directories=" + sock;
    const auto start = [&] {
        return as(pg, [&] {
            return shell(bin + "/pg_ctl -w -t 30 -D " + data + " -l " + logf + " -o '" + opts + "' start >/dev/null 2>&1");
        });
    };
    struct Stop {
        const TestUser& pg;
        std::string cmd;
        ~Stop() { as(pg, [&] { return shell(cmd + " >/dev/null 2>&1"); }); }
    } stop{pg, bin + "/pg_ctl -w -D " + data + " -m immediate stop"};

    // Group-readable and owned by the server's user: PostgreSQL refuses it.
    REQUIRE(::chmod(m.path("dbs/server-key").c_str(), 0640) == 0);
    CHECK(start().err != 0);
    CHECK(slurp(logf).find("has group or world access") != std::string::npos);
    // 0600: it starts, and serves TLS with that key.
    REQUIRE(::chmod(m.path("dbs/server-key").c_str(), 0600) == 0);
    r = start();
    INFO(slurp(logf));
    REQUIRE(r.err == 0);
    const auto q = shell("psql 'host=127.0.0.1 port=" + p + " user=postgres sslmode=require dbname=postgres' -Atc "
                         "'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' 2>&1");
    INFO(q.data);
    CHECK(q.err == 0);
    CHECK(q.data == "t\n");
    CHECK(m.last_audit("get", pg.uid)["secret"] == "server-key");
}
