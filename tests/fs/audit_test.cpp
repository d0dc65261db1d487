// Integration: the audit trail of a real mount — one record per operation,
// allowed or denied; fail closed when it cannot be written; verification;
// rotation on SIGHUP.
#include <catch2/catch.hpp>

#include <openssl/sha.h>

#include <ctime>

#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "fs_support.hpp"
#include "../support/small_tmpfs.hpp"

using namespace vaultfs::testing;

namespace {

// The records appended by `action`.
std::vector<nlohmann::json> records_of(const Mount& m, const std::function<void()>& action)
{
    return m.records_of(action);
}

void expect_one(const std::vector<nlohmann::json>& records, const std::string& op, uid_t uid,
                const std::string& decision, const std::string& result)
{
    INFO(nlohmann::json(records).dump(1));
    std::size_t n = 0;
    for (auto r : records) {
        if (r["op"] != op)
            continue;
        ++n;
        CHECK(r["uid"] == uid);
        CHECK(r["decision"] == decision);
        CHECK(r["result"] == result);
        CHECK(r["pid"].get<int>() > 0);
        CHECK(r.contains("rule"));
        CHECK(r["hash"].get<std::string>().size() == 64);
    }
    CHECK(n == 1);
}

// A tmpfs mounted for one test, always unmounted.

}  // namespace

TEST_CASE("every operation writes one record, allowed or denied", "[fs][audit][token]")
{
    TestUser user("au");
    Mount m;
    REQUIRE(make_dir(m.path("audited")).err == 0);
    REQUIRE(write_file(m.path("audited/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(user.uid) + " list\n").err == 0);

    expect_one(records_of(m, [&] { REQUIRE(make_dir(m.path("second")).err == 0); }), "vault_create", 0, "allow", "ok");
    expect_one(records_of(m, [&] { CHECK(as(user, [&] { return make_dir(m.path("third")); }).err == EACCES); }),
               "vault_create", user.uid, "deny", "EACCES");
    expect_one(records_of(m, [&] { REQUIRE(remove_dir(m.path("second")).err == 0); }), "vault_remove", 0, "allow", "ok");

    const auto write = records_of(m, [&] { REQUIRE(write_file(m.path("audited/s"), "value-1").err == 0); });
    expect_one(write, "set", 0, "allow", "ok");
    expect_one(write, "commit", 0, "allow", "ok");
    for (auto r : write)
        if (r["op"] == "commit") {
            CHECK(r["version"] == 1);
            CHECK(r["bytes"] == 7);
            CHECK(r["secret"] == "s");
            CHECK(r["vault"] == "audited");
        }
    expect_one(records_of(m, [&] { CHECK(as(user, [&] { return write_file(m.path("audited/s"), "x"); }).err == EACCES); }),
               "set", user.uid, "deny", "EACCES");

    const auto get = records_of(m, [&] { REQUIRE(read_file(m.path("audited/s")).err == 0); });
    expect_one(get, "get", 0, "allow", "ok");
    REQUIRE_FALSE(get.empty());
    CHECK(get.back().value("exe", "").find("fs_tests") != std::string::npos);
    expect_one(records_of(m, [&] { CHECK(as(user, [&] { return read_file(m.path("audited/s")); }).err == EACCES); }),
               "get", user.uid, "deny", "EACCES");

    expect_one(records_of(m, [&] { REQUIRE(as(user, [&] { return list_dir(m.path("audited")); }).err == 0); }), "list",
               user.uid, "allow", "ok");
    expect_one(records_of(m, [&] { REQUIRE(read_file(m.path("audited/.policy")).err == 0); }), "policy_get", 0, "allow",
               "ok");
    expect_one(records_of(m, [&] { CHECK(as(user, [&] { return read_file(m.path("audited/.policy")); }).err == EACCES); }),
               "policy_get", user.uid, "deny", "EACCES");
    expect_one(records_of(m, [&] { CHECK(write_file(m.path("audited/.policy"), "allow uid:0 *\n").err == 0); }),
               "policy_set", 0, "allow", "ok");

    // The whole log verifies, and the CLI says so.
    m.stop();
    const auto v = shell(m.binary + " audit verify --state " + m.state);
    INFO(v.data);
    CHECK(v.err == 0);
    CHECK(v.data.find("OK:") == 0);
}

TEST_CASE("audit verify names the first bad record of a tampered copy", "[fs][audit][token]")
{
    Mount m;
    REQUIRE(make_dir(m.path("tamper")).err == 0);
    for (int i = 0; i < 5; ++i)
        REQUIRE(write_file(m.path("tamper/s"), "v" + std::to_string(i)).err == 0);
    m.stop();
    const std::string log = slurp(m.state_file("audit.jsonl"));
    std::vector<std::string> lines;
    std::istringstream in(log);
    for (std::string line; std::getline(in, line);)
        lines.push_back(line);
    REQUIRE(lines.size() > 10);
    const auto verify = [&](const std::vector<std::string>& edited, bool with_state) {
        std::ofstream(m.state_file("audit.jsonl"), std::ios::trunc) << [&] {
            std::string all;
            for (const auto& l : edited)
                all += l + "\n";
            return all;
        }();
        return with_state ? shell(m.binary + " audit verify --state " + m.state)
                          : shell(m.binary + " audit verify --public-key " + m.state_file("audit-signing.pub.pem") +
                                  " " + m.state_file("audit.jsonl"));
    };

    CHECK(verify(lines, true).err == 0);
    auto edited = lines;
    edited[4].replace(edited[4].find("\"uid\":0"), 7, "\"uid\":7");
    auto r = verify(edited, false);
    CHECK(r.err == 1);
    CHECK(r.data.find("line 5: record edited") != std::string::npos);

    auto deleted = lines;
    deleted.erase(deleted.begin() + 6);
    r = verify(deleted, false);
    CHECK(r.err == 1);
    CHECK(r.data.find("line 7: record(s) deleted") != std::string::npos);

    auto swapped = lines;
    std::swap(swapped[5], swapped[6]);
    r = verify(swapped, false);
    CHECK(r.err == 1);
    CHECK(r.data.find("line 6: records reordered") != std::string::npos);

    auto truncated = lines;
    truncated.resize(truncated.size() - 3);
    r = verify(truncated, true);
    CHECK(r.err == 1);
    CHECK(r.data.find("tail truncated") != std::string::npos);

    std::ofstream(m.state_file("audit.jsonl"), std::ios::trunc) << log;
}

TEST_CASE("disk full: reads fail with EIO and serve nothing, and recover", "[fs][audit]")
{
    Mount m(MountOptions{{}, 8, false});
    REQUIRE(shell(m.binary + " init --state " + m.state + " >/dev/null").err == 0);
    SmallTmpfs tmpfs(m.root + "/auditfs", "size=256k,mode=0700");
    move_audit_to(m, tmpfs.path());
    m.start();

    const std::string canary = "CANARY-" + random_hex(12);
    REQUIRE(make_dir(m.path("full")).err == 0);
    REQUIRE(write_file(m.path("full/s"), canary).err == 0);
    REQUIRE(read_file(m.path("full/s")).data == canary);

    // Fill the audit's filesystem.
    REQUIRE(shell("dd if=/dev/zero of=" + tmpfs.path() + "/filler bs=4k 2>/dev/null; true").err == 0);
    // Records still fit in the audit file's last page; the first that does
    // not fails its operation.
    Outcome denied;
    for (int i = 0; i < 50; ++i) {
        denied = read_file(m.path("full/s"));
        if (denied.err != 0)
            break;
        CHECK(denied.data == canary);
    }
    CHECK(denied.err == EIO);
    CHECK(denied.data.empty());
    CHECK(write_file(m.path("full/s"), "new").err == EIO);
    CHECK(m.daemon_stderr().find("audit") != std::string::npos);
    // A monitoring check sees it: critical, exit 2, and why.
    const auto status = shell(m.binary + " status --state " + m.state);
    CHECK(status.err == 2);
    CHECK(status.data.rfind("vaultfs CRITICAL: audit failing: ", 0) == 0);

    // The daemon survived and serves again once there is room.
    std::filesystem::remove(tmpfs.path() + "/filler");
    CHECK(read_file(m.path("full/s")).data == canary);
    CHECK(m.daemon_stderr().find("writable again") != std::string::npos);
    m.stop();
    CHECK(slurp(tmpfs.path() + "/audit.jsonl").find(canary) == std::string::npos);
    CHECK(m.daemon_stderr().find(canary) == std::string::npos);
    const auto v = shell(m.binary + " audit verify --state " + m.state);
    INFO(v.data);
    CHECK(v.err == 0);
}

TEST_CASE("the audit fails at a writer's close: the close is EIO and no version is made", "[fs][audit]")
{
    Mount m(MountOptions{{}, 8, false});
    REQUIRE(shell(m.binary + " init --state " + m.state + " >/dev/null").err == 0);
    SmallTmpfs tmpfs(m.root + "/auditfs", "size=256k,mode=0700");
    move_audit_to(m, tmpfs.path(), "audit_reserve_mib = 0\n");
    m.start();
    REQUIRE(make_dir(m.path("late")).err == 0);
    REQUIRE(write_file(m.path("late/s"), "v1").err == 0);

    // The writer opens (audited) while the audit is healthy...
    int fd = -1;
    Paused writer(
        nullptr,
        [&] {
            fd = ::open(m.path("late/s").c_str(), O_WRONLY | O_TRUNC);
            if (fd < 0 || ::write(fd, "v2", 2) != 2)
                return Outcome{errno, "write"};
            return Outcome{};
        },
        [&] { return Outcome{::close(fd) == 0 ? 0 : errno, {}}; });
    REQUIRE(writer.first().err == 0);
    // ... then the audit's disk fills up, and the close must fail: a commit
    // is only made together with its record.
    REQUIRE(shell("dd if=/dev/zero of=" + tmpfs.path() + "/filler bs=4k 2>/dev/null; true").err == 0);
    // Whatever still fits in the file's last page is used up first.
    for (int i = 0; i < 50 && read_file(m.path("late/s")).err == 0; ++i) {
    }
    CHECK(writer.finish().err == EIO);
    std::filesystem::remove(tmpfs.path() + "/filler");
    CHECK(ok(list_dir(m.path("late/.versions"))) == "s@1");
    CHECK(ok(read_file(m.path("late/s"))) == "v1");
    m.stop();
    const auto v = shell(m.binary + " audit verify --state " + m.state + " 2>&1");
    INFO(v.data);
    CHECK(v.err == 0);
}

TEST_CASE("SIGHUP reopens the audit file; the rotated files verify as a chain", "[fs][audit]")
{
    Mount m;
    REQUIRE(make_dir(m.path("rotate")).err == 0);
    REQUIRE(write_file(m.path("rotate/s"), "one").err == 0);
    std::filesystem::rename(m.state_file("audit.jsonl"), m.state_file("audit.jsonl.1"));
    REQUIRE(::kill(m.daemon_pid(), SIGHUP) == 0);
    // The reopen happens at the next record or within a sync interval.
    for (int i = 0; i < 100 && !std::filesystem::exists(m.state_file("audit.jsonl")); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    REQUIRE(read_file(m.path("rotate/s")).data == "one");
    m.stop();
    auto first = m.audit();
    REQUIRE_FALSE(first.empty());
    CHECK(first.front()["op"] == "rotate");
    const std::string key = " --public-key " + m.state_file("audit-signing.pub.pem");
    auto v = shell(m.binary + " audit verify" + key + " " + m.state_file("audit.jsonl.1") + " " +
                   m.state_file("audit.jsonl"));
    INFO(v.data);
    CHECK(v.err == 0);
    // Without the first file, the chain misses its start.
    v = shell(m.binary + " audit verify" + key + " " + m.state_file("audit.jsonl"));
    CHECK(v.data.find("starts at a rotation") != std::string::npos);
}

TEST_CASE("the audit file replaced while a hard link keeps the old one: the records go on in the file its path "
          "names, and the daemon says so",
          "[fs][audit][attack]")
{
    Mount m;
    REQUIRE(make_dir(m.path("linked")).err == 0);
    REQUIRE(write_file(m.path("linked/s"), "one").err == 0);
    // A hard link keeps the file the daemon writes; the path names a new one.
    const std::string hidden = m.root + "/hidden.jsonl";
    REQUIRE(::link(m.state_file("audit.jsonl").c_str(), hidden.c_str()) == 0);
    REQUIRE(::unlink(m.state_file("audit.jsonl").c_str()) == 0);
    const int fd = ::open(m.state_file("audit.jsonl").c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    REQUIRE(fd >= 0);
    ::close(fd);
    // Reads go on; their records appear where the path points (the check
    // runs at most every 100 ms, so the first may still reach the old one).
    CHECK(eventually(5, [&] {
        REQUIRE(read_file(m.path("linked/s")).data == "one");
        return slurp(m.state_file("audit.jsonl")).find("\"op\":\"get\"") != std::string::npos;
    }));
    CHECK(m.daemon_stderr().find("is no longer the file the daemon writes (moved or replaced without SIGHUP)") !=
          std::string::npos);
    m.stop();
    const auto now = m.audit();
    REQUIRE_FALSE(now.empty());
    CHECK(now.front()["op"] == "rotate");
    // The old file ends signed, and the two verify as one chain.
    const std::string key = " --public-key " + m.state_file("audit-signing.pub.pem");
    auto v = shell(m.binary + " audit verify" + key + " " + hidden + " " + m.state_file("audit.jsonl"));
    INFO(v.data);
    CHECK(v.err == 0);
}

namespace {

// Records chained by the published rule (docs/audit.md "The audit trail"): what
// anyone who can write the file can append. `step_us` moves each record's
// time on from the last one's (negative: backwards).
void append_forged(const std::string& file, int count, long long step_us)
{
    std::ifstream in(file);
    std::string line, last;
    while (std::getline(in, line))
        if (!line.empty())
            last = line;
    auto prev = nlohmann::json::parse(last);
    std::uint64_t seq = prev["seq"];
    std::string hash = prev["hash"];
    // "2026-12-07T17:43:20.262514Z" as microseconds since the epoch, and back.
    std::tm tm{};
    int micros = 0;
    REQUIRE(std::sscanf(prev["time"].get<std::string>().c_str(), "%d-%d-%dT%d:%d:%d.%6dZ", &tm.tm_year, &tm.tm_mon,
                        &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &micros) == 7);
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    long long t = static_cast<long long>(::timegm(&tm)) * 1000000 + micros;
    std::ofstream out(file, std::ios::app);
    for (int i = 0; i < count; ++i) {
        t += step_us;
        const std::time_t secs = static_cast<std::time_t>(t / 1000000);
        std::tm at{};
        ::gmtime_r(&secs, &at);
        char time[40];
        std::snprintf(time, sizeof time, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", at.tm_year + 1900, at.tm_mon + 1,
                      at.tm_mday, at.tm_hour, at.tm_min, at.tm_sec, t % 1000000);
        const std::string body = "{\"seq\":" + std::to_string(++seq) + ",\"time\":\"" + time +
                                 "\",\"op\":\"get\",\"uid\":0,\"gid\":0,\"vault\":\"forged\",\"secret\":\"s\","
                                 "\"decision\":\"allow\",\"rule\":\"1: allow uid:0 *\",\"result\":\"ok\",\"prev\":\"" +
                                 hash + "\"}";
        unsigned char d[32];
        SHA256(reinterpret_cast<const unsigned char*>(body.data()), body.size(), d);
        hash.clear();
        for (unsigned char c : d) {
            char b[3];
            std::snprintf(b, sizeof b, "%02x", c);
            hash += b;
        }
        out << body.substr(0, body.size() - 1) << ",\"hash\":\"" << hash << "\"}\n";
    }
}

}  // namespace

TEST_CASE("attack: records chained onto the trail after kill -9 are unproven until an admin acknowledges them; the "
          "next start names them and never covers them",
          "[fs][audit][attack]")
{
    Mount m;
    REQUIRE(make_dir(m.path("audited")).err == 0);
    REQUIRE(write_file(m.path("audited/s"), "x").err == 0);
    // Synced and anchored: what the daemon wrote is vouched for.
    REQUIRE(eventually(10, [&] {
        const auto anchored = shell("sqlite3 " + m.state_file("vault.db") + " 'SELECT seq FROM audit_anchor'");
        return anchored.err == 0 && !anchored.data.empty() &&
               std::stoull(anchored.data) == m.audit().back()["seq"].get<std::uint64_t>();
    }));
    REQUIRE(shell(m.binary + " audit verify --state " + m.state).err == 0);
    m.kill_daemon();
    const std::uint64_t last = m.audit().back()["seq"];
    append_forged(m.state_file("audit.jsonl"), 300, 1000);
    const std::string range = std::to_string(last + 1) + "–" + std::to_string(last + 300);
    // While the daemon is down: the range is named, verify fails.
    auto down = shell(m.binary + " audit verify --state " + m.state);
    INFO(down.data);
    CHECK(down.err == 1);
    CHECK(down.data.find("records " + range + " follow the last signature, and the daemon stopped without a clean "
                         "shutdown") != std::string::npos);
    CHECK(unproven_through(down.data) == last + 300);
    // The next start names them in its signed record, and covers none of
    // them as its own: verify still fails, now at the start record.
    m.start();
    const auto start = m.last_audit("start");
    CHECK(start["unproven_from"] == last + 1);
    CHECK(start["unproven_through"] == last + 300);
    CHECK(start["clean"] == false);
    auto up = shell(m.binary + " audit verify --state " + m.state);
    INFO(up.data);
    CHECK(up.err == 1);
    CHECK(up.data.find("records " + range + " were written after the last signature before an unclean stop") !=
          std::string::npos);
    // Acknowledging less than the range leaves it failing; a seq the trail
    // has not reached is refused.
    CHECK(shell(m.binary + " audit acknowledge --through " + std::to_string(last + 100) + " --state " + m.state)
              .err == 0);
    CHECK(shell(m.binary + " audit verify --state " + m.state).err == 1);
    auto beyond = shell(m.binary + " audit acknowledge --through 99999999 --state " + m.state + " 2>&1");
    CHECK(beyond.err != 0);
    CHECK(beyond.data.find("is not a record of this trail") != std::string::npos);
    // The admin's word, a signed record naming who gave it: verify passes,
    // and says what was acknowledged.
    auto ack = shell(m.binary + " audit acknowledge --through " + std::to_string(last + 300) + " --state " + m.state);
    INFO(ack.data);
    CHECK(ack.err == 0);
    const auto rec = m.last_audit("acknowledge");
    CHECK(rec["through"] == last + 300);
    CHECK(rec["uid"] == 0);
    CHECK(rec.contains("sig"));
    auto after = shell(m.binary + " audit verify --state " + m.state);
    INFO(after.data);
    CHECK(after.err == 0);
    CHECK(after.data.find("warning: records " + range + " were written after the last signature before an unclean "
                          "stop; an admin acknowledged them") != std::string::npos);
}

TEST_CASE("attack: records whose times go backwards fail verification", "[fs][audit][attack]")
{
    Mount m;
    REQUIRE(make_dir(m.path("audited")).err == 0);
    m.kill_daemon();
    append_forged(m.state_file("audit.jsonl"), 2, -5000000);
    auto v = shell(m.binary + " audit verify --public-key " + m.state_file("audit-signing.pub.pem") + " " +
                   m.state_file("audit.jsonl"));
    INFO(v.data);
    CHECK(v.err == 1);
    CHECK(v.data.find("time goes backwards") != std::string::npos);
}
