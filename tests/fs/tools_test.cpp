// The tools admins use on configuration files, run for real against a
// mount: each must exit 0 and leave exactly one new version of its target
// with the new content -- no stray names, nothing in .deleted, no extra
// versions (docs/filesystem.md "Admin tools").
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

// A vault `cfg` holding one secret, `app-conf`, at version 1.
struct ToolVault {
    ToolVault() : m(MountOptions{{"staging_idle_seconds = 2"}})
    {
        REQUIRE(make_dir(m.path("cfg")).err == 0);
        REQUIRE(write_file(m.path("cfg/app-conf"), "a=1\n").err == 0);
        src = m.root + "/src";
        REQUIRE(::mkdir(src.c_str(), 0755) == 0);
    }
    std::string path(const std::string& rel = "") const { return m.path("cfg" + (rel.empty() ? "" : "/" + rel)); }
    // A file outside the mount to copy from.
    std::string source(const std::string& name, const std::string& content) const
    {
        const std::string p = src + "/" + name;
        std::ofstream(p) << content;
        return p;
    }
    Mount m;
    std::string src;
};

// Exactly one new version of `name` (`version`) holding `content`, and
// nothing else in the vault but `others` (sorted, '\n'-joined names).
void replaced(const ToolVault& v, const std::string& name, const std::string& content, int version = 2,
              const std::string& others = "")
{
    CHECK(ok(read_file(v.path(name))) == content);
    std::string names = ".certs\n.deleted\n.keys\n.policy\n.versions\n" + name;
    std::vector<std::string> each;
    for (int i = 1; i <= version; ++i)
        each.push_back(name + "@" + std::to_string(i));
    std::sort(each.begin(), each.end());  // as a listing comes back, sorted by name
    std::string versions;
    for (const auto& e : each)
        versions += (versions.empty() ? "" : "\n") + e;
    if (!others.empty()) {
        names = ".certs\n.deleted\n.keys\n.policy\n.versions\n" + others;
        versions = ok(list_dir(v.path(".versions")));  // others' versions are the caller's to check
    }
    CHECK(ok(list_dir(v.path())) == names);
    if (others.empty())
        CHECK(ok(list_dir(v.path(".versions"))) == versions);
    CHECK(ok(list_dir(v.path(".deleted"))).empty());
}

std::string mode_of(const std::string& path)
{
    return shell("stat -c '%a %u:%g' " + path).data;
}

}  // namespace

TEST_CASE("sed -i: its temporary file becomes the next version, one rename record", "[fs][tools]")
{
    ToolVault v;
    const auto r = shell("sed -i s/a/b/ " + v.path("app-conf") + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    replaced(v, "app-conf", "b=1\n");
    auto rec = v.m.last_audit("rename", 0);
    CHECK(rec["secret"] == "app-conf");
    CHECK(rec["version"] == 2);
    CHECK(rec["result"] == "ok");
    CHECK(rec.value("from", "").rfind("sed", 0) == 0);
    CHECK(v.m.verify().err == 0);
}

TEST_CASE("rsync and rsync --inplace", "[fs][tools]")
{
    ToolVault v;
    SECTION("rsync: a staged .app-conf.XXXXXX renamed onto the target")
    {
        const auto r = shell("rsync " + v.source("app-conf", "from rsync\n") + " " + v.path() + "/ 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "from rsync\n");
        auto rec = v.m.last_audit("commit", 0);
        CHECK(rec["version"] == 2);
        CHECK(rec.value("from", "").rfind(".app-conf.", 0) == 0);
        // Without -p rsync gives its temporary file the target's mode: kept.
        CHECK(mode_of(v.path("app-conf")) == "400 0:0\n");
    }
    SECTION("rsync -p: the source's mode comes along (root manages this vault)")
    {
        const std::string src = v.source("app-conf", "with perms\n");
        REQUIRE(::chmod(src.c_str(), 0640) == 0);
        const auto r = shell("rsync -p " + src + " " + v.path() + "/ 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "with perms\n");
        CHECK(mode_of(v.path("app-conf")) == "640 0:0\n");
    }
    SECTION("rsync --inplace: written over the target, truncated to its length")
    {
        const auto r = shell("rsync --inplace " + v.source("app-conf", "in place\n") + " " + v.path() + "/ 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "in place\n");
    }
}

TEST_CASE("install -m: over an existing secret (it unlinks first) and to a new name", "[fs][tools]")
{
    ToolVault v;
    const auto r = shell("install -m 0440 " + v.source("app-conf", "installed\n") + " " + v.path("app-conf") + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    replaced(v, "app-conf", "installed\n");
    CHECK(mode_of(v.path("app-conf")) == "440 0:0\n");
    // The removal and the making again are both on the record.
    const auto all = v.m.audit();
    bool deleted = false, recovered = false;
    for (const auto& rec : all) {
        deleted = deleted || (rec.value("op", "") == "delete" && rec.value("secret", "") == "app-conf");
        recovered = recovered || (rec.value("op", "") == "recover" && rec.value("result", "") == "ok");
    }
    CHECK(deleted);
    CHECK(recovered);

    const auto fresh = shell("install -m 0400 " + v.source("new-one", "brand new\n") + " " + v.path("new-one") + " 2>&1");
    INFO(fresh.data);
    CHECK(fresh.err == 0);
    CHECK(ok(read_file(v.path("new-one"))) == "brand new\n");
    CHECK(ok(list_dir(v.path(".versions"))) == "app-conf@1\napp-conf@2\nnew-one@1");
    CHECK(ok(list_dir(v.path(".deleted"))).empty());
}

TEST_CASE("cp -a: the owner and mode it sets are the secret's; times are accepted", "[fs][tools]")
{
    ToolVault v;
    const std::string src = v.source("app-conf", "copied\n");
    REQUIRE(::chown(src.c_str(), 1234, 1234) == 0);
    REQUIRE(::chmod(src.c_str(), 0640) == 0);
    REQUIRE(shell("touch -d 2020-01-01 " + src).err == 0);
    SECTION("over an existing secret")
    {
        const auto r = shell("cp -a " + src + " " + v.path("app-conf") + " 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "copied\n");
        CHECK(mode_of(v.path("app-conf")) == "640 1234:1234\n");
        CHECK(v.m.last_audit("chown", 0)["attribute"] == "owner 1234:1234");
        CHECK(v.m.last_audit("chmod", 0)["attribute"] == "mode 0640");
    }
    SECTION("to a new name: owner and mode set before its first version commits")
    {
        const auto r = shell("cp -a " + src + " " + v.path("copy") + " 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        CHECK(ok(read_file(v.path("copy"))) == "copied\n");
        CHECK(mode_of(v.path("copy")) == "640 1234:1234\n");
        CHECK(ok(list_dir(v.path(".versions"))) == "app-conf@1\ncopy@1");
        // And again: same owner and mode, nothing to change.
        const std::size_t before = v.m.audit_count();
        CHECK(shell("cp -a " + src + " " + v.path("copy")).err == 0);
        for (const auto& rec : v.m.audit())
            if (rec.value("seq", 0) > static_cast<int>(before))
                CHECK(rec.value("op", "") != "chmod");
    }
}

TEST_CASE("mktemp -p, a write, mv: the temporary file is private until it lands", "[fs][tools]")
{
    ToolVault v;
    TestUser other("o");
    REQUIRE(write_file(v.path(".policy"), "allow uid:0 *\nallow uid:" + std::to_string(other.uid) + " get,list\n").err ==
            0);
    const auto t = shell("mktemp -p " + v.path());
    REQUIRE(t.err == 0);
    const std::string tmp = t.data.substr(0, t.data.find('\n'));
    const std::string base = tmp.substr(tmp.rfind('/') + 1);
    CHECK(base.rfind("tmp.", 0) == 0);
    REQUIRE(shell("printf 'from mktemp\\n' > " + tmp).err == 0);
    // Only its creator sees it, and it is no secret.
    CHECK(ok(list_dir(v.path())) == ".certs\n.deleted\n.keys\n.policy\n.versions\napp-conf\n" + base);
    CHECK(ok(as(other, [&] { return list_dir(v.path()); })) == ".certs\n.deleted\n.keys\n.policy\n.versions\napp-conf");
    CHECK(as(other, [&] { return read_file(tmp); }).err == ENOENT);
    CHECK(ok(list_dir(v.path(".versions"))) == "app-conf@1");
    const auto r = shell("mv " + tmp + " " + v.path("app-conf") + " 2>&1");
    INFO(r.data);
    CHECK(r.err == 0);
    replaced(v, "app-conf", "from mktemp\n");
    CHECK(v.m.last_audit("commit", 0)["from"] == base);
}

TEST_CASE("editors that save by rename: vim (backupcopy=no and auto) and emacs", "[fs][tools]")
{
    ToolVault v;
    // Both refuse to save a file whose mode has no write bit (root's 0400
    // default) without being forced, as they would anywhere.
    REQUIRE(::chmod(v.path("app-conf").c_str(), 0600) == 0);
    // Tests mount under /tmp, where both skip backups by default; a vault
    // under /srv would get them, so the tests ask for them.
    SECTION("vim, backupcopy=no: renames the file to app-conf~, writes a new one, removes the backup")
    {
        const auto r = shell("vim -Nu NONE -i NONE -es -c 'set backupskip= backupcopy=no' -c '%s/a/b/' -c wq " +
                             v.path("app-conf") + " 2>&1 </dev/null");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "b=1\n");
        CHECK(mode_of(v.path("app-conf")) == "600 0:0\n");
    }
    SECTION("vim, backupcopy=auto: its 4913 probe file leaves nothing behind")
    {
        const auto r = shell("vim -Nu NONE -i NONE -es -c 'set backupskip=' -c '%s/a/c/' -c wq " +
                             v.path("app-conf") + " 2>&1 </dev/null");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "c=1\n");
    }
    SECTION("emacs: lock symlink .#app-conf, backup app-conf~, a new file")
    {
        const auto r = shell("emacs -Q --batch --eval '(setq backup-enable-predicate (lambda (_) t))' " +
                             v.path("app-conf") +
                             " --eval '(progn (goto-char (point-min)) (while (search-forward \"a=\" nil t) "
                             "(replace-match \"e=\")) (save-buffer))' 2>&1 </dev/null");
        INFO(r.data);
        CHECK(r.err == 0);
        CHECK(r.data.find("Cannot") == std::string::npos);  // no lock or backup complaint
        // The backup goes moments after emacs saved: the vault keeps app-conf@1.
        for (int i = 0; i < 50 && ok(list_dir(v.path())).find("app-conf~") != std::string::npos; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        replaced(v, "app-conf", "e=1\n");
    }
}

TEST_CASE("ansible-style atomic replace and Python tempfile names", "[fs][tools]")
{
    ToolVault v;
    // As ansible.builtin.copy does: a temporary file in the same directory,
    // fchmod, fsync, rename.
    const auto replace = [&](const std::string& tmp_name, const std::string& content, const char* mode) {
        return shell("/usr/bin/python3 -c 'import os, sys\n"
                     "d, name, content, mode = sys.argv[1:]\n"
                     "tmp = os.path.join(d, name)\n"
                     "fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)\n"
                     "os.write(fd, content.encode())\n"
                     "os.fchmod(fd, int(mode, 8))\n"
                     "os.fsync(fd)\n"
                     "os.close(fd)\n"
                     "os.rename(tmp, os.path.join(d, \"app-conf\"))' " +
                     v.path() + " " + tmp_name + " '" + content + "' " + mode + " 2>&1");
    };
    SECTION("tempfile.mkstemp(prefix='.ansible_tmp')")
    {
        const auto r = replace(".ansible_tmpk3_9x2ab", "managed=1\n", "0440");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "managed=1\n");
        CHECK(mode_of(v.path("app-conf")) == "440 0:0\n");
    }
    SECTION("tempfile's default names, with and without '_' (a staging file, or a fresh secret that moves)")
    {
        auto r = replace("tmpk3_9x2ab", "one\n", "0400");
        INFO(r.data);
        CHECK(r.err == 0);
        r = replace("tmpk3z9x2ab", "two\n", "0400");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "two\n", 3);
        auto rec = v.m.last_audit("rename", 0);
        CHECK(rec["from"] == "tmpk3z9x2ab");
        CHECK(rec["version"] == 3);
    }
    SECTION("the real tempfile module, twenty times")
    {
        const auto r = shell("/usr/bin/python3 -c 'import os, tempfile, sys\n"
                             "for i in range(20):\n"
                             "    fd, tmp = tempfile.mkstemp(dir=sys.argv[1])\n"
                             "    os.write(fd, b\"round %d\\n\" % i)\n"
                             "    os.close(fd)\n"
                             "    os.replace(tmp, os.path.join(sys.argv[1], \"app-conf\"))' " +
                             v.path() + " 2>&1");
        INFO(r.data);
        CHECK(r.err == 0);
        replaced(v, "app-conf", "round 19\n", 21);
    }
}

TEST_CASE("staging files: private to their creator, gone when removed or idle; other bad names are refused",
          "[fs][tools][staging]")
{
    ToolVault v;
    TestUser other("o");
    REQUIRE(write_file(v.path(".policy"), "allow uid:0 *\nallow uid:" + std::to_string(other.uid) + " get,list,set\n")
                .err == 0);
    // Each uid has its own: the same name does not meet.
    REQUIRE(write_file(v.path(".app-conf.swp"), "root's swap").err == 0);
    REQUIRE(as(other, [&] { return write_file(v.path(".app-conf.swp"), "other's swap"); }).err == 0);
    CHECK(ok(read_file(v.path(".app-conf.swp"))) == "root's swap");
    CHECK(ok(as(other, [&] { return read_file(v.path(".app-conf.swp")); })) == "other's swap");
    // Read-write, at offsets, truncated: like any file.
    const auto rw = as_root([&] {
        const int fd = ::open(v.path(".app-conf.swp").c_str(), O_RDWR);
        if (fd < 0)
            return Outcome{errno, "open"};
        char buf[32] = {};
        const bool ok = ::pwrite(fd, "ROOT", 4, 0) == 4 && ::ftruncate(fd, 8) == 0 && ::pread(fd, buf, 32, 0) == 8;
        ::close(fd);
        return Outcome{ok ? 0 : errno, std::string(buf)};
    });
    CHECK(ok(rw) == "ROOT's s");
    CHECK(ok(list_dir(v.path(".versions"))) == "app-conf@1");
    // Unlink discards it.
    CHECK(remove_file(v.path(".app-conf.swp")).err == 0);
    CHECK(read_file(v.path(".app-conf.swp")).err == ENOENT);
    CHECK(ok(as(other, [&] { return read_file(v.path(".app-conf.swp")); })) == "other's swap");
    // Idle for staging_idle_seconds (2 here) with nothing holding it: gone.
    std::this_thread::sleep_for(std::chrono::milliseconds(3500));
    CHECK(as(other, [&] { return read_file(v.path(".app-conf.swp")); }).err == ENOENT);
    // A name that is neither a secret's nor a tool's temporary name is an
    // error at once, never a file that silently goes away.
    for (const std::string bad : {"tls.key", "db_password", "spa ce"}) {
        INFO(bad);
        const auto r = shell("cp " + v.source("k", "key") + " '" + v.path(bad) + "' 2>&1");
        CHECK(r.err != 0);
        CHECK(r.data.find("Invalid argument") != std::string::npos);
    }
    CHECK(ok(list_dir(v.path())) == ".certs\n.deleted\n.keys\n.policy\n.versions\napp-conf");
    // A lock file is a symlink of its own; it is never a secret.
    REQUIRE(::symlink("root@host.1", v.path(".#app-conf").c_str()) == 0);
    char target[64] = {};
    CHECK(::readlink(v.path(".#app-conf").c_str(), target, sizeof target - 1) == 11);
    CHECK(std::string(target) == "root@host.1");
    CHECK(rename_path(v.path(".#app-conf"), v.path("app-conf")).err == EPERM);
    CHECK(::symlink("x", v.path("app-link").c_str()) == -1);
    CHECK(errno == EPERM);
    CHECK(ok(read_file(v.path("app-conf"))) == "a=1\n");
}
