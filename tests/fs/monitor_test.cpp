// Monitoring (docs/operations.md "Monitoring"): the audit shipped to a real rsyslogd,
// metrics checked by a real promtool, expiry warnings, `audit tail`,
// `audit export` with `audit verify --slice`, and `vaultfs status`'s exit
// codes.

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <thread>

#include "../support/rsyslog.hpp"
#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

std::vector<std::string> lines_of(const std::string& text)
{
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);)
        out.push_back(l);
    return out;
}

// The raw lines of the live audit file.
std::vector<std::string> audit_lines(const Mount& m) { return lines_of(slurp(m.state_file("audit.jsonl"))); }

// A metric's value from Prometheus text: NAME{LABELS} exactly as rendered.
std::optional<double> metric(const std::string& text, const std::string& series)
{
    for (const auto& l : lines_of(text))
        if (l.size() > series.size() && l.compare(0, series.size(), series) == 0 && l[series.size()] == ' ')
            return std::stod(l.substr(series.size() + 1));
    return std::nullopt;
}

std::string rfc3339(std::time_t t)
{
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
    return buf;
}

// A temporary directory every uid can reach; removed at the end.
struct TempDir {
    std::string path;
    TempDir()
    {
        path = (std::filesystem::temp_directory_path() / "vaultfs-mon-XXXXXX").string();
        if (::mkdtemp(path.data()) == nullptr)
            throw std::runtime_error("mkdtemp");
        ::chmod(path.c_str(), 0777);
    }
    ~TempDir()
    {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

// A command run in the background with its stdout in a file, killed by pid.
struct Background {
    pid_t pid = -1;
    std::string out;
    Background(const std::vector<std::string>& argv, std::string out_file) : out(std::move(out_file))
    {
        pid = ::fork();
        if (pid == 0) {
            const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            ::dup2(fd, 1);
            std::vector<char*> args;
            for (const auto& a : argv)
                args.push_back(const_cast<char*>(a.c_str()));
            args.push_back(nullptr);
            ::execv(args[0], args.data());
            ::_exit(127);
        }
    }
    ~Background()
    {
        if (pid > 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
        }
    }
};

}  // namespace

TEST_CASE("audit shipping: every record reaches a real rsyslogd as RFC 5424 with structured data, and a dead server "
          "never blocks a read",
          "[monitor][shipping]")
{
    RsyslogServer syslog;
    TestUser user("shp");
    MountOptions o;
    o.config_lines = {"audit_syslog = tcp:127.0.0.1:" + std::to_string(syslog.port()), "audit_syslog_facility = local4"};
    Mount m(o);
    REQUIRE(make_dir(m.path("shipped")).err == 0);
    REQUIRE(write_file(m.path("shipped/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(user.uid) + " list\n")
                .err == 0);
    REQUIRE(write_file(m.path("shipped/db-password"), "hunter2").err == 0);
    REQUIRE(ok(read_file(m.path("shipped/db-password"))) == "hunter2");
    REQUIRE(as(user, [&] { return read_file(m.path("shipped/db-password")); }).err == EACCES);

    // Every record the daemon wrote arrives, each once, its line as it is in
    // the file (`init` was written by `vaultfs init`, before shipping).
    auto wanted = audit_lines(m);
    REQUIRE(nlohmann::json::parse(wanted.front())["op"] == "init");
    wanted.erase(wanted.begin());
    REQUIRE(wanted.size() >= 5);
    std::map<std::string, std::string> got;  // seq -> received line
    const std::regex seq_re(R"re(\[vaultfs@32473 seq="(\d+)")re");
    const bool arrived = eventually(15, [&] {
        got.clear();
        for (const auto& l : lines_of(syslog.received())) {
            std::smatch sm;
            if (std::regex_search(l, sm, seq_re))
                got[sm[1]] = l;
        }
        return got.size() >= wanted.size();
    });
    INFO("received:\n" << syslog.received() << "daemon:\n" << m.daemon_stderr());
    REQUIRE(arrived);
    for (const auto& line : wanted) {
        const auto rec = nlohmann::json::parse(line);
        const std::string seq = std::to_string(rec["seq"].get<std::uint64_t>());
        INFO(line);
        REQUIRE(got.count(seq) == 1);
        const std::string& r = got[seq];
        const std::string op = rec["op"];
        CHECK(r.rfind("local4 vaultfs-audit " + op + " [vaultfs@32473 seq=\"" + seq + "\" op=\"" + op + "\"", 0) == 0);
        // The MSG is the record's exact line: what `audit verify` checks.
        CHECK(r.size() > line.size());
        CHECK(r.compare(r.size() - line.size(), line.size(), line) == 0);
        CHECK(r.find("hunter2") == std::string::npos);
    }
    // The refusal is routable by its fields.
    const auto denied = m.last_audit("get", user.uid);
    const std::string& d = got[std::to_string(denied["seq"].get<std::uint64_t>())];
    CHECK(d.find(" uid=\"" + std::to_string(user.uid) + "\"") != std::string::npos);
    CHECK(d.find(" vault=\"shipped\" secret=\"db-password\"") != std::string::npos);
    CHECK(d.find(" decision=\"deny\" result=\"EACCES\"") != std::string::npos);

    const auto metrics = shell(m.binary + " metrics --state " + m.state);
    REQUIRE(metrics.err == 0);
    CHECK(metric(metrics.data, "vaultfs_audit_ship_dropped_total") == 0);
    CHECK(metric(metrics.data, "vaultfs_audit_shipped_total") >= static_cast<double>(wanted.size()));

    // The server goes: reads and writes go on, audited in the file; what
    // cannot be sent is counted as dropped.
    syslog.kill();
    for (int i = 0; i < 5; ++i) {
        REQUIRE(write_file(m.path("shipped/after-" + std::to_string(i)), "v").err == 0);
        REQUIRE(ok(read_file(m.path("shipped/after-" + std::to_string(i)))) == "v");
    }
    CHECK(m.last_audit("get")["secret"] == "after-4");
    REQUIRE(eventually(10, [&] {
        const auto after = shell(m.binary + " metrics --state " + m.state).data;
        // (The `metrics` request's own record may be waiting for the next batch.)
        return metric(after, "vaultfs_audit_ship_dropped_total").value_or(0) > 0 &&
               metric(after, "vaultfs_audit_ship_queued").value_or(99) <= 1;
    }));
    CHECK(m.verify().err == 0);
}

TEST_CASE("metrics: counts match the audit, promtool accepts the text and the textfile, gauges of open files and "
          "expiry",
          "[monitor][metrics]")
{
    TempDir dir;
    const std::string textfile = dir.path + "/vaultfs.prom";
    TestUser reader("mtr");
    TestUser outsider("mto");
    MountOptions o;
    o.config_lines = {"metrics_textfile = " + textfile, "metrics_interval_seconds = 1"};
    Mount m(o);
    REQUIRE(make_dir(m.path("metered")).err == 0);
    REQUIRE(write_file(m.path("metered/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(reader.uid) + " get\n")
                .err == 0);
    REQUIRE(write_file(m.path("metered/api-key"), "k1").err == 0);
    REQUIRE(write_file(m.path("metered/api-key"), "k2").err == 0);
    const std::time_t expires = std::time(nullptr) + 100 * 86400;
    REQUIRE(set_xattr(m.path("metered/api-key"), "user.vault.expires", rfc3339(expires)).err == 0);
    for (int i = 0; i < 3; ++i)
        REQUIRE(ok(as(reader, [&] { return read_file(m.path("metered/api-key")); })) == "k2");
    // Who holds nothing in the vault finds nothing there; who may only read cannot write.
    CHECK(as(outsider, [&] { return read_file(m.path("metered/api-key")); }).err == ENOENT);
    CHECK(as(reader, [&] { return write_file(m.path("metered/api-key"), "mine"); }).err == EACCES);
    CHECK(as(reader, [&] { return read_file(m.path("metered/missing")); }).err == ENOENT);

    // A reader holding the file open.
    Paused held(
        &reader,
        [&] {
            const int fd = ::open(m.path("metered/api-key").c_str(), O_RDONLY);
            return fd < 0 ? Outcome{errno, "open"} : Outcome{};
        },
        [&] { return Outcome{}; });
    REQUIRE(held.first().err == 0);

    const auto out = shell(m.binary + " metrics --state " + m.state);
    REQUIRE(out.err == 0);
    const std::string& text = out.data;
    INFO(text);
    // What the audit says happened, counted from the file.
    std::map<std::string, int> gets, sets;
    int commits = 0;
    for (const auto& r : m.audit()) {
        if (r["op"] == "get" && r["vault"] == "metered")
            ++gets[r["result"].get<std::string>()];
        if (r["op"] == "set" && r["vault"] == "metered")
            ++sets[r["result"].get<std::string>()];
        if (r["op"] == "commit" && r["vault"] == "metered" && r["result"] == "ok")
            ++commits;
    }
    CHECK(gets["ok"] == 4);  // three reads, and the held open
    CHECK(metric(text, R"(vaultfs_opens_total{vault="metered",mode="read",result="ok"})") == gets["ok"]);
    CHECK(sets["EACCES"] == 1);
    CHECK(metric(text, R"(vaultfs_opens_total{vault="metered",mode="write",result="EACCES"})") == sets["EACCES"]);
    CHECK(metric(text, R"(vaultfs_read_bytes_total{vault="metered"})") == 2.0 * gets["ok"]);
    CHECK(metric(text, R"(vaultfs_writes_total{vault="metered",result="ok"})") == commits);
    CHECK(commits == 2);  // two versions
    CHECK(metric(text, R"(vaultfs_denials_total{reason="holds-nothing"})") >= 1);
    // Every refusal is counted: those written, and those the audit coalesced.
    int denied_records = 0;
    for (const auto& r : m.audit())
        if (r["decision"] == "deny" && r["result"] != "ok" && r["op"] != "repeats")
            ++denied_records;
    double denials = 0;
    for (const auto& l : lines_of(text))
        if (l.rfind("vaultfs_denials_total{", 0) == 0)
            denials += std::stod(l.substr(l.rfind(' ') + 1));
    CHECK(denials == denied_records + metric(text, "vaultfs_audit_refusals_coalesced_total").value_or(-1));
    CHECK(metric(text, "vaultfs_open_handles") == 1);
    CHECK(metric(text, R"(vaultfs_expiry_timestamp_seconds{vault="metered",name="api-key",kind="secret"})") ==
          static_cast<double>(expires));
    CHECK(metric(text, "vaultfs_expiring_soon") == 0);
    CHECK(metric(text, "vaultfs_token_up") == 1);
    CHECK(metric(text, "vaultfs_audit_up") == 1);
    CHECK(metric(text, R"(vaultfs_token_operation_seconds_count{op="sign"})").value_or(0) >= 1);
    CHECK(metric(text, R"(vaultfs_token_operation_seconds_count{op="seal"})").value_or(0) >= 2);
    const double hits = metric(text, "vaultfs_dek_cache_hits_total").value_or(-1);
    const double misses = metric(text, "vaultfs_dek_cache_misses_total").value_or(-1);
    CHECK(hits + misses >= gets["ok"]);
    CHECK(hits >= 1);
    CHECK(metric(text, "vaultfs_locked_memory_bytes").value_or(0) > 0);
    CHECK(metric(text, "vaultfs_audit_records_written_total").value_or(0) >= 10);
    CHECK(text.find("k2") == std::string::npos);

    // Debian's promtool accepts it: the command's output, and the textfile.
    {
        std::ofstream f(dir.path + "/printed.prom");
        f << text;
    }
    const auto check = shell("promtool check metrics < " + dir.path + "/printed.prom 2>&1");
    INFO(check.data);
    CHECK(check.err == 0);
    REQUIRE(eventually(10, [&] { return std::filesystem::exists(textfile); }));
    struct stat st{};
    REQUIRE(::stat(textfile.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0644);
    const auto check_file = shell("promtool check metrics < " + textfile + " 2>&1");
    INFO(check_file.data);
    CHECK(check_file.err == 0);
    REQUIRE(eventually(10, [&] { return metric(slurp(textfile), "vaultfs_open_handles") == 1; }));
    REQUIRE(held.finish().err == 0);
    REQUIRE(eventually(10, [&] { return metric(slurp(textfile), "vaultfs_open_handles") == 0; }));

    // Healthy: exit 0, the verdict first.
    const auto status = shell(m.binary + " status --state " + m.state);
    CHECK(status.err == 0);
    CHECK(status.data.rfind("vaultfs OK: token ok, audit ok, store ok, 0 expiring within 30 days\n", 0) == 0);
    // A non-admin is refused the metrics (the control socket's rule).
    m.stop();
    CHECK(shell(m.binary + " status --state " + m.state + " >/dev/null 2>&1").err == 3);
}

TEST_CASE("expiry warnings: one event per lead time reached and one at expiry, audited, logged, counted and hooked; "
          "not sent again after a restart",
          "[monitor][expiry]")
{
    TempDir dir;
    const std::string fired = dir.path + "/fired";
    MountOptions o;
    o.config_lines = {"expiry_check_seconds = 1",
                      "on_expiry = expiring/* exec root echo \"$VAULTFS_EVENT $VAULTFS_KIND $VAULTFS_NAME\" >> " + fired};
    Mount m(o);
    REQUIRE(make_dir(m.path("expiring")).err == 0);
    const std::time_t now = std::time(nullptr);
    REQUIRE(write_file(m.path("expiring/far"), "f").err == 0);
    REQUIRE(write_file(m.path("expiring/month"), "m").err == 0);
    REQUIRE(write_file(m.path("expiring/week"), "w").err == 0);
    REQUIRE(write_file(m.path("expiring/now"), "n").err == 0);
    REQUIRE(set_xattr(m.path("expiring/far"), "user.vault.expires", rfc3339(now + 90 * 86400)).err == 0);
    REQUIRE(set_xattr(m.path("expiring/month"), "user.vault.expires", rfc3339(now + 20 * 86400)).err == 0);
    REQUIRE(set_xattr(m.path("expiring/week"), "user.vault.expires", rfc3339(now + 3 * 86400)).err == 0);
    const std::time_t soon = now + 4;
    REQUIRE(set_xattr(m.path("expiring/now"), "user.vault.expires", rfc3339(soon)).err == 0);
    // A key and a certificate: their current versions' expiries too.
    REQUIRE(shell(m.binary + " key create expiring/signer --type ec-p256 --expires-after 3d --state " + m.state +
                  " >/dev/null")
                .err == 0);
    REQUIRE(shell(m.binary + " cert create expiring/web --subject CN=web.test --days 20 --key ec-p256 --state " +
                  m.state + " >/dev/null")
                .err == 0);

    const auto events = [&] {
        std::vector<nlohmann::json> r;
        for (const auto& rec : m.audit())
            if (rec["op"] == "near_expiry" || rec["op"] == "expired")
                r.push_back(rec);
        return r;
    };
    const bool all_six = eventually(20, [&] { return events().size() == 6; });
    INFO(nlohmann::json(events()).dump(1) << "\n" << m.daemon_stderr());
    REQUIRE(all_six);
    REQUIRE(eventually(20, [&] { return events().size() == 6 && std::time(nullptr) > soon + 1; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // a round after expiry
    const auto all = events();
    std::map<std::string, std::vector<std::string>> by;
    for (const auto& e : all) {
        INFO(e.dump());
        CHECK(e["uid"] == 0);
        CHECK(e["vault"] == "expiring");
        CHECK(e["rule"] == "expiry-watch");
        by[e["secret"].get<std::string>()].push_back(e["op"].get<std::string>() + ": " + e["reason"].get<std::string>());
    }
    CHECK(by.count("far") == 0);
    REQUIRE(by["month"].size() == 1);
    CHECK(by["month"][0].find("near_expiry: expires at ") == 0);
    CHECK(by["month"][0].find("within the 30-day warning") != std::string::npos);
    REQUIRE(by["week"].size() == 1);  // the shortest lead reached, once
    CHECK(by["week"][0].find("within the 7-day warning") != std::string::npos);
    REQUIRE(by["now"].size() == 2);
    CHECK(by["now"][0].find("within the 7-day warning") != std::string::npos);
    CHECK(by["now"][1].find("expired: expired at ") == 0);
    REQUIRE(by[".keys/signer"].size() == 1);
    CHECK(by[".keys/signer"][0].find("within the 7-day warning") != std::string::npos);
    REQUIRE(by[".certs/web"].size() == 1);
    CHECK(by[".certs/web"][0].find("within the 30-day warning") != std::string::npos);
    CHECK(m.daemon_stderr().find("expiry: secret expiring/now version 1 expired at") != std::string::npos);
    REQUIRE(eventually(10, [&] { return lines_of(slurp(fired)).size() == 6; }));
    const auto hooked = slurp(fired);
    CHECK(hooked.find("near_expiry secret month\n") != std::string::npos);
    CHECK(hooked.find("near_expiry secret week\n") != std::string::npos);
    CHECK(hooked.find("expired secret now\n") != std::string::npos);
    CHECK(hooked.find("near_expiry key signer\n") != std::string::npos);
    CHECK(hooked.find("near_expiry certificate web\n") != std::string::npos);
    const auto metrics = shell(m.binary + " metrics --state " + m.state).data;
    CHECK(metric(metrics, R"(vaultfs_expiry_events_total{kind="secret",event="near_expiry"})") == 3);
    CHECK(metric(metrics, R"(vaultfs_expiry_events_total{kind="secret",event="expired"})") == 1);
    CHECK(metric(metrics, R"(vaultfs_expiry_events_total{kind="key",event="near_expiry"})") == 1);
    CHECK(metric(metrics, R"(vaultfs_expiry_events_total{kind="certificate",event="near_expiry"})") == 1);
    CHECK(metric(metrics, R"(vaultfs_expiry_timestamp_seconds{vault="expiring",name="web",kind="certificate"})")
              .value_or(0) > static_cast<double>(now + 19 * 86400));
    CHECK(metric(metrics, "vaultfs_expiring_soon") == 4);
    CHECK(metric(metrics, "vaultfs_expired") == 1);

    // The monitoring check: a warning, exit 1.
    const auto status = shell(m.binary + " status --state " + m.state);
    CHECK(status.err == 1);
    CHECK(status.data.rfind("vaultfs WARNING: 1 expired; 4 expiring within 30 days\n", 0) == 0);

    // A restart sends nothing again; a new version with a near expiry does.
    REQUIRE(shell(m.binary + " restart --state " + m.state).err == 0);
    std::this_thread::sleep_for(std::chrono::seconds(3));
    CHECK(events().size() == 6);
    REQUIRE(write_file(m.path("expiring/week"), "w2").err == 0);
    REQUIRE(set_xattr(m.path("expiring/week"), "user.vault.expires", rfc3339(now + 2 * 86400)).err == 0);
    REQUIRE(eventually(10, [&] { return events().size() == 7; }));
    CHECK(events().back()["secret"] == "week");
    CHECK(events().back()["version"] == 2);
}

TEST_CASE("audit tail filters and follows across a rotation; audit export writes a slice audit verify --slice accepts",
          "[monitor][tail]")
{
    TempDir dir;
    TestUser user("tal");
    MountOptions o;
    o.config_lines = {"audit_checkpoint_seconds = 1"};
    Mount m(o);
    REQUIRE(make_dir(m.path("tailed")).err == 0);
    REQUIRE(write_file(m.path("tailed/.policy"), "allow uid:0 *\nallow uid:" + std::to_string(user.uid) + " list\n")
                .err == 0);
    REQUIRE(write_file(m.path("tailed/one"), "1").err == 0);
    REQUIRE(as(user, [&] { return read_file(m.path("tailed/one")); }).err == EACCES);

    // The last N, as written.
    const auto last3 = shell(m.binary + " audit tail --state " + m.state + " -n 3 --json");
    REQUIRE(last3.err == 0);
    const auto file = audit_lines(m);
    const auto printed = lines_of(last3.data);
    REQUIRE(printed.size() == 3);
    // (A checkpoint may have come after them since: the bound here is 1 s.)
    const auto at = std::find(file.begin(), file.end(), printed[0]);
    REQUIRE(file.end() - at >= 3);
    CHECK(std::vector<std::string>(at, at + 3) == printed);
    CHECK(file.end() - at <= 4);

    // Filters, for people.
    const auto mine = shell(m.binary + " audit tail --state " + m.state + " --uid " + user.name + " --op get");
    REQUIRE(mine.err == 0);
    const auto mine_lines = lines_of(mine.data);
    REQUIRE(mine_lines.size() == 1);
    CHECK(mine_lines[0].find(" get deny EACCES uid=" + std::to_string(user.uid)) != std::string::npos);
    CHECK(mine_lines[0].find(" tailed/one") != std::string::npos);
    CHECK(shell(m.binary + " audit tail --state " + m.state + " --vault nosuch").data.empty());
    CHECK(shell(m.binary + " audit tail --state " + m.state + " --since yesterday-ish 2>/dev/null").err == 1);

    // -f: records as they come, across logrotate's rename and SIGHUP.
    // From here on, to the microsecond, in the form records carry.
    const auto t0 = std::chrono::system_clock::now();
    const std::time_t t0_s = std::chrono::system_clock::to_time_t(t0);
    const auto t0_us = std::chrono::duration_cast<std::chrono::microseconds>(t0.time_since_epoch()).count() % 1000000;
    char start[40];
    std::strftime(start, sizeof start, "%Y-%m-%dT%H:%M:%S", std::gmtime(&t0_s));
    const std::string since_text = std::string(start) + "." + std::to_string(1000000 + t0_us).substr(1) + "Z";
    // --since rather than -n 0: what comes from t0 on is followed, however
    // late the follower starts reading.
    Background follow({m.binary, "audit", "tail", "-f", "--since", since_text, "--state", m.state, "--op", "commit",
                       "--json"},
                      dir.path + "/followed");
    REQUIRE(write_file(m.path("tailed/two"), "2").err == 0);
    REQUIRE(eventually(10, [&] { return lines_of(slurp(follow.out)).size() == 1; }));
    std::filesystem::rename(m.state_file("audit.jsonl"), m.state_file("audit.jsonl.1"));
    REQUIRE(::kill(m.daemon_pid(), SIGHUP) == 0);
    REQUIRE(write_file(m.path("tailed/three"), "3").err == 0);
    REQUIRE(eventually(10, [&] { return lines_of(slurp(follow.out)).size() == 2; }));
    const auto followed = lines_of(slurp(follow.out));
    CHECK(nlohmann::json::parse(followed[0])["secret"] == "two");
    CHECK(nlohmann::json::parse(followed[1])["secret"] == "three");
    // The new file began with the signed rotate record.
    CHECK(nlohmann::json::parse(audit_lines(m).front())["op"] == "rotate");

    // --since reads the rotated file too.
    const auto since = shell(m.binary + " audit tail --state " + m.state + " --since 1h --op commit --json");
    const auto commits = lines_of(since.data);
    REQUIRE(commits.size() >= 3);
    CHECK(nlohmann::json::parse(commits[commits.size() - 2])["secret"] == "two");
    CHECK(nlohmann::json::parse(commits.back())["secret"] == "three");

    // Export: once a checkpoint covers `three`, the slice holds it and
    // `two`, across the rotation, and verifies on its own.
    REQUIRE(eventually(10, [&] { return nlohmann::json::parse(audit_lines(m).back()).contains("sig"); }));
    const std::string slice = dir.path + "/slice.jsonl";
    const auto exported = shell(m.binary + " audit export --state " + m.state + " --since " + since_text +
                                " -o " + slice + " 2>&1");
    INFO(exported.data);
    REQUIRE(exported.err == 0);
    struct stat st{};
    REQUIRE(::stat(slice.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    const auto slice_lines = lines_of(slurp(slice));
    REQUIRE(slice_lines.size() >= 4);
    CHECK(nlohmann::json::parse(slice_lines.front()).contains("sig"));
    CHECK(nlohmann::json::parse(slice_lines.back()).contains("sig"));
    const std::string all = slurp(slice);
    CHECK(all.find("\"secret\":\"two\"") != std::string::npos);
    CHECK(all.find("\"secret\":\"three\"") != std::string::npos);
    CHECK(all.find("\"op\":\"rotate\"") != std::string::npos);
    const auto verified = shell(m.binary + " audit verify --slice --state " + m.state + " " + slice);
    INFO(verified.data);
    CHECK(verified.err == 0);
    CHECK(verified.data.rfind("OK: slice of " + std::to_string(slice_lines.size()) + " records", 0) == 0);
    // With the public key alone, as an archive is checked elsewhere.
    CHECK(shell(m.binary + " audit verify --slice --public-key " + m.state_file("audit-signing.pub.pem") + " " + slice +
                " >/dev/null")
              .err == 0);
    // Not a slice: without --slice it starts in the middle of the chain.
    CHECK(shell(m.binary + " audit verify --public-key " + m.state_file("audit-signing.pub.pem") + " " + slice +
                " >/dev/null")
              .err == 1);
    // Edited, or cut after its last signature: refused.
    {
        std::string edited = all;
        const auto at = edited.find("\"secret\":\"two\"");
        edited.replace(at, 14, "\"secret\":\"twx\"");
        std::ofstream(dir.path + "/edited.jsonl") << edited;
        const auto r = shell(m.binary + " audit verify --slice --state " + m.state + " " + dir.path + "/edited.jsonl");
        CHECK(r.err == 1);
        CHECK(r.data.find("FAILED") != std::string::npos);
        std::string cut;
        for (std::size_t i = 0; i + 1 < slice_lines.size(); ++i)
            cut += slice_lines[i] + "\n";
        std::ofstream(dir.path + "/cut.jsonl") << cut;
        const auto c = shell(m.binary + " audit verify --slice --state " + m.state + " " + dir.path + "/cut.jsonl");
        CHECK(c.err == 1);
        CHECK(c.data.find("no signature covers") != std::string::npos);
    }
    // The trail itself: the rotated file, then the live one.
    CHECK(shell(m.binary + " audit verify --state " + m.state + " " + m.state_file("audit.jsonl.1") + " " +
                m.state_file("audit.jsonl") + " >/dev/null")
              .err == 0);
}

TEST_CASE("audit tail says when it skips lines that are not intact records, and exits 1", "[monitor][tail]")
{
    Mount m;
    REQUIRE(make_dir(m.path("tampered")).err == 0);
    REQUIRE(write_file(m.path("tampered/s"), "x").err == 0);
    m.stop();
    // One record edited (its hash no longer matches), one line of garbage.
    auto lines = audit_lines(m);
    REQUIRE(lines.size() > 4);
    std::size_t edited = lines.size() - 2;
    while (edited > 0 && lines[edited].find("\"uid\":0") == std::string::npos)
        --edited;
    const auto at = lines[edited].find("\"uid\":0");
    REQUIRE(at != std::string::npos);
    lines[edited].replace(at, 7, "\"uid\":7");
    lines.push_back("not a record");
    {
        std::ofstream out(m.state_file("audit.jsonl"), std::ios::trunc);
        for (const auto& l : lines)
            out << l << "\n";
    }
    const auto r = shell(m.binary + " audit tail --state " + m.state + " -n 100 --json 2>" + m.root + "/tail.err");
    CHECK(r.err == 1);
    const std::string err = slurp(m.root + "/tail.err");
    CHECK(err.find("vaultfs: skipped a line that is not an intact audit record (") != std::string::npos);
    CHECK(err.find("vaultfs: 2 line(s) skipped: not intact audit records") != std::string::npos);
    const auto printed = lines_of(r.data);
    CHECK(printed.size() == lines.size() - 2);
    CHECK(std::find(printed.begin(), printed.end(), lines[edited]) == printed.end());
}
