// Integration: the secret lifecycle — attributes, soft delete, recover,
// purge, automatic purge, backup and restore, the control socket.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

TEST_CASE("attributes are user.vault.* xattrs, validated", "[fs][lifecycle]")
{
    TestUser reader("r");
    Mount m;
    REQUIRE(make_dir(m.path("attrs")).err == 0);
    REQUIRE(write_file(m.path("attrs/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(reader.uid) + " get,list\n").err == 0);
    REQUIRE(write_file(m.path("attrs/s"), "one").err == 0);
    REQUIRE(write_file(m.path("attrs/s"), "two").err == 0);

    CHECK(ok(list_xattr(m.path("attrs/s"))) ==
          "user.vault.created\nuser.vault.enabled\nuser.vault.updated\nuser.vault.version");
    CHECK(ok(get_xattr(m.path("attrs/s"), "user.vault.version")) == "2");
    CHECK(ok(get_xattr(m.path("attrs/s@1"), "user.vault.version")) == "1");
    CHECK(ok(get_xattr(m.path("attrs/s"), "user.vault.enabled")) == "true");
    CHECK(get_xattr(m.path("attrs/s"), "user.vault.expires").err == ENODATA);
    CHECK(get_xattr(m.path("attrs/s"), "user.other").err == ENODATA);
    CHECK(get_xattr(m.path("attrs/s"), "security.capability").err == EOPNOTSUPP);
    CHECK(get_xattr(m.path("attrs/s"), "system.posix_acl_access").err == EOPNOTSUPP);

    // Settable ones round-trip; on S they land on the current version.
    CHECK(set_xattr(m.path("attrs/s"), "user.vault.content_type", "application/json").err == 0);
    CHECK(set_xattr(m.path("attrs/s"), "user.vault.tag.env", "prod").err == 0);
    CHECK(set_xattr(m.path("attrs/s"), "user.vault.expires", "2099-12-31T23:59:59Z").err == 0);
    CHECK(ok(get_xattr(m.path("attrs/s"), "user.vault.content_type")) == "application/json");
    CHECK(ok(get_xattr(m.path("attrs/s@2"), "user.vault.tag.env")) == "prod");
    CHECK(ok(get_xattr(m.path("attrs/s"), "user.vault.expires")) == "2099-12-31T23:59:59Z");
    CHECK(get_xattr(m.path("attrs/s@1"), "user.vault.tag.env").err == ENODATA);
    CHECK(ok(list_xattr(m.path("attrs/s"))) ==
          "user.vault.content_type\nuser.vault.created\nuser.vault.enabled\nuser.vault.expires\nuser.vault.tag.env\n"
          "user.vault.updated\nuser.vault.version");

    // Invalid values: EINVAL, nothing changes. Read-only: EPERM. Foreign: ENOTSUP.
    for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
             {"user.vault.enabled", "yes"},
             {"user.vault.expires", "2099-13-01T00:00:00Z"},
             {"user.vault.expires", "tomorrow"},
             {"user.vault.expires", "2099-12-31T23:59:59+01:00"},
             {"user.vault.not_before", "2100-01-01T00:00:00Z"},  // after expires
             {"user.vault.content_type", std::string(256, 'c')},
             {"user.vault.tag.bad", std::string(513, 'v')},
             {"user.vault.tag.ctl", "a\nb"},
             {"user.vault.colour", "blue"}}) {
        INFO(name << "=" << value);
        CHECK(set_xattr(m.path("attrs/s"), name, value).err == EINVAL);
    }
    CHECK(ok(get_xattr(m.path("attrs/s"), "user.vault.content_type")) == "application/json");
    CHECK(set_xattr(m.path("attrs/s"), "user.vault.version", "9").err == EPERM);
    CHECK(set_xattr(m.path("attrs/s"), "user.vault.created", "2020-01-01T00:00:00Z").err == EPERM);
    CHECK(set_xattr(m.path("attrs/s"), "user.other", "x").err == ENOTSUP);
    CHECK(set_xattr(m.path("attrs/s"), "trusted.x", "x").err == ENOTSUP);
    for (int i = 1; i < 15; ++i)
        REQUIRE(set_xattr(m.path("attrs/s"), "user.vault.tag.t" + std::to_string(i), "v").err == 0);
    CHECK(set_xattr(m.path("attrs/s"), "user.vault.tag.sixteenth", "v").err == EINVAL);
    CHECK(shell("setfattr -x user.vault.tag.t1 " + m.path("attrs/s")).err == 0);
    CHECK(get_xattr(m.path("attrs/s"), "user.vault.tag.t1").err == ENODATA);

    // Reading needs get or list; writing needs set.
    CHECK(ok(as(reader, [&] { return get_xattr(m.path("attrs/s"), "user.vault.tag.env"); })) == "prod");
    CHECK(as(reader, [&] { return set_xattr(m.path("attrs/s"), "user.vault.tag.env", "dev"); }).err == EACCES);
    auto r = m.last_audit("xattr_set", reader.uid);
    CHECK(r["decision"] == "deny");
    CHECK(r["attribute"] == "tag.env");
    CHECK(m.last_audit("xattr_get", reader.uid)["result"] == "ok");
}

TEST_CASE("disabled and out-of-window versions refuse to open, audited with the reason", "[fs][lifecycle]")
{
    Mount m;
    REQUIRE(make_dir(m.path("window")).err == 0);
    REQUIRE(write_file(m.path("window/s"), "old").err == 0);
    REQUIRE(write_file(m.path("window/s"), "new").err == 0);

    REQUIRE(set_xattr(m.path("window/s@1"), "user.vault.enabled", "false").err == 0);
    CHECK(read_file(m.path("window/s@1")).err == EACCES);
    CHECK(m.last_audit("get", 0)["reason"] == "disabled");
    CHECK(ok(read_file(m.path("window/s"))) == "new");

    // Disabling the current version: S falls back to the latest enabled one.
    REQUIRE(set_xattr(m.path("window/s"), "user.vault.enabled", "false").err == 0);
    CHECK(read_file(m.path("window/s@2")).err == EACCES);
    CHECK(read_file(m.path("window/s")).err == EACCES);  // both disabled now
    REQUIRE(set_xattr(m.path("window/s@1"), "user.vault.enabled", "true").err == 0);
    CHECK(ok(read_file(m.path("window/s"))) == "old");
    REQUIRE(set_xattr(m.path("window/s@2"), "user.vault.enabled", "true").err == 0);

    REQUIRE(set_xattr(m.path("window/s"), "user.vault.not_before", "2099-01-01T00:00:00Z").err == 0);
    CHECK(read_file(m.path("window/s")).err == EKEYEXPIRED);
    CHECK(m.last_audit("get", 0)["reason"] == "not yet valid");
    CHECK(m.last_audit("get", 0)["result"] == "EKEYEXPIRED");
    REQUIRE(set_xattr(m.path("window/s"), "user.vault.not_before", "").err == 0);
    REQUIRE(set_xattr(m.path("window/s"), "user.vault.expires", "2001-01-01T00:00:00Z").err == 0);
    CHECK(read_file(m.path("window/s")).err == EKEYEXPIRED);
    CHECK(m.last_audit("get", 0)["reason"] == "expired");
    REQUIRE(shell("setfattr -x user.vault.expires " + m.path("window/s")).err == 0);
    CHECK(ok(read_file(m.path("window/s"))) == "new");

    // An older version read by its number keeps its own window, audited alike.
    REQUIRE(set_xattr(m.path("window/s@1"), "user.vault.expires", "2001-01-01T00:00:00Z").err == 0);
    CHECK(read_file(m.path("window/s@1")).err == EKEYEXPIRED);
    auto rec = m.last_audit("get", 0);
    CHECK(rec["reason"] == "expired");
    CHECK(rec["version"] == 1);
    CHECK(rec["result"] == "EKEYEXPIRED");
    REQUIRE(shell("setfattr -x user.vault.expires " + m.path("window/s@1")).err == 0);
    REQUIRE(set_xattr(m.path("window/s@1"), "user.vault.not_before", "2099-01-01T00:00:00Z").err == 0);
    CHECK(read_file(m.path("window/s@1")).err == EKEYEXPIRED);
    rec = m.last_audit("get", 0);
    CHECK(rec["reason"] == "not yet valid");
    CHECK(rec["version"] == 1);
    CHECK(ok(read_file(m.path("window/s"))) == "new");  // S, version 2, is not held back by it
}

TEST_CASE("delete, .deleted, name reuse refused, recover with all versions, purge", "[fs][lifecycle]")
{
    TestUser deleter("d");
    Mount m;
    REQUIRE(make_dir(m.path("life")).err == 0);
    REQUIRE(write_file(m.path("life/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(deleter.uid) +
                                                   " list,delete\n").err == 0);
    REQUIRE(write_file(m.path("life/s"), "v1").err == 0);
    REQUIRE(write_file(m.path("life/s"), "v2").err == 0);
    REQUIRE(set_xattr(m.path("life/s"), "user.vault.tag.team", "blue").err == 0);
    struct stat before{};
    REQUIRE(::stat(m.path("life/s").c_str(), &before) == 0);

    REQUIRE(as(deleter, [&] { return remove_file(m.path("life/s")); }).err == 0);
    CHECK(m.last_audit("delete", deleter.uid)["result"] == "ok");
    CHECK(ok(list_dir(m.path("life"))) == ".certs\n.deleted\n.keys\n.policy\n.versions");
    CHECK(ok(list_dir(m.path("life/.deleted"))) == "s");
    CHECK(ok(list_dir(m.path("life/.versions"))) == "");
    CHECK(read_file(m.path("life/s")).err == ENOENT);
    CHECK(read_file(m.path("life/s@1")).err == ENOENT);
    CHECK(write_file(m.path("life/s"), "reuse").err == EEXIST);
    const std::string deleted = ok(get_xattr(m.path("life/.deleted/s"), "user.vault.deleted"));
    const std::string purge = ok(get_xattr(m.path("life/.deleted/s"), "user.vault.scheduled_purge"));
    CHECK(deleted.size() >= 20);
    CHECK(purge > deleted);
    CHECK(read_file(m.path("life/.deleted/s")).err == EACCES);

    // Recover needs `recover`; then everything is back.
    CHECK(as(deleter, [&] { return rename_path(m.path("life/.deleted/s"), m.path("life/s")); }).err == EACCES);
    CHECK(rename_path(m.path("life/.deleted/s"), m.path("life/other")).err == EPERM);
    REQUIRE(rename_path(m.path("life/.deleted/s"), m.path("life/s")).err == 0);
    CHECK(m.last_audit("recover", 0)["result"] == "ok");
    CHECK(ok(read_file(m.path("life/s"))) == "v2");
    CHECK(ok(read_file(m.path("life/s@1"))) == "v1");
    CHECK(ok(get_xattr(m.path("life/s"), "user.vault.tag.team")) == "blue");
    struct stat after{};
    REQUIRE(::stat(m.path("life/s").c_str(), &after) == 0);
    CHECK(after.st_ino == before.st_ino);

    // Purge needs `purge`, then it is gone for good and the name is free;
    // the new secret is a new inode.
    REQUIRE(remove_file(m.path("life/s")).err == 0);
    CHECK(as(deleter, [&] { return remove_file(m.path("life/.deleted/s")); }).err == EACCES);
    REQUIRE(remove_file(m.path("life/.deleted/s")).err == 0);
    CHECK(m.last_audit("purge", 0)["result"] == "ok");
    CHECK(ok(list_dir(m.path("life/.deleted"))) == "");
    REQUIRE(write_file(m.path("life/s"), "fresh").err == 0);
    struct stat fresh{};
    REQUIRE(::stat(m.path("life/s").c_str(), &fresh) == 0);
    CHECK(fresh.st_ino != before.st_ino);
    CHECK(ok(list_dir(m.path("life/.versions"))) == "s@1");
    // Versions are not removed one by one.
    CHECK(remove_file(m.path("life/s@1")).err == EPERM);
    CHECK(remove_file(m.path("life/.policy")).err == EPERM);
    m.stop();
    // Purged data is gone from the database file (secure_delete).
    CHECK(shell("sqlite3 " + m.state_file("vault.db") + " \"SELECT count(*) FROM versions\"").data == "1\n");
}

TEST_CASE("a secret deleted while a writer holds it open: the close fails, nothing appears after recover",
          "[fs][lifecycle]")
{
    Mount m;
    REQUIRE(make_dir(m.path("gone")).err == 0);
    REQUIRE(write_file(m.path("gone/s"), "v1").err == 0);
    int fd = -1;
    Paused writer(
        nullptr,
        [&] {
            fd = ::open(m.path("gone/s").c_str(), O_WRONLY | O_TRUNC);
            if (fd < 0 || ::write(fd, "late", 4) != 4)
                return Outcome{errno, "write"};
            return Outcome{};
        },
        [&] { return Outcome{::close(fd) == 0 ? 0 : errno, {}}; });
    REQUIRE(writer.first().err == 0);
    REQUIRE(remove_file(m.path("gone/s")).err == 0);
    auto close = m.records_of([&] { CHECK(writer.finish().err == ENOENT); });
    REQUIRE(close.size() == 1);
    CHECK(close.front()["op"] == "commit");
    CHECK(close.front()["result"] == "ENOENT");
    REQUIRE(rename_path(m.path("gone/.deleted/s"), m.path("gone/s")).err == 0);
    CHECK(ok(list_dir(m.path("gone/.versions"))) == "s@1");
    CHECK(ok(read_file(m.path("gone/s"))) == "v1");
}

TEST_CASE("purge protection refuses purge until retention ends; the automatic purge then takes it", "[fs][lifecycle]")
{
    // Days of 200 ms: a 7-day retention ends after 1.4 s.
    Mount m(MountOptions{{"retention_day_ms = 200", "purge_interval_seconds = 1"}});
    REQUIRE(make_dir(m.path("guarded")).err == 0);
    REQUIRE(set_xattr(m.path("guarded"), "user.vault.retention_days", "7").err == 0);
    REQUIRE(set_xattr(m.path("guarded"), "user.vault.purge_protection", "true").err == 0);
    CHECK(set_xattr(m.path("guarded"), "user.vault.purge_protection", "false").err == EPERM);
    CHECK(set_xattr(m.path("guarded"), "user.vault.retention_days", "6").err == EINVAL);
    CHECK(ok(get_xattr(m.path("guarded"), "user.vault.purge_protection")) == "true");
    REQUIRE(write_file(m.path("guarded/s"), "protected").err == 0);
    REQUIRE(remove_file(m.path("guarded/s")).err == 0);
    CHECK(remove_file(m.path("guarded/.deleted/s")).err == EPERM);
    CHECK(m.last_audit("purge", 0)["reason"] == "purge protection");

    // The background task purges it once the retention has passed.
    bool gone = false;
    for (int i = 0; i < 100 && !gone; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        gone = list_dir(m.path("guarded/.deleted")).data.empty();
    }
    CHECK(gone);
    auto r = m.last_audit("purge");
    CHECK(r["reason"] == "automatic purge");
    CHECK(r["secret"] == "s");
    CHECK(write_file(m.path("guarded/s"), "again").err == 0);
}

TEST_CASE("backup and restore: ciphertext only, same token only, no overwrite", "[fs][lifecycle][token]")
{
    Mount m;
    const std::string canary = "CANARY-" + random_hex(12);
    REQUIRE(make_dir(m.path("source")).err == 0);
    REQUIRE(write_file(m.path("source/a"), canary + "-1").err == 0);
    REQUIRE(write_file(m.path("source/a"), canary + "-2").err == 0);
    REQUIRE(set_xattr(m.path("source/a"), "user.vault.tag.k", "v").err == 0);
    REQUIRE(write_file(m.path("source/b"), "bee").err == 0);
    const std::string cli = m.binary + " --state " + m.state;
    const std::string file = m.root + "/source.backup";

    auto r = shell(m.binary + " backup source -o " + file + " --state " + m.state);
    INFO(r.data);
    REQUIRE(r.err == 0);
    const std::string doc = slurp(file);
    CHECK(doc.find(canary) == std::string::npos);
    CHECK(doc.find("vaultfs-backup/1") != std::string::npos);
    CHECK(m.last_audit("backup", 0)["result"] == "ok");

    REQUIRE(make_dir(m.path("copy")).err == 0);
    r = shell(m.binary + " restore " + file + " --into copy --state " + m.state);
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK(r.data == "restored a\nrestored b\n");
    CHECK(ok(read_file(m.path("copy/a"))) == canary + "-2");
    CHECK(ok(read_file(m.path("copy/a@1"))) == canary + "-1");
    CHECK(ok(read_file(m.path("copy/b"))) == "bee");
    CHECK(ok(get_xattr(m.path("copy/a"), "user.vault.tag.k")) == "v");
    CHECK(m.last_audit("restore", 0)["result"] == "ok");

    // No overwrite: the whole restore is refused, nothing changes.
    r = shell(m.binary + " restore " + file + " --into copy --state " + m.state + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data.find("overwrites nothing") != std::string::npos);
    // A single secret, into its own vault after a purge.
    REQUIRE(shell(m.binary + " backup source/b -o " + m.root + "/b.backup --state " + m.state).err == 0);
    REQUIRE(remove_file(m.path("source/b")).err == 0);
    r = shell(m.binary + " restore " + m.root + "/b.backup --state " + m.state + " 2>&1");
    CHECK(r.data.find("overwrites nothing") != std::string::npos);  // soft-deleted still holds the name
    REQUIRE(remove_file(m.path("source/.deleted/b")).err == 0);
    REQUIRE(shell(m.binary + " restore " + m.root + "/b.backup --state " + m.state).err == 0);
    CHECK(ok(read_file(m.path("source/b"))) == "bee");

    // An altered backup is refused.
    std::string altered = doc;
    altered[altered.find("\"size\":") + 7] = '9';
    std::ofstream(m.root + "/altered.backup") << altered;
    REQUIRE(make_dir(m.path("copy-two")).err == 0);
    r = shell(m.binary + " restore " + m.root + "/altered.backup --into copy-two --state " + m.state + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data.find("signature does not verify") != std::string::npos);

    // Another state (another token) cannot restore it.
    Mount elsewhere(MountOptions{.embedded_token = true});
    REQUIRE(make_dir(elsewhere.path("source")).err == 0);
    r = shell(elsewhere.binary + " restore " + file + " --state " + elsewhere.state + " 2>&1");
    CHECK(r.err == 1);
    CHECK(r.data.find("is not in this token") != std::string::npos);
    CHECK(ok(list_dir(elsewhere.path("source"))) == ".certs\n.deleted\n.keys\n.policy\n.versions");
}

TEST_CASE("the control socket serves admins only, and audits everyone", "[fs][lifecycle]")
{
    TestUser outsider("x");
    Mount m(MountOptions{{"control_socket = " + std::string("../control.sock")}});
    const std::string socket = m.root + "/control.sock";
    const auto status = shell(m.binary + " status --json --socket " + socket);
    INFO(status.data);
    REQUIRE(status.err == 0);
    auto j = nlohmann::json::parse(status.data);  // not const: a missing key reads as null, failing the check
    CHECK(j["mounted"] == true);
    CHECK(j["token"] == "ok");
    CHECK(j["audit"] == "ok");
    CHECK(j.contains("dek_cache"));
    CHECK(m.last_audit("status", 0)["result"] == "ok");

    const auto refused = as(outsider, [&] {
        return shell(m.binary + " status --socket " + socket + " 2>&1");
    });
    CHECK(refused.err == 3);  // no verdict for it: unknown, as a monitoring check reads it
    CHECK(refused.data.find("EACCES") != std::string::npos);
    auto r = m.last_audit("control", outsider.uid);
    CHECK(r["decision"] == "deny");
    CHECK(r["result"] == "EACCES");

    CHECK(shell(m.binary + " vault create made-by-cli --retention-days 30 --socket " + socket).err == 0);
    CHECK(ok(get_xattr(m.path("made-by-cli"), "user.vault.retention_days")) == "30");
    CHECK(shell(m.binary + " vault list --socket " + socket).data.find("made-by-cli\n") != std::string::npos);
    CHECK(m.last_audit("vault_list", 0)["result"] == "ok");
    CHECK(shell(m.binary + " vault create x --socket " + socket + " 2>/dev/null").err == 1);
}

TEST_CASE("restore into another vault needs restore in the backup's own vault", "[fs][lifecycle]")
{
    TestGroup admins("adm");
    TestUser ann("n", {&admins});
    Mount m(MountOptions{{"admin_group = " + admins.name, "control_socket = ../control.sock"}});
    const std::string socket = m.root + "/control.sock";
    REQUIRE(make_dir(m.path("roots-vault")).err == 0);
    REQUIRE(write_file(m.path("roots-vault/s"), "root's secret").err == 0);
    const std::string file = m.root + "/roots.backup";
    REQUIRE(shell(m.binary + " backup roots-vault -o " + file + " --socket " + socket).err == 0);
    REQUIRE(::chmod(file.c_str(), 0644) == 0);
    // An admin makes a vault of her own (she owns it) and tries to restore
    // root's backup there, to read it.
    REQUIRE(as(ann, [&] { return make_dir(m.path("anns-vault")); }).err == 0);
    const auto r = as(ann, [&] {
        return shell(m.binary + " restore " + file + " --into anns-vault --socket " + socket + " 2>&1");
    });
    CHECK(r.err == 1);
    CHECK(r.data.find("needs `restore` in roots-vault") != std::string::npos);
    CHECK(ok(as(ann, [&] { return list_dir(m.path("anns-vault")); })) == ".certs\n.deleted\n.keys\n.policy\n.versions");
    CHECK(m.last_audit("restore", ann.uid)["result"] == "EACCES");
}
