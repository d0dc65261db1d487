// Several hosts on one PostgreSQL store (docs/hosts.md "Several hosts"), with the
// real parts: a PostgreSQL 15 server of the test's own (and a streaming
// standby), two or three daemons with their own state directories, tokens
// and mountpoints, the key ceremony run with the CLI as an admin would.
#include <openssl/sha.h>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include <sys/stat.h>
#include <thread>

#include "fs_support.hpp"
#include "tests/support/postgres.hpp"

namespace vaultfs::testing {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// The documented default staleness bound, and what a poll from the test
// adds to it (each poll of another uid's read forks a process).
constexpr milliseconds delta{2000};
constexpr milliseconds poll_slack{500};

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// Polls `done` until it holds or `limit` passes; how long it took (or nullopt).
template <class F>
std::optional<milliseconds> within(milliseconds limit, F&& done)
{
    const auto start = Clock::now();
    for (;;) {
        if (done())
            return std::chrono::duration_cast<milliseconds>(Clock::now() - start);
        if (Clock::now() - start > limit)
            return std::nullopt;
        std::this_thread::sleep_for(milliseconds(20));
    }
}

// A host of the store: a state and a mountpoint of its own (not yet made).
struct Host {
    explicit Host(const std::string& name) : name(name), mount(MountOptions{.init = false}) {}
    Outcome cli(const std::string& args) const
    {
        return shell(mount.binary + " " + args + " --state " + mount.state + " 2>" + mount.root + "/cli.stderr");
    }
    // The SO step's PIN: init kept the embedded token's in STATE/so-pin.
    std::string so() const { return " --so-pin-file " + mount.state + "/so-pin "; }
    std::string cli_stderr() const { return slurp(mount.root + "/cli.stderr"); }
    std::string name;
    Mount mount;
};

// A join request with its transport key swapped for another's, and the
// fingerprint recomputed as the format defines it (docs/hosts.md "Several hosts"):
// well-formed, but not the key that host registered.
std::string with_transport_of(const std::string& request, const std::string& other)
{
    json r = json::parse(request);
    r["transport_public"] = json::parse(other)["transport_public"];
    const std::string text = "vaultfs join request v1\n" + r["host"].get<std::string>() + "\n" +
                             r["transport_public"].get<std::string>() + "\n" + r["signing_public"].get<std::string>() +
                             "\n" + r["nonce"].get<std::string>();
    unsigned char d[32];
    SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), d);
    std::string fp;
    for (int i = 0; i < 32; ++i) {
        char b[3];
        std::snprintf(b, sizeof b, "%02x", d[i]);
        if (i > 0 && i % 4 == 0)
            fp += '-';
        fp += b;
    }
    r["fingerprint"] = fp;
    return r.dump();
}

std::string write_temp(const Host& h, const std::string& name, const std::string& text)
{
    const std::string path = h.mount.root + "/" + name;
    std::ofstream(path) << text;
    return path;
}

TEST_CASE("two hosts on one PostgreSQL: the key ceremony, writes and revocations within the bound, concurrent "
          "writers, vaults made on either",
          "[hosts][pg]")
{
    PgServer pg;
    const std::string url = pg.new_database();
    Host alpha("alpha"), beta("beta"), gamma("gamma");
    {
        auto r = alpha.cli("init --store " + url + " --host alpha");
        INFO(alpha.cli_stderr() << r.data);
        REQUIRE(r.err == 0);
    }
    alpha.mount.start();
    REQUIRE(make_dir(alpha.mount.path("payments")).err == 0);
    REQUIRE(write_file(alpha.mount.path("payments/db"), "first").err == 0);

    // ---- the ceremony, and its failures ------------------------------------------------
    auto req = beta.cli("join request --store " + url + " --host beta");
    INFO(beta.cli_stderr());
    REQUIRE(req.err == 0);
    const std::string request = first_line(req.data);
    const std::string fp = json::parse(request)["fingerprint"].get<std::string>();
    const std::string req_file = write_temp(beta, "join.req", request);
    // Not enrolled yet: beta does not serve.
    auto early = beta.mount.start_expecting_failure();
    CHECK(early.err != 0);
    CHECK(early.data.find("not enrolled") != std::string::npos);

    // A request altered in transit (its key swapped, fingerprint redone).
    auto g_req = gamma.cli("join request --store " + url + " --host gamma");
    REQUIRE(g_req.err == 0);
    const std::string gamma_request = first_line(g_req.data);
    // (Its admin was told the tampered fingerprint, so it passes that check.)
    const std::string tampered_text = with_transport_of(request, gamma_request);
    const std::string tampered = write_temp(beta, "tampered.req", tampered_text);
    const std::string tampered_fp = json::parse(tampered_text)["fingerprint"].get<std::string>();
    auto t = alpha.cli("join grant --fingerprint " + tampered_fp + alpha.so() + tampered);
    CHECK(t.err != 0);
    CHECK(alpha.cli_stderr().find("not the ones host 'beta' registered") != std::string::npos);
    CHECK(alpha.mount.last_audit("host_grant")["result"] == "EINVAL");
    // Edited without redoing the fingerprint; or a fingerprint the admin was
    // not given, refused without printing the right one; or none at all: the
    // comparison out of band cannot be skipped.
    json edited = json::parse(request);
    edited["host"] = "mallory";
    CHECK(alpha.cli("join grant --fingerprint " + fp + alpha.so() + write_temp(beta, "edited.req", edited.dump()))
              .err != 0);
    CHECK(alpha.cli_stderr().find("altered") != std::string::npos);
    CHECK(alpha.cli("join grant --fingerprint 00000000-1" + alpha.so() + req_file).err != 0);
    CHECK(alpha.cli_stderr().find("the request's fingerprint is not the one you were given") != std::string::npos);
    CHECK(alpha.cli_stderr().find(fp) == std::string::npos);
    CHECK(alpha.cli("join grant" + alpha.so() + req_file).err != 0);
    CHECK(alpha.cli_stderr().find("--fingerprint is required") != std::string::npos);
    // Nothing was trusted in alpha's token by any of these.
    CHECK(p11_attack(alpha.mount.state, "trust")["copy_rvs"].empty());

    // Beta's own grant; and gamma's, which beta refuses.
    auto grant = alpha.cli("join grant --fingerprint " + fp + alpha.so() + req_file);
    INFO(alpha.cli_stderr());
    REQUIRE(grant.err == 0);
    // The SO step is in alpha's audit trail: beta's transport key trusted.
    const auto trusted = alpha.mount.last_audit("host_trust");
    CHECK(trusted["attribute"] == "beta");
    CHECK(trusted["result"] == "ok");
    const std::string gamma_fp = json::parse(gamma_request)["fingerprint"].get<std::string>();
    auto gamma_grant =
        alpha.cli("join grant --fingerprint " + gamma_fp + alpha.so() + write_temp(gamma, "join.req", gamma_request));
    REQUIRE(gamma_grant.err == 0);
    CHECK(beta.cli("join accept" + beta.so() + write_temp(beta, "other.grant", first_line(gamma_grant.data))).err != 0);
    CHECK(beta.cli_stderr().find("the grant is for host 'gamma'") != std::string::npos);
    const auto g = json::parse(first_line(grant.data));
    CHECK(g["keks"].size() == 1);
    const std::string grant_file = write_temp(beta, "join.grant", first_line(grant.data));
    // A grant whose signature does not check (its list of KEKs edited).
    json forged = g;
    forged["time"] = forged["time"].get<std::int64_t>() + 1;
    CHECK(beta.cli("join accept" + beta.so() + write_temp(beta, "forged.grant", forged.dump())).err != 0);
    CHECK(beta.cli_stderr().find("signature is not alpha's") != std::string::npos);
    // Accepted, but with a wrong SO PIN: the KEKs are in, the SO step failed
    // (the token rejects the PIN once; it is not tried again) and says what
    // to run.
    const std::string wrong_so = write_temp(beta, "wrong.so-pin", "not-the-so-pin");
    REQUIRE(::chmod(wrong_so.c_str(), 0600) == 0);
    auto accepted = beta.cli("join accept --so-pin-file " + wrong_so + " " + grant_file);
    INFO(beta.cli_stderr());
    CHECK(accepted.err == 1);
    CHECK(accepted.data.find("Joined: 1 KEKs imported") != std::string::npos);
    CHECK(beta.cli_stderr().find("rejected the Security Officer PIN") != std::string::npos);
    CHECK(beta.cli_stderr().find("run `vaultfs host trust --all` here") != std::string::npos);
    // Beta's SO trusts the hosts enrolled before it, so that beta's own vaults
    // reach them: alpha, and gamma (enrolled by alpha just now).
    auto trusting = beta.cli("host trust --all" + beta.so());
    INFO(beta.cli_stderr());
    REQUIRE(trusting.err == 0);
    CHECK(trusting.data.find("host alpha: its transport key") != std::string::npos);
    CHECK(trusting.data.find("host gamma: its transport key") != std::string::npos);
    CHECK(beta.cli("join accept" + beta.so() + grant_file).err != 0);
    CHECK(beta.cli_stderr().find("replayed") != std::string::npos);
    std::vector<std::string> grants_to_beta;
    for (const auto& rec : alpha.mount.audit())
        if (rec.value("op", "") == "host_grant" && rec.value("attribute", "") == "beta")
            grants_to_beta.push_back(rec.value("result", ""));
    CHECK(grants_to_beta == std::vector<std::string>{"EINVAL", "EINVAL", "ok"});
    beta.mount.start();
    std::vector<std::string> accepts;
    for (const auto& rec : beta.mount.audit())
        if (rec.value("op", "") == "host_accept")
            accepts.push_back(rec.value("result", ""));
    CHECK(accepts == std::vector<std::string>{"EINVAL", "EIO", "ok", "EEXIST"});
    // Beta's daemon audits what its token trusts (it was stopped at the SO step).
    std::set<std::string> trusted_on_beta;
    for (const auto& rec : beta.mount.audit())
        if (rec.value("op", "") == "host_trust")
            trusted_on_beta.insert(rec.value("attribute", ""));
    CHECK(trusted_on_beta == std::set<std::string>{"alpha", "gamma"});

    auto hosts = alpha.cli("host list");
    REQUIRE(hosts.err == 0);
    CHECK(hosts.data.find("alpha") != std::string::npos);
    CHECK(hosts.data.find("beta                 enrolled") != std::string::npos);

    // ---- reads, writes and revocations across hosts, within the bound ---------------
    CHECK(ok(read_file(beta.mount.path("payments/db"))) == "first");
    REQUIRE(write_file(alpha.mount.path("payments/db"), "second").err == 0);
    auto took = within(delta + poll_slack, [&] { return read_file(beta.mount.path("payments/db")).data == "second"; });
    CHECK(took);
    TestUser reader("hr");
    REQUIRE(write_file(alpha.mount.path("payments/.policy"),
                       "allow uid:0 *\nallow uid:" + std::to_string(reader.uid) + " get\n")
                .err == 0);
    CHECK(within(delta + poll_slack, [&] {
        return as(reader, [&] { return read_file(beta.mount.path("payments/db")); }).err == 0;
    }));
    REQUIRE(write_file(alpha.mount.path("payments/.policy"), "allow uid:0 *\n").err == 0);
    const auto revoked = Clock::now();
    // Holding nothing in the vault any more, the reader is told it is not there.
    auto denied = within(delta + poll_slack, [&] {
        return as(reader, [&] { return read_file(beta.mount.path("payments/db")); }).err == ENOENT;
    });
    CHECK(denied);
    CHECK(Clock::now() - revoked <= delta + poll_slack);
    // Its refusals are audited: the first of their coalescing window at
    // once -- unless the reader's refusals before the grant opened that
    // window, and then a `repeats` record counts them when it ends.
    std::string last_result;
    CHECK(within(milliseconds(15000), [&] {
        for (const auto& rec : beta.mount.audit())
            if (rec.contains("uid") && rec["uid"] == reader.uid)
                last_result = rec.value("result", "");
        return last_result == "ENOENT";
    }));
    CHECK(last_result == "ENOENT");
    // Read-your-writes on each host.
    REQUIRE(write_file(beta.mount.path("payments/db"), "third").err == 0);
    CHECK(ok(read_file(beta.mount.path("payments/db"))) == "third");

    // A vault made on beta: its KEK reaches alpha's token wrapped, and alpha serves it.
    REQUIRE(make_dir(beta.mount.path("orders")).err == 0);
    REQUIRE(write_file(beta.mount.path("orders/api-key"), "from beta").err == 0);
    CHECK(within(delta * 2, [&] { return read_file(alpha.mount.path("orders/api-key")).data == "from beta"; }));
    // The record follows the import (on the feed's thread) by a moment.
    CHECK(within(delta, [&] {
        for (const auto& rec : alpha.mount.audit())
            if (rec.value("op", "") == "kek_import" && rec.value("result", "") == "ok")
                return true;
        return false;
    }));

    // ---- whoever holds a host's PIN takes no KEK out -------------------------------------
    // Every KEK (payments, orders) is in both tokens, and each refuses to be
    // wrapped under a key the PIN holder makes; their private keys refuse
    // outright; the PIN cannot make a key trusted.
    const std::string db_name = url.substr(url.rfind('/') + 1);
    for (Host* h : {&alpha, &beta}) {
        INFO("host " << h->name);
        int keks = 0;
        for (const auto& k : p11_attack(h->mount.state, "keys")) {
            INFO(k.dump());
            CHECK(k["recovered_bytes"] == 0);
            if (k["class"] == 4) {  // a KEK
                ++keks;
                CHECK(k["wrap_aes_rv"] == ckr_key_not_wrappable);
                CHECK(k["wrap_rsa_rv"] == ckr_key_not_wrappable);
                CHECK(k["value_rv"] == ckr_attribute_sensitive);
            } else {
                CHECK(k["wrap_aes_rv"] == ckr_key_unextractable);
            }
        }
        CHECK(keks == 2);
        const auto trust = p11_attack(h->mount.state, "trust");
        CHECK(trust["own_key_rv"] == ckr_attribute_read_only);
        for (const auto& rv : trust["copy_rvs"])
            CHECK(rv == ckr_attribute_read_only);
    }
    // Beta's PIN and a grant from the store: unwrapped into a key it could
    // read, the transport key's unwrap template refuses.
    {
        const std::string transport = pg.psql("SELECT transport_key FROM hosts WHERE name = 'beta'", db_name);
        const std::string blob = pg.psql("SELECT encode(g.wrapped_kek, 'hex') FROM kek_grants g JOIN hosts h ON "
                                         "h.id = g.host WHERE h.name = 'beta' AND length(g.wrapped_kek) > 0 LIMIT 1",
                                         db_name);
        REQUIRE(blob.size() == 768);  // RSA-3072 OAEP
        const auto unwrap = p11_attack(beta.mount.state, "unwrap " + transport + " " + blob);
        CHECK(unwrap["unwrap_rv"] == ckr_template_inconsistent);
    }

    // ---- a rekey on one host reaches the other, and the old KEK goes from both ----------
    const std::string old_kek = pg.psql("SELECT kek_id FROM vaults WHERE name = 'payments'", db_name);
    {
        auto r = beta.cli("vault rekey payments");
        INFO(beta.cli_stderr());
        REQUIRE(r.err == 0);
    }
    const std::string new_kek = pg.psql("SELECT kek_id FROM vaults WHERE name = 'payments'", db_name);
    CHECK(new_kek != old_kek);
    CHECK(within(delta * 2, [&] { return read_file(alpha.mount.path("payments/db")).data == "third"; }));
    CHECK(ok(read_file(alpha.mount.path("payments/db@1"))) == "first");
    const auto holds = [&](Host& h, const std::string& id) {
        for (const auto& k : p11_attack(h.mount.state, "keys"))
            if (k["id"] == id)
                return true;
        return false;
    };
    CHECK(within(delta * 2, [&] { return !holds(alpha, old_kek) && holds(alpha, new_kek); }));
    CHECK_FALSE(holds(beta, old_kek));
    CHECK(within(delta, [&] {
        for (const auto& rec : alpha.mount.audit())
            if (rec.value("op", "") == "kek_retire" && rec.value("reason", "").find(old_kek) != std::string::npos)
                return true;
        return false;
    }));

    // A host row written into the database directly (no grant, no signature)
    // gets no KEK: new vaults are wrapped only for enrolments a trusted host signed.
    Host mallory("mallory");
    REQUIRE(mallory.cli("join request --store " + url + " --host mallory").err == 0);
    const std::string db = url.substr(url.rfind('/') + 1);
    bool sql_ok = false;
    pg.psql("UPDATE hosts SET status = 'enrolled', enrolled_by = 'alpha' WHERE name = 'mallory'", db, &sql_ok);
    REQUIRE(sql_ok);
    REQUIRE(make_dir(alpha.mount.path("billing")).err == 0);
    const auto grants_for = [&](const std::string& host) {
        return pg.psql("SELECT count(*) FROM kek_grants g JOIN hosts h ON h.id = g.host JOIN vaults v ON "
                       "v.kek_id = g.kek_id WHERE v.name = 'billing' AND h.name = '" + host + "'",
                       db);
    };
    CHECK(grants_for("beta") == "1");
    CHECK(grants_for("mallory") == "0");
    CHECK(alpha.mount.daemon_stderr().find("host 'mallory' has no enrolment signed by a host this one trusts") !=
          std::string::npos);
    // A signature present but wrong (beta's, copied onto mallory's row) gets nothing either.
    pg.psql("UPDATE hosts SET enrolment_sig = (SELECT enrolment_sig FROM hosts WHERE name = 'beta') WHERE name = "
            "'mallory'",
            db, &sql_ok);
    REQUIRE(sql_ok);
    REQUIRE(make_dir(alpha.mount.path("billing2")).err == 0);
    CHECK(pg.psql("SELECT count(*) FROM kek_grants g JOIN hosts h ON h.id = g.host JOIN vaults v ON v.kek_id = "
                  "g.kek_id WHERE v.name = 'billing2' AND h.name IN ('beta', 'mallory') GROUP BY h.name ORDER BY "
                  "h.name",
                  db) == "1");  // beta's one row; none for mallory
    // A signature that checks, but by a key no trusted host holds: the first
    // host of another store (its own, self-signed enrolment), its row copied in.
    {
        const std::string other_url = pg.new_database();
        const std::string other_db = other_url.substr(other_url.rfind('/') + 1);
        Host outsider("outsider");
        REQUIRE(outsider.cli("init --store " + other_url + " --host outsider").err == 0);
        const std::string row = pg.psql(
            "SELECT encode(transport_public, 'hex') || ' ' || encode(signing_public, 'hex') || ' ' || "
            "encode(enrolment_sig, 'hex') || ' ' || transport_key FROM hosts WHERE name = 'outsider'",
            other_db);
        std::istringstream fields(row);
        std::string transport, signing, sig, key;
        REQUIRE(fields >> transport >> signing >> sig >> key);
        pg.psql("INSERT INTO hosts (name, status, transport_key, transport_public, signing_public, requested, "
                "enrolled, enrolled_by, enrolment_sig) VALUES ('outsider', 'enrolled', '" + key +
                    "', decode('" + transport + "', 'hex'), decode('" + signing + "', 'hex'), 0, 0, 'outsider', "
                    "decode('" + sig + "', 'hex'))",
                db, &sql_ok);
        REQUIRE(sql_ok);
        REQUIRE(make_dir(alpha.mount.path("billing3")).err == 0);
        CHECK(pg.psql("SELECT count(*) FROM kek_grants g JOIN hosts h ON h.id = g.host JOIN vaults v ON v.kek_id = "
                      "g.kek_id WHERE v.name = 'billing3' AND h.name = 'outsider'",
                      db) == "0");
        CHECK(alpha.mount.daemon_stderr().find("host 'outsider' has no enrolment signed by a host this one trusts") !=
              std::string::npos);
        pg.psql("DELETE FROM hosts WHERE name = 'outsider'", db, &sql_ok);
        REQUIRE(sql_ok);
    }

    // ---- two hosts writing one secret at once: every write a version ----------------
    const int per_host = 15;
    std::atomic<int> failures{0};
    std::vector<std::thread> writers;
    for (Host* h : {&alpha, &beta})
        writers.emplace_back([&, h] {
            for (int i = 0; i < per_host; ++i)
                if (write_file(h->mount.path("payments/counter"), h->name + "-" + std::to_string(i)).err != 0)
                    ++failures;
        });
    for (auto& w : writers)
        w.join();
    CHECK(failures == 0);
    std::set<std::string> values;
    for (int n = 1; n <= 2 * per_host; ++n) {
        auto v = read_file(alpha.mount.path("payments/counter@" + std::to_string(n)));
        INFO("version " << n);
        CHECK(v.err == 0);
        values.insert(v.data);
    }
    CHECK(values.size() == 2 * per_host);  // none lost, none twice
    CHECK(read_file(alpha.mount.path("payments/counter@" + std::to_string(2 * per_host + 1))).err == ENOENT);

    // Each host keeps its own audit trail, and each verifies.
    const auto va = alpha.mount.verify();
    INFO(va.data);
    CHECK(va.err == 0);
    const auto vb = beta.mount.verify();
    INFO(vb.data);
    CHECK(vb.err == 0);
    // Trusting again changes nothing; a host whose enrolment does not check
    // (mallory, written into the database) is never trusted.
    auto again = beta.cli("host trust --all" + beta.so());
    REQUIRE(again.err == 0);
    CHECK(again.data.find("every enrolled host is trusted here already") != std::string::npos);
    CHECK(beta.cli("host trust gamma" + beta.so()).data.find("host gamma: its transport key is trusted in this "
                                                             "token already") != std::string::npos);
    CHECK(beta.cli("host trust mallory" + beta.so()).err != 0);
    CHECK(beta.cli_stderr().find("host 'mallory' has no enrolment signed by a host this one trusts") !=
          std::string::npos);
    // A removed host gets no more KEKs; it cannot remove itself.
    CHECK(beta.cli("host remove beta").err != 0);
    REQUIRE(alpha.cli("host remove gamma").err == 0);
    CHECK(alpha.cli("host list").data.find("gamma") == std::string::npos);
    // Its transport key is trusted in alpha's token no more.
    CHECK(alpha.mount.last_audit("host_untrust")["attribute"] == "gamma");
}

TEST_CASE("a token that does not enforce CKA_WRAP_WITH_TRUSTED serves a store alone, and never shares a KEK",
          "[.ock][hosts][pg]")
{
    // openCryptoki 3.8 (tests/support/with-opencryptoki) wraps a key marked
    // wrap-with-trusted under any key: vaultfs finds it out and says so.
    auto t = test_token();
    if (!t)
        FAIL("no second token: run under tests/support/with-opencryptoki");
    PgServer pg;
    const std::string url = pg.new_database();
    Host alpha("alpha");
    auto r = shell(alpha.mount.binary + " init --state " + alpha.mount.state + " --store " + url +
                   " --host alpha --module " + t->module + " --token-label " + t->label + " --pin-file " +
                   t->pin_file + " 2>&1");
    INFO(r.data);
    // (openCryptoki 3.8 lacks CKM_AES_GCM too: its KEKs are CBC+HMAC pairs, which never move at all.)
    CHECK(r.err != 0);
    CHECK_THAT(r.data, Catch::Contains("does not enforce CKA_WRAP_WITH_TRUSTED") ||
                           Catch::Contains("cannot receive KEKs from other hosts"));
    // A host on SoftHSM2 leads the store; the openCryptoki one cannot join it.
    Host beta("beta");
    {
        auto first = beta.cli("init --store " + url + " --host beta");
        INFO(beta.cli_stderr());
        REQUIRE(first.err == 0);
    }
    Host gamma("gamma");
    r = shell(gamma.mount.binary + " join request --state " + gamma.mount.state + " --store " + url +
              " --host gamma --module " + t->module + " --token-label " + t->label + " --pin-file " + t->pin_file +
              " 2>&1");
    INFO(r.data);
    CHECK(r.err != 0);
    CHECK_THAT(r.data, Catch::Contains("does not enforce CKA_WRAP_WITH_TRUSTED") ||
                           Catch::Contains("cannot receive KEKs from other hosts"));
    CHECK(pg.psql("SELECT count(*) FROM hosts WHERE name = 'gamma'", url.substr(url.rfind('/') + 1)) == "0");
}

TEST_CASE("PostgreSQL stopped: reads fail closed after the bound, audited, and resume by themselves", "[hosts][pg]")
{
    PgServer pg;
    const std::string url = pg.new_database();
    Host alpha("alpha");
    REQUIRE(alpha.cli("init --store " + url + " --host alpha").err == 0);
    alpha.mount.start();
    REQUIRE(make_dir(alpha.mount.path("payments")).err == 0);
    REQUIRE(write_file(alpha.mount.path("payments/db"), "value").err == 0);
    CHECK(ok(read_file(alpha.mount.path("payments/db"))) == "value");
    // Monitoring: the feed's staleness as a metric, and the status verdict.
    const auto gauge = [&](const std::string& name) -> double {
        const auto text = alpha.cli("metrics").data;
        const auto at = text.find("\n" + name + " ");
        return at == std::string::npos ? -1 : std::stod(text.substr(at + name.size() + 2));
    };
    const double fresh_age = gauge("vaultfs_feed_staleness_seconds");
    CHECK(fresh_age >= 0);
    CHECK(fresh_age < 2.0);
    CHECK(gauge("vaultfs_store_up") == 1);
    const auto healthy = alpha.cli("status");
    CHECK(healthy.err == 0);
    CHECK(healthy.data.rfind("vaultfs OK: token ok, audit ok, store ok, feed ", 0) == 0);

    pg.stop(true);  // -m immediate
    const auto stopped = Clock::now();
    auto closed = within(delta * 3, [&] { return read_file(alpha.mount.path("payments/db")).err == EIO; });
    REQUIRE(closed);
    CHECK(Clock::now() - stopped <= delta + milliseconds(1500));
    const auto records = alpha.mount.audit();
    std::string tail;
    for (std::size_t i = records.size() > 6 ? records.size() - 6 : 0; i < records.size(); ++i)
        tail += records[i].dump() + "\n";
    INFO(tail);
    INFO(alpha.mount.daemon_stderr());
    const auto rec = alpha.mount.last_audit("get");
    CHECK(rec["result"] == "EIO");
    // Unreachable at once (the session is gone), or not fresh once the bound passed.
    const std::string reason = rec.value("reason", "");
    CHECK((reason.find("staleness bound 2000 ms") != std::string::npos ||
           reason.find("PostgreSQL") != std::string::npos));
    CHECK(write_file(alpha.mount.path("payments/db"), "while down").err != 0);
    // (A read may fail at once, its session gone; freshness lapses at the bound.)
    CHECK(within(milliseconds(5000), [&] {
        return gauge("vaultfs_store_up") == 0 && gauge("vaultfs_feed_staleness_seconds") > 2.0;
    }));
    const auto down = alpha.cli("status");
    CHECK(down.err == 2);
    CHECK(down.data.rfind("vaultfs CRITICAL: store failing: ", 0) == 0);

    REQUIRE(pg.start());
    CHECK(within(milliseconds(15000), [&] { return read_file(alpha.mount.path("payments/db")).data == "value"; }));
    CHECK(within(milliseconds(5000), [&] { return write_file(alpha.mount.path("payments/db"), "after").err == 0; }));
    CHECK(ok(read_file(alpha.mount.path("payments/db"))) == "after");
    CHECK(alpha.cli("status").err == 0);
}

TEST_CASE("failover: the primary killed, the synchronous standby promoted, every acknowledged write is there",
          "[hosts][pg][failover]")
{
    PgServer primary;
    const std::string db_url = primary.new_database();
    const std::string db = db_url.substr(db_url.rfind('/') + 1);
    auto standby = PgServer::standby_of(primary, "standby1");
    // From now on a commit returns once the standby has it too.
    bool ok_sync = false;
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = 'standby1'", "postgres", &ok_sync);
    REQUIRE(ok_sync);
    primary.psql("SELECT pg_reload_conf()", "postgres", &ok_sync);
    REQUIRE(ok_sync);
    // The sync standby must be streaming before writes are acknowledged.
    REQUIRE(within(milliseconds(20000), [&] {
        return primary.psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'") == "sync";
    }));
    const std::string url = "postgresql://postgres@127.0.0.1:" + std::to_string(primary.port()) + ",127.0.0.1:" +
                            std::to_string(standby->port()) + "/" + db + "?target_session_attrs=read-write";
    Host alpha("alpha");
    {
        auto r = alpha.cli("init --store '" + url + "' --host alpha");
        INFO(alpha.cli_stderr());
        REQUIRE(r.err == 0);
    }
    alpha.mount.start();
    REQUIRE(make_dir(alpha.mount.path("payments")).err == 0);
    int acknowledged = 0;
    for (; acknowledged < 20; ++acknowledged)
        REQUIRE(write_file(alpha.mount.path("payments/s" + std::to_string(acknowledged)), "v").err == 0);

    primary.stop(true);
    REQUIRE(standby->promote());
    // The daemon finds the new primary through the multi-host string.
    auto back = within(milliseconds(30000), [&] { return write_file(alpha.mount.path("payments/after"), "x").err == 0; });
    INFO(alpha.mount.daemon_stderr());
    REQUIRE(back);
    for (int i = 0; i < acknowledged; ++i) {
        INFO("secret s" << i);
        CHECK(ok(read_file(alpha.mount.path("payments/s" + std::to_string(i)))) == "v");
    }
    CHECK(ok(read_file(alpha.mount.path("payments/after"))) == "x");
    CHECK(alpha.mount.verify().err == 0);
}

TEST_CASE("migrate --to copies a SQLite state into PostgreSQL as it is, and another host can then join",
          "[hosts][pg]")
{
    PgServer pg;
    const std::string url = pg.new_database();
    Mount m;  // SQLite, the default
    REQUIRE(make_dir(m.path("payments")).err == 0);
    REQUIRE(write_file(m.path("payments/db"), "one").err == 0);
    REQUIRE(write_file(m.path("payments/db"), "two").err == 0);
    m.stop();
    auto r = shell(m.binary + " migrate --state " + m.state + " --to " + url + " --host alpha 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    // A one-host KEK never leaves its token: the vault moved to a new KEK,
    // which leaves it only under keys its SO trusts.
    CHECK(r.data.find("1 vault(s) moved to new KEKs that leave the token only wrapped under keys its Security "
                      "Officer trusts; 2 value(s) sealed again") != std::string::npos);
    CHECK(slurp(m.state_file("vaultfs.conf")).find("store = " + url) != std::string::npos);
    bool ok_pg = false;
    const std::string db = url.substr(url.rfind('/') + 1);
    const auto kek = pg.psql("SELECT kek_id FROM vaults", db, &ok_pg);
    CHECK(ok_pg);
    const auto old_kek = shell("sqlite3 " + m.state_file("vault.db") + " \"SELECT kek_id FROM vaults\"");
    CHECK(old_kek.data != kek + "\n");
    CHECK(pg.psql("SELECT DISTINCT kek_id FROM versions", db) == kek);
    const auto moved = p11_attack(m.state, "keys");
    bool found = false;
    for (const auto& k : moved) {
        CHECK(k["id"] != old_kek.data.substr(0, 32));  // the old one is gone
        if (k["id"] == kek) {
            found = true;
            CHECK(k["wrap_aes_rv"] == ckr_key_not_wrappable);
        }
    }
    CHECK(found);
    m.start();
    CHECK(ok(read_file(m.path("payments/db"))) == "two");
    CHECK(ok(read_file(m.path("payments/db@1"))) == "one");
    CHECK(m.verify().err == 0);
    // A second host joins the migrated store and reads what was migrated.
    Host beta("beta");
    auto req = beta.cli("join request --store " + url + " --host beta");
    REQUIRE(req.err == 0);
    const std::string req_file = write_temp(beta, "join.req", first_line(req.data));
    const std::string beta_fp = json::parse(first_line(req.data))["fingerprint"].get<std::string>();
    auto grant = shell(m.binary + " join grant --state " + m.state + " --fingerprint " + beta_fp +
                       " --so-pin-file " + m.state + "/so-pin " + req_file);
    REQUIRE(grant.err == 0);
    REQUIRE(beta.cli("join accept" + beta.so() + write_temp(beta, "join.grant", first_line(grant.data))).err == 0);
    beta.mount.start();
    CHECK(ok(read_file(beta.mount.path("payments/db"))) == "two");
}

}  // namespace
}  // namespace vaultfs::testing
