// Integration: the filesystem contract of docs/design.md §1, on a real mount.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <signal.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <set>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

// A value left empty (O_TRUNC, nothing written) commits at release, which
// the kernel sends just after close() returns.
// An empty value commits at release, which the kernel sends after close()
// returns: wait until its version 1 exists. (Before, its writer sees the
// name as a file being created.)
void wait_for_release_commit(const std::string& path)
{
    for (int i = 0; i < 200 && stat_path(path + "@1").err == ENOENT; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

// A watcher maps a file and never touches its mapping: mincore() on it
// reports how many of the file's pages sit in the page cache. (Every open
// flushes that cache, so the watcher must be in place before a reader fills
// it.) `ok()` is false if it could not map the file.
class CacheWatcher {
public:
    CacheWatcher(const std::string& path, std::size_t size)
        : size_(size), fd_(::open(path.c_str(), O_RDONLY)),
          map_(fd_ < 0 ? MAP_FAILED : ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd_, 0))
    {
    }
    ~CacheWatcher()
    {
        if (map_ != MAP_FAILED)
            ::munmap(map_, size_);
        if (fd_ >= 0)
            ::close(fd_);
    }
    CacheWatcher(const CacheWatcher&) = delete;
    CacheWatcher& operator=(const CacheWatcher&) = delete;
    bool ok() const { return map_ != MAP_FAILED; }
    int resident() const
    {
        const long page = ::sysconf(_SC_PAGESIZE);
        std::vector<unsigned char> in((size_ + static_cast<std::size_t>(page) - 1) / static_cast<std::size_t>(page));
        if (::mincore(map_, size_, in.data()) != 0)
            return -1;
        int n = 0;
        for (const auto b : in)
            n += b & 1;
        return n;
    }
    // What is resident once the daemon had time to drop it (up to 5 s).
    int resident_after_drop() const
    {
        int n = resident();
        for (int i = 0; i < 500 && n != 0; ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
            n = resident();
        }
        return n;
    }

private:
    std::size_t size_;
    int fd_;
    void* map_;
};

}  // namespace

TEST_CASE("the DESIGN walkthrough works as shown", "[fs][token]")
{
    Mount m;
    REQUIRE(make_dir(m.path("payments")).err == 0);
    REQUIRE(write_file(m.path("payments/db-password"), "hunter2").err == 0);
    REQUIRE(write_file(m.path("payments/db-password"), "correct horse").err == 0);
    CHECK(ok(read_file(m.path("payments/db-password"))) == "correct horse");
    CHECK(ok(read_file(m.path("payments/db-password@1"))) == "hunter2");
    CHECK(ok(read_file(m.path("payments/db-password@2"))) == "correct horse");
    CHECK(ok(list_dir(m.path("payments"))) == ".certs\n.deleted\n.keys\n.policy\n.versions\ndb-password");
    CHECK(ok(list_dir(m.path("payments/.versions"))) == "db-password@1\ndb-password@2");
    CHECK(ok(read_file(m.path("payments/.policy"))) == "allow uid:0 *\n");
    CHECK(ok(list_dir(m.path())) == "payments");
    // A policy written by a shell redirection lands once, whole.
    const auto before = m.audit_count();
    REQUIRE(shell("printf 'allow uid:0 *\\nallow gid:33 get,list\\n' > " + m.path("payments/.policy")).err == 0);
    CHECK(ok(read_file(m.path("payments/.policy"))) == "allow uid:0 *\nallow gid:33 get,list\n");
    std::size_t policy_writes = 0;
    const auto records = m.audit();
    for (std::size_t i = before; i < records.size(); ++i)
        policy_writes += records[i].value("op", "") == "policy_set" ? 1 : 0;
    CHECK(policy_writes == 1);
    // Bytes are stored exactly as written: echo's newline stays.
    REQUIRE(shell("echo hello > " + m.path("payments/echoed")).err == 0);
    CHECK(ok(read_file(m.path("payments/echoed"))) == "hello\n");
}

TEST_CASE("shell idioms: printf >, cat, cp, ls -l, stat", "[fs]")
{
    Mount m;
    REQUIRE(shell("mkdir " + m.path("app")).err == 0);
    REQUIRE(shell("printf '%s' 's3cr3t' > " + m.path("app/token")).err == 0);
    CHECK(shell("cat " + m.path("app/token")).data == "s3cr3t");

    const std::string src = m.root + "/source.txt";
    REQUIRE(shell("printf 'line one\\nline two\\n' > " + src).err == 0);
    REQUIRE(shell("cp " + src + " " + m.path("app/config")).err == 0);
    CHECK(shell("cat " + m.path("app/config")).data == "line one\nline two\n");
    CHECK(shell("cmp " + src + " " + m.path("app/config")).err == 0);

    const auto ls = shell("ls -l " + m.path("app") + " | awk 'NR > 1 {print $1, $3, $5, $9}'");
    REQUIRE(ls.err == 0);
    // Owner, group and mode are the secret's own (root:root 0400 unless a
    // manager changes them), size is the plaintext's.
    CHECK(ls.data == "-r-------- root 18 config\n-r-------- root 6 token\n");
    CHECK(shell("stat -c '%s %F' " + m.path("app/token")).data == "6 regular file\n");
    CHECK(shell("stat -c '%s' " + m.path("app/token@1")).data == "6\n");
    CHECK(shell("stat -c '%a' " + m.path("app/token@1")).data == "400\n");
}

TEST_CASE("values round-trip exactly: empty, one byte, 25 KiB, binary", "[fs]")
{
    Mount m;
    REQUIRE(make_dir(m.path("bin")).err == 0);
    std::string binary;
    for (int i = 0; i < 256; ++i)
        binary.push_back(static_cast<char>(i));
    const std::string max(25 * 1024, 'x');
    for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
             {"empty", ""}, {"one", "1"}, {"max", max}, {"binary", binary}}) {
        INFO(name);
        REQUIRE(write_file(m.path("bin/" + name), value).err == 0);
        if (value.empty())
            wait_for_release_commit(m.path("bin/" + name));
        CHECK(ok(read_file(m.path("bin/" + name))) == value);
        CHECK(ok(stat_path(m.path("bin/" + name))) == std::to_string(value.size()));
    }
}

TEST_CASE("a reader's mmap leaves no plaintext in the page cache once it closes", "[fs][mmap]")
{
    Mount m;
    REQUIRE(make_dir(m.path("mapped")).err == 0);
    const long page = ::sysconf(_SC_PAGESIZE);
    const std::size_t pages = 3;
    const std::string value(pages * static_cast<std::size_t>(page), 'k');
    REQUIRE(write_file(m.path("mapped/key"), value).err == 0);

    // The watcher is a reader too: its open fills the cache, and it holds
    // the pages mapped while the reader maps, closes and is dropped.
    const auto o = as_root([&] {
        const std::string path = m.path("mapped/key");
        const CacheWatcher watcher(path, value.size());
        if (!watcher.ok())
            return Outcome{errno, "watcher"};
        const int reader_fd = ::open(path.c_str(), O_RDONLY);
        void* reader = ::mmap(nullptr, value.size(), PROT_READ, MAP_PRIVATE, reader_fd, 0);
        if (reader_fd < 0 || reader == MAP_FAILED)
            return Outcome{errno, "reader"};
        const bool same = std::string(static_cast<const char*>(reader), value.size()) == value;
        const int while_mapped = watcher.resident();
        ::munmap(reader, value.size());
        ::close(reader_fd);
        const int after_close = watcher.resident_after_drop();
        return Outcome{0, (same ? "same " : "differs ") + std::to_string(while_mapped) + " " +
                              std::to_string(after_close)};
    });
    // The mapping read the value from the cache (so mincore sees it here);
    // after the reader closed, the daemon had the kernel drop it, although
    // the watcher was still open.
    CHECK(ok(o) == "same " + std::to_string(pages) + " 0");
}

TEST_CASE("a reader's read() keeps the value in the page cache only while it is open", "[fs][mmap]")
{
    Mount m;
    REQUIRE(make_dir(m.path("cached")).err == 0);
    const long page = ::sysconf(_SC_PAGESIZE);
    const std::size_t pages = 3;
    std::string value(pages * static_cast<std::size_t>(page) - 100, 'r');
    value[0] = 'A';
    value.back() = 'Z';
    REQUIRE(write_file(m.path("cached/key"), value).err == 0);

    const auto o = as_root([&] {
        const std::string path = m.path("cached/key");
        const CacheWatcher watcher(path, value.size());
        if (!watcher.ok())
            return Outcome{errno, "watcher"};
        // The watcher's own open (the first of the file) filled the pages;
        // mincore() faults nothing in.
        const int at_open = watcher.resident();
        // Read until read() returns 0, as cat and every config loader do.
        const int reader_fd = ::open(path.c_str(), O_RDONLY);
        if (reader_fd < 0)
            return Outcome{errno, "reader"};
        std::string got;
        char buf[65536];
        int reads = 0;
        for (ssize_t n; (n = ::read(reader_fd, buf, sizeof buf)) > 0; ++reads)
            got.append(buf, static_cast<std::size_t>(n));
        const int while_open = watcher.resident();
        ::close(reader_fd);
        const int after_close = watcher.resident_after_drop();
        return Outcome{0, (got == value ? "same " : "differs ") + std::to_string(reads) + " " +
                              std::to_string(at_open) + " " + std::to_string(while_open) + " " +
                              std::to_string(after_close)};
    });
    // The open put the whole value in the page cache before any read (so
    // read() and the read at EOF need no round trip); one read() brought it
    // all; after the reader's close the daemon had the kernel drop it.
    const auto all = std::to_string(pages);
    CHECK(ok(o) == "same 1 " + all + " " + all + " 0");
}

TEST_CASE("many readers opening a new version at once all read it (the first fills, the others wait)",
          "[fs][mmap][concurrency]")
{
    Mount m;
    REQUIRE(make_dir(m.path("crowd")).err == 0);
    std::atomic<int> wrong{0};
    std::atomic<int> failed{0};
    for (int round = 0; round < 20; ++round) {
        const std::string value = "value of round " + std::to_string(round) + std::string(5000, 'v');
        REQUIRE(write_file(m.path("crowd/s"), value).err == 0);
        std::vector<std::thread> readers;
        for (int t = 0; t < 8; ++t)
            readers.emplace_back([&] {
                for (int i = 0; i < 10; ++i) {
                    const Outcome r = read_file(m.path("crowd/s"));
                    if (r.err != 0)
                        ++failed;
                    else if (r.data != value)
                        ++wrong;
                }
            });
        for (auto& r : readers)
            r.join();
    }
    CHECK(failed == 0);
    CHECK(wrong == 0);
}

TEST_CASE("writes: offsets assemble, EFBIG commits nothing, S@N is read-only", "[fs][token]")
{
    Mount m;
    REQUIRE(make_dir(m.path("wvault")).err == 0);

    // Writes at any offset below 25 KiB assemble one value; gaps are zeros.
    const auto assembled = as_root([&] {
        const int fd = ::open(m.path("wvault/pieces").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0)
            return Outcome{errno, {}};
        if (::pwrite(fd, "world", 5, 6) != 5 || ::pwrite(fd, "hello", 5, 0) != 5)
            return Outcome{errno, {}};
        return Outcome{::close(fd) == 0 ? 0 : errno, {}};
    });
    REQUIRE(assembled.err == 0);
    CHECK(ok(read_file(m.path("wvault/pieces"))) == std::string("hello\0world", 11));
    CHECK(ok(list_dir(m.path("wvault/.versions"))) == "pieces@1");

    // Past 25 KiB: EFBIG at the write, EFBIG again at close, no version.
    const auto big = as_root([&] {
        const int fd = ::open(m.path("wvault/big").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        std::string chunk(30000, 'b');
        const ssize_t n = ::write(fd, chunk.data(), chunk.size());
        const int write_err = n < 0 ? errno : 0;
        const int close_err = ::close(fd) == 0 ? 0 : errno;
        return Outcome{write_err, std::to_string(close_err)};
    });
    CHECK(big.err == EFBIG);
    CHECK(big.data == std::to_string(EFBIG));
    CHECK(read_file(m.path("wvault/big")).err == ENOENT);
    CHECK(ok(list_dir(m.path("wvault/.versions"))) == "pieces@1");

    // A write at offset 30,000 of an existing secret: EFBIG, old value stays.
    const auto far = as_root([&] {
        const int fd = ::open(m.path("wvault/pieces").c_str(), O_WRONLY | O_TRUNC);
        const ssize_t n = ::pwrite(fd, "x", 1, 30000);
        const int e = n < 0 ? errno : 0;
        ::close(fd);
        return Outcome{e, {}};
    });
    CHECK(far.err == EFBIG);
    CHECK(ok(read_file(m.path("wvault/pieces"))) == std::string("hello\0world", 11));

    CHECK(write_file(m.path("wvault/pieces@1"), "nope").err == EROFS);
    CHECK(write_file(m.path("wvault/pieces@7"), "nope").err == EROFS);
    CHECK(write_file(m.path("wvault/pieces@1"), "nope", O_WRONLY).err == EROFS);
    // Secrets are read or written whole: no O_RDWR (not even truncating: a
    // readable writer could map the pages readers share), no O_APPEND.
    CHECK(write_file(m.path("wvault/pieces"), "x", O_RDWR).err == EINVAL);
    CHECK(write_file(m.path("wvault/pieces"), "x", O_RDWR | O_TRUNC).err == EINVAL);
    CHECK(ok(read_file(m.path("wvault/pieces"))) == std::string("hello\0world", 11));
    CHECK(write_file(m.path("wvault/pieces"), "x", O_WRONLY | O_APPEND).err == EINVAL);
    // truncate: only to empty, only through an open writer.
    const auto ftrunc = as_root([&] {
        const int fd = ::open(m.path("wvault/pieces").c_str(), O_WRONLY);
        const int rc = ::ftruncate(fd, 5) == 0 ? 0 : errno;
        ::close(fd);
        return Outcome{rc, {}};
    });
    CHECK(ftrunc.err == EINVAL);
    CHECK(::truncate(m.path("wvault/pieces").c_str(), 3) != 0);
    CHECK(errno == EINVAL);
}

TEST_CASE("names: invalid ones are EINVAL on create and ENOENT on lookup", "[fs]")
{
    Mount m;
    REQUIRE(make_dir(m.path("names")).err == 0);
    REQUIRE(write_file(m.path("names/ok-Name-1"), "v").err == 0);
    const std::string long_ok(127, 'a');
    CHECK(write_file(m.path("names/" + long_ok), "v").err == 0);
    for (const std::string& bad : {std::string(128, 'a'), std::string("under_score"), std::string("dot.ted"),
                                  std::string("spa ce"), std::string("\xc3\xa9t\xc3\xa9")}) {
        INFO(bad);
        CHECK(write_file(m.path("names/" + bad), "v").err == EINVAL);
        CHECK(read_file(m.path("names/" + bad)).err == ENOENT);
    }
    CHECK(write_file(m.path("names/" + std::string(10000, 'a')), "v").err == ENAMETOOLONG);
    for (const std::string bad : {"ok-Name-1@0", "ok-Name-1@01", "ok-Name-1@-1", "ok-Name-1@1@2",
                                  "ok-Name-1@99999999999999999999", "ok-Name-1@", "ok-Name-1@2", "ok-Name-1@+1"}) {
        INFO(bad);
        CHECK(read_file(m.path("names/" + bad)).err == ENOENT);
    }
    CHECK(ok(read_file(m.path("names/ok-Name-1@1"))) == "v");
    // Vault names: 3-24, letter first.
    CHECK(make_dir(m.path("ab")).err == EINVAL);
    CHECK(make_dir(m.path("1abc")).err == EINVAL);
    CHECK(make_dir(m.path(std::string(25, 'v'))).err == EINVAL);
    CHECK(make_dir(m.path("names")).err == EEXIST);
}

TEST_CASE("refusals: link, symlink, mknod, renames of secrets, directories' owners are EPERM", "[fs]")
{
    Mount m;
    REQUIRE(make_dir(m.path("rvault")).err == 0);
    REQUIRE(make_dir(m.path("other")).err == 0);
    // Two versions: not a tool's temporary file, which alone may move.
    REQUIRE(write_file(m.path("rvault/s"), "u").err == 0);
    REQUIRE(write_file(m.path("rvault/s"), "v").err == 0);
    CHECK(::link(m.path("rvault/s").c_str(), m.path("rvault/t").c_str()) == -1);
    CHECK(errno == EPERM);
    CHECK(::symlink("s", m.path("rvault/t").c_str()) == -1);
    CHECK(errno == EPERM);
    CHECK(::mknod(m.path("rvault/t").c_str(), S_IFIFO | 0600, 0) == -1);
    CHECK(errno == EPERM);
    CHECK(rename_path(m.path("rvault/s"), m.path("rvault/t")).err == EPERM);
    CHECK(m.last_audit("rename", 0)["result"] == "EPERM");
    CHECK(rename_path(m.path("rvault/s"), m.path("rvault/s@1")).err == EROFS);
    CHECK(rename_path(m.path("rvault/s@1"), m.path("rvault/t")).err == EPERM);
    CHECK(rename_path(m.path("rvault/.policy"), m.path("rvault/t")).err == EPERM);
    CHECK(rename_path(m.path("rvault"), m.path("renamed")).err == EPERM);
    // Across vaults: EXDEV, so that mv copies (and then removes).
    CHECK(rename_path(m.path("rvault/s"), m.path("other/s")).err == EXDEV);
    CHECK(::chmod(m.path("rvault").c_str(), 0700) == -1);
    CHECK(errno == EPERM);
    CHECK(::chmod(m.path("rvault").c_str(), 0755) == 0);  // what it shows: a no-op
    CHECK(make_dir(m.path("rvault/sub")).err == EPERM);
    CHECK(write_file(m.path("file-in-root"), "v").err == EPERM);
    CHECK(ok(read_file(m.path("rvault/s"))) == "v");
    CHECK(ok(list_dir(m.path("rvault/.versions"))) == "s@1\ns@2");
}

TEST_CASE("vault directories: mkdir by admins, rmdir only when empty", "[fs]")
{
    Mount m;
    TestUser user("u");
    REQUIRE(make_dir(m.path("vault-a")).err == 0);
    CHECK(as(user, [&] { return make_dir(m.path("vault-b")); }).err == EACCES);
    REQUIRE(write_file(m.path("vault-a/s"), "v").err == 0);
    CHECK(remove_dir(m.path("vault-a")).err == ENOTEMPTY);
    REQUIRE(make_dir(m.path("vault-c")).err == 0);
    CHECK(as(user, [&] { return remove_dir(m.path("vault-c")); }).err == ENOENT);  // hidden from the user
    CHECK(remove_dir(m.path("vault-c")).err == 0);
    CHECK(ok(list_dir(m.path())) == "vault-a");
    CHECK(stat_path(m.path("vault-c")).err == ENOENT);
}

TEST_CASE("8 concurrent writers x 10 writes give 80 intact versions", "[fs][concurrency][token]")
{
    Mount m;
    REQUIRE(make_dir(m.path("conc")).err == 0);
    std::vector<std::thread> writers;
    std::vector<int> failures(8, 0);
    for (int w = 0; w < 8; ++w) {
        writers.emplace_back([&, w] {
            for (int i = 0; i < 10; ++i) {
                // Distinct lengths and fill bytes: a mix of two writes shows.
                const std::string value = "writer-" + std::to_string(w) + "-" + std::to_string(i) + ":" +
                                          std::string(100 + 37 * w + i, static_cast<char>('a' + w));
                if (write_file(m.path("conc/shared"), value).err != 0)
                    ++failures[static_cast<std::size_t>(w)];
            }
        });
    }
    for (auto& t : writers)
        t.join();
    for (int w = 0; w < 8; ++w)
        CHECK(failures[static_cast<std::size_t>(w)] == 0);

    std::set<std::string> seen;
    for (int n = 1; n <= 80; ++n) {
        const auto v = read_file(m.path("conc/shared@" + std::to_string(n)));
        REQUIRE(v.err == 0);
        const auto colon = v.data.find(':');
        REQUIRE(colon != std::string::npos);
        const int w = v.data[7] - '0';
        const std::string head = v.data.substr(0, colon);
        const int i = std::stoi(head.substr(head.rfind('-') + 1));
        CHECK(v.data == head + ":" + std::string(100 + 37 * w + i, static_cast<char>('a' + w)));
        seen.insert(head);
    }
    CHECK(seen.size() == 80);
    CHECK(read_file(m.path("conc/shared@81")).err == ENOENT);
}

TEST_CASE("an open reader keeps the version it opened", "[fs][concurrency]")
{
    Mount m;
    REQUIRE(make_dir(m.path("pin")).err == 0);
    REQUIRE(write_file(m.path("pin/s"), "first value").err == 0);
    const auto o = as_root([&] {
        const int fd = ::open(m.path("pin/s").c_str(), O_RDONLY);
        if (fd < 0)
            return Outcome{errno, {}};
        char head[5];
        if (::read(fd, head, 5) != 5)
            return Outcome{errno, "read"};
        const auto w = write_file(m.path("pin/s"), "second, longer value");
        if (w.err != 0)
            return Outcome{w.err, "write"};
        char rest[64];
        const ssize_t n = ::read(fd, rest, sizeof rest);
        char again[64];
        const ssize_t m2 = ::pread(fd, again, sizeof again, 0);
        ::close(fd);
        return Outcome{0, std::string(head, 5) + std::string(rest, static_cast<std::size_t>(std::max<ssize_t>(n, 0))) +
                              "|" + std::string(again, static_cast<std::size_t>(std::max<ssize_t>(m2, 0)))};
    });
    REQUIRE(o.err == 0);
    CHECK(o.data == "first value|first value");
    CHECK(ok(read_file(m.path("pin/s"))) == "second, longer value");
}

TEST_CASE("1,000 secrets are listed", "[fs]")
{
    Mount m;
    REQUIRE(make_dir(m.path("many")).err == 0);
    std::vector<std::thread> writers;
    for (int w = 0; w < 8; ++w)
        writers.emplace_back([&, w] {
            for (int i = w; i < 1000; i += 8)
                write_file(m.path("many/secret-" + std::to_string(i)), "v" + std::to_string(i));
        });
    for (auto& t : writers)
        t.join();
    const auto listing = list_dir(m.path("many"));
    REQUIRE(listing.err == 0);
    std::set<std::string> names;
    std::size_t start = 0;
    while (start < listing.data.size()) {
        auto end = listing.data.find('\n', start);
        if (end == std::string::npos)
            end = listing.data.size();
        names.insert(listing.data.substr(start, end - start));
        start = end + 1;
    }
    CHECK(names.size() == 1005);  // + .policy .versions .deleted .keys .certs
    for (int i = 0; i < 1000; ++i)
        CHECK(names.count("secret-" + std::to_string(i)) == 1);
    CHECK(ok(read_file(m.path("many/secret-999"))) == "v999");
}

TEST_CASE("inodes are stable per version and statfs answers", "[fs]")
{
    Mount m;
    REQUIRE(make_dir(m.path("ino")).err == 0);
    REQUIRE(write_file(m.path("ino/s"), "one").err == 0);
    struct stat a{}, b{}, c{}, again{};
    REQUIRE(::stat(m.path("ino/s").c_str(), &a) == 0);
    REQUIRE(::stat(m.path("ino/s").c_str(), &again) == 0);
    CHECK(again.st_ino == a.st_ino);
    REQUIRE(write_file(m.path("ino/s"), "two").err == 0);
    // An open always reads what S stands for now (an open on the inode of an
    // older version is ESTALE, and the kernel looks S up again) ...
    CHECK(ok(read_file(m.path("ino/s"))) == "two");
    // ... and leaves the name pointing at the version's own inode.
    REQUIRE(::stat(m.path("ino/s").c_str(), &b) == 0);
    CHECK(a.st_ino != b.st_ino);  // S has an inode per version it stands for
    CHECK(b.st_size == 3);
    REQUIRE(::stat(m.path("ino/s@1").c_str(), &c) == 0);
    CHECK(c.st_ino != a.st_ino);
    // Disabling version 2 makes S stand for version 1 again: its inode follows.
    REQUIRE(set_xattr(m.path("ino/s@2"), "user.vault.enabled", "false").err == 0);
    CHECK(ok(read_file(m.path("ino/s"))) == "one");
    struct stat back{};
    REQUIRE(::stat(m.path("ino/s").c_str(), &back) == 0);
    CHECK(back.st_ino == a.st_ino);
    REQUIRE(set_xattr(m.path("ino/s@2"), "user.vault.enabled", "true").err == 0);
    m.stop();
    m.start();
    struct stat d{};
    REQUIRE(::stat(m.path("ino/s").c_str(), &d) == 0);
    CHECK(d.st_ino == b.st_ino);  // and the same across restarts
    struct statvfs sv{};
    REQUIRE(::statvfs(m.path().c_str(), &sv) == 0);
    CHECK(sv.f_namemax >= 127);
}

TEST_CASE("the daemon: SIGTERM unmounts, a stale mount is cleaned at start, stderr holds no secret", "[fs]")
{
    Mount m;
    const std::string canary = "CANARY-" + random_hex(12);
    REQUIRE(make_dir(m.path("dvault")).err == 0);
    REQUIRE(write_file(m.path("dvault/s"), canary).err == 0);
    REQUIRE(ok(read_file(m.path("dvault/s"))) == canary);

    m.stop();
    CHECK_FALSE(m.mounted());

    m.start();
    m.kill_daemon();
    CHECK(m.mounted());
    CHECK(stat_path(m.path("dvault")).err == ENOTCONN);
    m.start();  // cleans the stale mount
    CHECK(m.daemon_stderr().find("stale mount") != std::string::npos);
    CHECK(ok(read_file(m.path("dvault/s"))) == canary);
    CHECK(m.daemon_stderr().find(canary) == std::string::npos);
}

// setns() into a mount namespace needs a single-threaded process: not under TSan.
TEST_CASE("a daemon in a private mount namespace mounts where the host sees it", "[fs]" VAULTFS_SINGLE_THREADED_ONLY)
{
    // What the systemd unit does: its sandbox gives the daemon a private
    // mount namespace, and --mount-namespace puts the mount in the host's.
    Mount m(MountOptions{{}, 8, false});
    REQUIRE(shell(m.binary + " init --state " + m.state + " >/dev/null").err == 0);
    const std::string ns = "/proc/" + std::to_string(::getpid()) + "/ns/mnt";
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::execlp("unshare", "unshare", "-m", "--propagation", "private", m.binary.c_str(), "mount", "-f",
                 "--mount-namespace", ns.c_str(), "--state", m.state.c_str(), m.mountpoint.c_str(),
                 static_cast<char*>(nullptr));
        ::_exit(127);
    }
    for (int i = 0; i < 200 && !m.mounted(); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(m.mounted());
    CHECK(make_dir(m.path("sandboxed")).err == 0);
    CHECK(write_file(m.path("sandboxed/s"), "seen from outside").err == 0);
    CHECK(ok(read_file(m.path("sandboxed/s"))) == "seen from outside");
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK_FALSE(m.mounted());  // unmounted in the host's namespace too
}
