// Unit tests for monitoring's parts in vault/: the RFC 5424 form of a record
// and a Shipper sending it to a real UDP socket, the Prometheus text of the
// metrics, and the audit reader's times, filters and slices.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "vault/audit/format.hpp"
#include "vault/audit/log.hpp"
#include "vault/audit/reader.hpp"
#include "vault/audit/shipping.hpp"
#include "vault/monitor/metrics.hpp"
#include "vault/state/state.hpp"

#include <sys/stat.h>

#include <filesystem>

namespace vaultfs::vault {
namespace {

std::string record(std::uint64_t seq, const std::string& op, const std::string& extra, bool signed_record = false)
{
    // Not a chained record: what rfc5424 and the reader read, not verify.
    std::string body = "{\"seq\":" + std::to_string(seq) + ",\"time\":\"2026-12-04T10:00:0" + std::to_string(seq % 10) +
                       ".000000Z\",\"op\":\"" + op + "\"" + extra + ",\"prev\":\"" + std::string(64, '0') + "\"}";
    if (!signed_record)
        return audit::seal(body).text;
    const std::vector<std::uint8_t> sig(64, 7);
    return audit::seal(body, sig).text;
}

TEST_CASE("a record as RFC 5424: priority from facility and outcome, op as MSGID, fields as structured data, the line "
          "as MSG",
          "[audit][shipping]")
{
    const std::string line = record(42, "get",
                                    ",\"vault\":\"pay\",\"secret\":\"db]\\\"x\",\"version\":3,\"uid\":1001,\"gid\":"
                                    "1001,\"pid\":77,\"decision\":\"deny\",\"result\":\"EACCES\"");
    const std::string m = audit::rfc5424(line, 20, "host1");
    // local4 (20) * 8 + notice (5) for a refusal
    CHECK(m.rfind("<165>1 2026-12-04T10:00:02.000000Z host1 vaultfs-audit ", 0) == 0);
    CHECK(m.find(" get [vaultfs@32473 seq=\"42\" op=\"get\" uid=\"1001\" gid=\"1001\" pid=\"77\" vault=\"pay\" "
                 "secret=\"db\\]\\\"x\" version=\"3\" decision=\"deny\" result=\"EACCES\" signed=\"0\"] ") !=
          std::string::npos);
    CHECK(m.size() > line.size());
    CHECK(m.compare(m.size() - line.size(), line.size(), line) == 0);
    // info for what was allowed and done, warning for a failure
    CHECK(audit::rfc5424(record(1, "get", ",\"decision\":\"allow\",\"result\":\"ok\""), 21, "h").rfind("<174>1 ", 0) == 0);
    CHECK(audit::rfc5424(record(1, "get", ",\"decision\":\"allow\",\"result\":\"EIO\""), 21, "h").rfind("<172>1 ", 0) == 0);
    CHECK(audit::rfc5424(record(1, "checkpoint", "", true), 21, "h").find("signed=\"1\"]") != std::string::npos);
}

TEST_CASE("syslog targets and facilities parse as the config writes them", "[audit][shipping]")
{
    auto t = audit::parse_syslog_target("udp:[::1]:514");
    REQUIRE(t);
    CHECK(t->host == "::1");
    CHECK(t->port == "514");
    CHECK(audit::render_syslog_target(*t) == "udp:[::1]:514");
    CHECK(audit::render_syslog_target(*audit::parse_syslog_target("tcp:logs.example:6514")) == "tcp:logs.example:6514");
    CHECK_FALSE(audit::parse_syslog_target("tcp::514"));
    CHECK_FALSE(audit::parse_syslog_target("udp:h:0"));
    CHECK(*audit::parse_facility("local7") == 23);
    CHECK(audit::facility_name(10) == "authpriv");
    CHECK_FALSE(audit::parse_facility("LOCAL7"));
}

TEST_CASE("a Shipper sends each record as one datagram to a real UDP socket; a full queue drops and counts",
          "[audit][shipping]")
{
    const int rx = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    REQUIRE(rx >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    REQUIRE(::bind(rx, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::getsockname(rx, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    const std::string port = std::to_string(ntohs(a.sin_port));
    {
        audit::SyslogTarget target = *audit::parse_syslog_target("udp:127.0.0.1:" + port);
        target.facility = 21;
        audit::Shipper shipper(target);
        for (std::uint64_t i = 1; i <= 3; ++i)
            shipper.enqueue(record(i, "get", ",\"decision\":\"allow\",\"result\":\"ok\"") + "\n");
        REQUIRE(shipper.drain(std::chrono::seconds(5)));
        for (std::uint64_t i = 1; i <= 3; ++i) {
            pollfd p{rx, POLLIN, 0};
            REQUIRE(::poll(&p, 1, 5000) == 1);
            char buf[4096];
            const ssize_t n = ::recv(rx, buf, sizeof buf, 0);
            REQUIRE(n > 0);
            const std::string got(buf, static_cast<std::size_t>(n));
            CHECK(got.rfind("<174>1 ", 0) == 0);
            CHECK(got.find("seq=\"" + std::to_string(i) + "\"") != std::string::npos);
            CHECK(got.back() == '}');  // the line without its newline
        }
        const auto s = shipper.stats();
        CHECK(s.shipped == 3);
        CHECK(s.dropped == 0);
        CHECK(s.queued == 0);
    }
    {
        // A queue of one behind a worker stuck on nothing to connect to: the
        // writer never waits, the overflow is counted.
        audit::SyslogTarget target = *audit::parse_syslog_target("tcp:127.0.0.1:1");
        target.queue = 1;
        audit::Shipper shipper(target);
        for (int i = 0; i < 50; ++i)
            shipper.enqueue(record(1, "get", ""));
        REQUIRE(shipper.drain(std::chrono::seconds(5)));
        const auto s = shipper.stats();
        CHECK(s.shipped == 0);
        CHECK(s.dropped == 50);
        CHECK(s.errors >= 1);
    }
    ::close(rx);
}

TEST_CASE("metrics: counters from audit events, denial reasons, escaped labels", "[monitor][metrics]")
{
    monitor::Metrics m;
    const Caller* none = nullptr;
    m.count(audit::Event{.op = "get", .caller = none, .vault = "pay", .secret = "a", .allowed = true, .result = "ok", .bytes = 5});
    m.count(audit::Event{.op = "get", .vault = "pay", .allowed = true, .result = "ok", .bytes = 7});
    m.count(audit::Event{.op = "get", .vault = "pay", .allowed = false, .rule = "3: deny uid:7 get", .result = "EACCES"});
    m.count(audit::Event{.op = "set", .vault = "we\"ird", .allowed = true, .result = "ok"});
    m.count(audit::Event{.op = "commit", .vault = "pay", .allowed = true, .result = "EFBIG"});
    m.count(audit::Event{.op = "lookup", .vault = "pay", .allowed = false, .rule = "holds-nothing", .result = "ENOENT", .coalesce = true});
    monitor::Metrics::Gauges g;
    const std::string text = m.render(g);
    CHECK(text.find("vaultfs_opens_total{vault=\"pay\",mode=\"read\",result=\"ok\"} 2\n") != std::string::npos);
    CHECK(text.find("vaultfs_opens_total{vault=\"pay\",mode=\"read\",result=\"EACCES\"} 1\n") != std::string::npos);
    CHECK(text.find("vaultfs_opens_total{vault=\"we\\\"ird\",mode=\"write\",result=\"ok\"} 1\n") != std::string::npos);
    CHECK(text.find("vaultfs_read_bytes_total{vault=\"pay\"} 12\n") != std::string::npos);
    CHECK(text.find("vaultfs_writes_total{vault=\"pay\",result=\"EFBIG\"} 1\n") != std::string::npos);
    CHECK(text.find("vaultfs_denials_total{reason=\"deny-rule\"} 1\n") != std::string::npos);
    CHECK(text.find("vaultfs_denials_total{reason=\"holds-nothing\"} 1\n") != std::string::npos);
    CHECK(monitor::denial_reason("default-deny") == "default-deny");
    CHECK(monitor::denial_reason("needs get or list") == "missing-permission");
    CHECK(monitor::denial_reason("2: allow group:ops list") == "missing-permission");
    CHECK(monitor::denial_reason("12: deny uid:7 *") == "deny-rule");
    CHECK(monitor::label_value("a\\b\nc") == "a\\\\b\\nc");
}

TEST_CASE("the metrics textfile's mode is 0644 whatever the umask (the unit's is 0077)", "[monitor][metrics]")
{
    std::string dir = (std::filesystem::temp_directory_path() / "vaultfs-prom-XXXXXX").string();
    REQUIRE(::mkdtemp(dir.data()) != nullptr);
    const mode_t old = ::umask(0077);
    const auto r = replace_file(dir + "/vaultfs.prom", "vaultfs_up 1\n", 0644);
    ::umask(old);
    REQUIRE(r);
    struct stat st{};
    REQUIRE(::stat((dir + "/vaultfs.prom").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0644);
    std::filesystem::remove_all(dir);
}

TEST_CASE("audit reader: command-line times, filters", "[audit][reader]")
{
    const Micros now = *audit::parse_time("2026-12-04T12:00:00.000000Z");
    CHECK(audit::parse_when("2026-12-04T10:00:00Z", now) == audit::parse_time("2026-12-04T10:00:00.000000Z"));
    CHECK(audit::parse_when("2026-12-04", now) == audit::parse_time("2026-12-04T00:00:00.000000Z"));
    CHECK(audit::parse_when("2h", now) == audit::parse_time("2026-12-04T10:00:00.000000Z"));
    CHECK(audit::parse_when("7d", now) == audit::parse_time("2026-11-27T12:00:00.000000Z"));
    CHECK_FALSE(audit::parse_when("yesterday", now));
    CHECK_FALSE(audit::parse_when("-2h", now));
    auto r = audit::parse(record(3, "get", ",\"vault\":\"pay\",\"uid\":1001"));
    REQUIRE(r);
    audit::Filter f;
    CHECK(f.matches(*r));
    f.vaults = {"other", "pay"};
    f.uids = {1001};
    f.ops = {"get"};
    CHECK(f.matches(*r));
    f.uids = {0};
    CHECK_FALSE(f.matches(*r));
    f.uids.clear();
    f.since = audit::parse_time("2026-12-04T10:00:04.000000Z");
    CHECK_FALSE(f.matches(*r));
    CHECK(audit::human(*r) == "2026-12-04T10:00:03.000000Z #3 get uid=1001 pay");
}

}  // namespace
}  // namespace vaultfs::vault
