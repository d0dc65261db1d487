// Integration: access policies checked on every open, as real users.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

// Checks the last audit record of `op` by `user`.
void audited(const Mount& m, const std::string& op, uid_t uid, const std::string& decision, const std::string& result,
             const std::string& secret = "")
{
    auto r = m.last_audit(op, uid);
    INFO(r.dump());
    CHECK(r["decision"] == decision);
    CHECK(r["result"] == result);
    if (!secret.empty())
        CHECK(r["secret"] == secret);
}

// What a rootless container runtime does for its first process: new user,
// mount and pid namespaces, in which this unprivileged caller is root (uid
// and gid 0 mapped to its own ids outside), `source` bound at `target` as
// the container's config directory, and `action` run as pid 1 of the new
// pid namespace. Returns the action's outcome, or the errno of the step that
// failed with that step's name as data.
Outcome in_rootless_container(const std::string& source, const std::string& target,
                              const std::function<Outcome()>& action)
{
    const std::string uid_map = "0 " + std::to_string(::getuid()) + " 1\n";
    const std::string gid_map = "0 " + std::to_string(::getgid()) + " 1\n";
    // A process that changed its uids is not dumpable, and its /proc files
    // (the id maps among them) then belong to root; an exec'd runtime is.
    if (::prctl(PR_SET_DUMPABLE, 1) != 0 || ::unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID) != 0)
        return {errno, "unshare"};
    for (const auto& [file, text] : std::vector<std::pair<std::string, std::string>>{
             {"setgroups", "deny"}, {"uid_map", uid_map}, {"gid_map", gid_map}})
        if (const auto w = write_file("/proc/self/" + file, text, O_WRONLY); w.err != 0)
            return {w.err, file};
    if (::mount(source.c_str(), target.c_str(), nullptr, MS_BIND, nullptr) != 0)
        return {errno, "bind mount"};
    return as_root(action);  // the first child of a new pid namespace is its pid 1
}

// A one-line summary of what a caller managed to do through a config
// directory: each step's errno (0 = done) or, for reads, the value.
std::string try_config_dir(const std::string& dir)
{
    const auto show = [](const Outcome& o) { return o.err == 0 ? o.data : "errno " + std::to_string(o.err); };
    std::string line = "uid " + std::to_string(::getuid()) + "; ls: " + show(list_dir(dir));
    line += "; db-password: " + show(read_file(dir + "/db-password"));
    line += "; api-key: " + show(read_file(dir + "/api-key"));
    line += "; write: " + show(write_file(dir + "/db-password", "overwritten"));
    return line;
}

}  // namespace

TEST_CASE("policies decide every open, for users and groups", "[fs][policy][token]")
{
    TestGroup devs("g");
    TestUser alice("a"), bob("b"), carol("c", {&devs}), dave("d"), erin("e"), frank("f"), grace("g", {&devs}),
        henry("h");
    Mount m;
    REQUIRE(make_dir(m.path("team")).err == 0);
    REQUIRE(write_file(m.path("team/db-pass"), "db-value").err == 0);
    REQUIRE(write_file(m.path("team/app-key"), "app-value").err == 0);
    const std::string policy = "allow uid:0 *\n"
                               "allow user:" + alice.name + " get,list\n"
                               "allow user:" + bob.name + " list\n"
                               "allow group:" + devs.name + " get,list\n"
                               "deny user:" + grace.name + " get\n"
                               "allow user:" + dave.name + " get db-*\n"
                               "allow user:" + erin.name + " set\n"
                               "allow user:" + frank.name + " list\n"
                               "allow user:" + henry.name + " get,list\n"
                               "deny user:" + henry.name + " get app-*\n";
    REQUIRE(write_file(m.path("team/.policy"), policy).err == 0);
    // Names were resolved to ids when written.
    const std::string stored = ok(read_file(m.path("team/.policy")));
    CHECK(stored.find("allow uid:" + std::to_string(alice.uid) + " get,list\n") != std::string::npos);
    CHECK(stored.find("allow gid:" + std::to_string(devs.gid) + " get,list\n") != std::string::npos);

    SECTION("an allowed read")
    {
        CHECK(ok(as(alice, [&] { return read_file(m.path("team/db-pass")); })) == "db-value");
        audited(m, "get", alice.uid, "allow", "ok", "db-pass");
        CHECK(m.last_audit("get", alice.uid)["rule"] == "2: allow uid:" + std::to_string(alice.uid) + " get,list");
    }
    SECTION("a denied read is EACCES and audited")
    {
        CHECK(as(bob, [&] { return read_file(m.path("team/db-pass")); }).err == EACCES);
        audited(m, "get", bob.uid, "deny", "EACCES", "db-pass");
        CHECK(m.last_audit("get", bob.uid)["rule"] == "default-deny");
    }
    SECTION("a group grant")
    {
        CHECK(ok(as(carol, [&] { return read_file(m.path("team/app-key")); })) == "app-value");
        audited(m, "get", carol.uid, "allow", "ok");
    }
    SECTION("deny wins over a group allow")
    {
        CHECK(as(grace, [&] { return read_file(m.path("team/app-key")); }).err == EACCES);
        auto r = m.last_audit("get", grace.uid);
        CHECK(r["decision"] == "deny");
        CHECK(r["rule"] == "5: deny uid:" + std::to_string(grace.uid) + " get");
    }
    SECTION("a glob-scoped grant")
    {
        CHECK(ok(as(dave, [&] { return read_file(m.path("team/db-pass")); })) == "db-value");
        CHECK(as(dave, [&] { return read_file(m.path("team/app-key")); }).err == EACCES);
        // A glob grant gives no vault-wide permission such as list.
        CHECK(as(dave, [&] { return list_dir(m.path("team")); }).err == EACCES);
    }
    SECTION("set without get")
    {
        CHECK(as(erin, [&] { return write_file(m.path("team/new-secret"), "from erin"); }).err == 0);
        audited(m, "commit", erin.uid, "allow", "ok", "new-secret");
        CHECK(as(erin, [&] { return read_file(m.path("team/new-secret")); }).err == EACCES);
        CHECK(ok(read_file(m.path("team/new-secret"))) == "from erin");
        // The mode is the secret's own (root's 0400), whoever asks; access()
        // says what the caller may do: write, not read.
        CHECK(ok(as(erin, [&] { return Outcome{0, shell("stat -c '%a %U' " + m.path("team/db-pass")).data}; })) ==
              "400 root\n");
        CHECK(as(erin, [&] { return Outcome{::access(m.path("team/db-pass").c_str(), W_OK) == 0 ? 0 : errno, {}}; })
                  .err == 0);
        CHECK(as(erin, [&] { return Outcome{::access(m.path("team/db-pass").c_str(), R_OK) == 0 ? 0 : errno, {}}; })
                  .err == EACCES);
    }
    SECTION("list without get: ls works, cat is denied")
    {
        CHECK(ok(as(frank, [&] { return list_dir(m.path("team")); })) == ".certs\n.deleted\n.keys\n.policy\n.versions\napp-key\ndb-pass");
        audited(m, "list", frank.uid, "allow", "ok");
        CHECK(as(frank, [&] { return read_file(m.path("team/db-pass")); }).err == EACCES);
        CHECK(as(alice, [&] { return write_file(m.path("team/db-pass"), "x"); }).err == EACCES);
    }
    SECTION("an old version is refused to a caller without get: list-only, glob-scoped, denied, glob-denied")
    {
        REQUIRE(write_file(m.path("team/db-pass"), "db-value-2").err == 0);
        REQUIRE(write_file(m.path("team/app-key"), "app-value-2").err == 0);
        const auto refused = [&](const TestUser& who, const std::string& name) {
            INFO(who.name << " " << name);
            const auto records = m.records_of([&] { CHECK(as(who, [&] { return read_file(m.path("team/" + name)); }).err == EACCES); });
            REQUIRE(records.size() == 1);
            auto r = records.front();
            CHECK(r["op"] == "get");
            CHECK(r["uid"] == who.uid);
            CHECK(r["decision"] == "deny");
            CHECK(r["result"] == "EACCES");
            CHECK(r["version"] == 1);
            CHECK(r["secret"] == name.substr(0, name.find('@')));
        };
        refused(frank, "db-pass@1");  // list only
        refused(dave, "app-key@1");   // get on db-* only
        refused(grace, "app-key@1");  // get denied outright
        refused(henry, "app-key@1");  // get, but denied on app-* by a glob
        // Those with get read the old version.
        CHECK(ok(as(alice, [&] { return read_file(m.path("team/db-pass@1")); })) == "db-value");
        CHECK(ok(as(dave, [&] { return read_file(m.path("team/db-pass@1")); })) == "db-value");
        CHECK(ok(as(henry, [&] { return read_file(m.path("team/db-pass@1")); })) == "db-value");
    }
    SECTION("a policy edit without manage is denied")
    {
        CHECK(as(alice, [&] { return write_file(m.path("team/.policy"), "allow any *\n"); }).err == EACCES);
        audited(m, "policy_set", alice.uid, "deny", "EACCES");
        CHECK(as(alice, [&] { return read_file(m.path("team/.policy")); }).err == EACCES);
        audited(m, "policy_get", alice.uid, "deny", "EACCES");
        CHECK(ok(read_file(m.path("team/.policy"))) == stored);
    }
    SECTION("an invalid policy fails with EINVAL -- a bad line at its write, a bad whole at close -- and leaves the "
            "old one in force")
    {
        for (const auto& [bad, when] : std::vector<std::pair<std::string, std::string>>{
                 {"allow uid:0 get,list,set\n", "close"} /* no one could manage it again */,
                 {"allow uid:0 *\ndeny any manage\n", "close"} /* nor here */,
                 {"allow uid:0 *\nallow nobody-here get\n", "write"},
                 {"allow user:no-such-user-xyz get\n", "write"},
                 {"allow uid:0 fly\n", "write"}}) {
            INFO(bad);
            const auto w = write_file(m.path("team/.policy"), bad);
            CHECK(w.err == EINVAL);
            CHECK(w.data == when);
            CHECK(ok(read_file(m.path("team/.policy"))) == stored);
        }
        auto r = m.last_audit("policy_set", 0);
        CHECK(r["result"] == "EINVAL");
        CHECK(r["reason"].get<std::string>().find("line 1") != std::string::npos);
        CHECK(ok(as(alice, [&] { return read_file(m.path("team/db-pass")); })) == "db-value");
    }
    SECTION("a revocation takes effect at the next open")
    {
        // Alice holds a descriptor open across the change: she keeps what she
        // opened, and her next open is refused.
        int opened[2], changed[2];
        REQUIRE(::pipe(opened) == 0);
        REQUIRE(::pipe(changed) == 0);
        Outcome o;
        std::thread reader([&] {
            o = as(alice, [&] {
                const int fd = ::open(m.path("team/db-pass").c_str(), O_RDONLY);
                char c = 'o';
                (void)!::write(opened[1], &c, 1);
                (void)!::read(changed[0], &c, 1);
                if (fd < 0)
                    return Outcome{errno, "first open"};
                char buf[64];
                const ssize_t n = ::read(fd, buf, sizeof buf);
                ::close(fd);
                const auto again = read_file(m.path("team/db-pass"));
                return Outcome{again.err, std::string(buf, static_cast<std::size_t>(std::max<ssize_t>(n, 0)))};
            });
        });
        // Nothing may throw while the reader runs: a REQUIRE here would
        // leave its thread joinable (std::terminate) and its child waiting.
        char c = 'o';
        const bool reader_opened = ::read(opened[0], &c, 1) == 1;
        const auto w = write_file(m.path("team/.policy"), "allow uid:0 *\n");
        const bool released = ::write(changed[1], &c, 1) == 1;
        reader.join();
        for (const int fd : {opened[0], opened[1], changed[0], changed[1]})
            ::close(fd);
        REQUIRE(reader_opened);
        REQUIRE(released);
        REQUIRE(w.err == 0);
        CHECK(o.data == "db-value");
        CHECK(o.err == ENOENT);  // the vault is now hidden from her: nothing left to open
        CHECK(as(alice, [&] { return stat_path(m.path("team")); }).err == ENOENT);
    }
    SECTION("vaults are hidden from callers who hold nothing in them")
    {
        TestUser stranger("s");
        CHECK(ok(as(stranger, [&] { return list_dir(m.path()); })) == "");
        CHECK(as(stranger, [&] { return stat_path(m.path("team")); }).err == ENOENT);
        CHECK(as(stranger, [&] { return read_file(m.path("team/db-pass")); }).err == ENOENT);
        CHECK(ok(as(alice, [&] { return list_dir(m.path()); })) == "team");
    }
    SECTION("uid 0 has no data access beyond what a policy grants")
    {
        REQUIRE(write_file(m.path("team/.policy"), "allow user:" + alice.name + " *\n").err == 0);
        CHECK(read_file(m.path("team/db-pass")).err == EACCES);
        CHECK(write_file(m.path("team/db-pass"), "x").err == EACCES);
        CHECK(read_file(m.path("team/.policy")).err == EACCES);
        CHECK(ok(list_dir(m.path())) == "team");  // an admin still sees the vault
        CHECK(ok(as(alice, [&] { return read_file(m.path("team/db-pass")); })) == "db-value");
    }
}

TEST_CASE("members of the admin group create vaults and own them", "[fs][policy]")
{
    TestGroup admins("adm");
    TestUser ann("n", {&admins}), other("o");
    Mount m(MountOptions{{"admin_group = " + admins.name}});
    CHECK(as(other, [&] { return make_dir(m.path("not-yours")); }).err == EACCES);
    audited(m, "vault_create", other.uid, "deny", "EACCES");
    REQUIRE(as(ann, [&] { return make_dir(m.path("anns-vault")); }).err == 0);
    audited(m, "vault_create", ann.uid, "allow", "ok");
    CHECK(ok(as(ann, [&] { return read_file(m.path("anns-vault/.policy")); })) ==
          "allow uid:" + std::to_string(ann.uid) + " *\n");
    CHECK(as(ann, [&] { return write_file(m.path("anns-vault/s"), "v"); }).err == 0);
    CHECK(read_file(m.path("anns-vault/s")).err == EACCES);  // root is not in this vault's policy
    CHECK(as(ann, [&] { return remove_dir(m.path("anns-vault")); }).err == ENOTEMPTY);
}

namespace {

// A vault bound as a container's config directory: the service may list it
// and read db-password, not read api-key, not write.
struct ConfigVault {
    ConfigVault()
    {
        REQUIRE(make_dir(m.path("app")).err == 0);
        REQUIRE(write_file(m.path("app/db-password"), "pw").err == 0);
        REQUIRE(write_file(m.path("app/api-key"), "key").err == 0);
        REQUIRE(write_file(m.path("app/.policy"),
                           "allow uid:0 *\nallow user:" + svc.name + " list\nallow user:" + svc.name + " get db-*\n")
                    .err == 0);
        REQUIRE(::mkdir(config.c_str(), 0755) == 0);
    }
    // Nothing was written through the binding, and none is left on the host.
    void check_untouched()
    {
        CHECK(ok(read_file(m.path("app/db-password"))) == "pw");
        CHECK(ok(list_dir(m.path("app/.versions"))) == "api-key@1\ndb-password@1");
        CHECK(ok(list_dir(config)) == "");
    }
    ~ConfigVault() { ::rmdir(config.c_str()); }

    TestUser svc{"s"};
    Mount m;
    const std::string config = m.root + "/config";  // the container's /config
    const std::string allowed = "; ls: .certs\n.deleted\n.keys\n.policy\n.versions\napi-key\ndb-password; db-password: pw; "
                                "api-key: errno " + std::to_string(EACCES) + "; write: errno " +
                                std::to_string(EACCES);
};

}  // namespace

TEST_CASE("a container bind-mounts a vault as its config directory: bound by root, read by the service's uid",
          "[fs][policy][container]")
{
    ConfigVault c;
    const auto o = as_root([&] {
        if (::unshare(CLONE_NEWNS) != 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
            ::mount(c.m.path("app").c_str(), c.config.c_str(), nullptr, MS_BIND, nullptr) != 0)
            return Outcome{errno, "bind"};
        return as(c.svc, [&] { return Outcome{0, try_config_dir(c.config)}; });
    });
    CHECK(ok(o) == "uid " + std::to_string(c.svc.uid) + c.allowed);
    c.check_untouched();
}

// unshare(CLONE_NEWUSER) needs a single-threaded process: not under TSan.
TEST_CASE("a rootless container binds a vault itself: its root is the outer user, not root",
          "[fs][policy][container]" VAULTFS_SINGLE_THREADED_ONLY)
{
    ConfigVault c;
    const auto o = as(c.svc, [&] {
        return in_rootless_container(c.m.path("app"), c.config, [&] {
            char self[32] = {};
            // The host's /proc names this process by its pid outside.
            (void)!::readlink("/proc/self", self, sizeof self - 1);
            return Outcome{0, "pid " + std::to_string(::getpid()) + " (" + self + ") " + try_config_dir(c.config)};
        });
    });
    const std::string out = ok(o);
    const auto open_paren = out.find('('), close_paren = out.find(')');
    REQUIRE(open_paren != std::string::npos);
    REQUIRE(close_paren != std::string::npos);
    const std::string host_pid = out.substr(open_paren + 1, close_paren - open_paren - 1);
    CHECK(out.substr(0, open_paren) == "pid 1 ");
    CHECK(out.substr(close_paren + 2) == "uid 0" + c.allowed);
    // The daemon saw, and audited, the outer uid and the host pid.
    auto denied = c.m.last_audit("get", c.svc.uid);
    INFO(denied.dump());
    CHECK(denied["secret"] == "api-key");
    CHECK(denied["decision"] == "deny");
    CHECK(denied["result"] == "EACCES");
    CHECK(std::to_string(denied.value("pid", 0L)) == host_pid);
    CHECK(c.m.last_audit("set", c.svc.uid)["result"] == "EACCES");
    c.check_untouched();
}
