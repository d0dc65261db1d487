// Keys that never leave the token (docs/design.md "3. Keys and encryption", SECURITY.md
// "What each key is, and who can move it"): the attack of issue 33 -- a PIN
// holder wraps a KEK under a key of their own and opens it offline -- tried
// on a daemon's real token, the embedded SoftHSM2 and (in the
// fs-integration-opencryptoki suite, [token]) an adopted openCryptoki token;
// `vaultfs vault rekey` moving a vault off a KEK an older vaultfs made
// extractable, its audit record, its status warning, and a kill -9 in the
// middle of it.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <set>
#include <thread>

#include "fs_support.hpp"

namespace vaultfs::testing {
namespace {

using nlohmann::json;

std::string sql(const Mount& m, const std::string& query)
{
    auto r = shell("sqlite3 " + m.state_file("vault.db") + " \"" + query + "\"");
    REQUIRE(r.err == 0);
    while (!r.data.empty() && r.data.back() == '\n')
        r.data.pop_back();
    return r.data;
}

std::string cli(const Mount& m, const std::string& args) { return m.binary + " " + args + " --state " + m.state; }

// The keys the attacker found that vaultfs made for this state.
std::vector<json> vaultfs_keys(const json& attacked, const std::set<std::string>& ids)
{
    std::vector<json> out;
    for (const auto& k : attacked)
        if (ids.contains(k.value("id", "")))
            out.push_back(k);
    return out;
}

}  // namespace

TEST_CASE("one host: every key vaultfs keeps in the token refuses to be wrapped out, whoever holds the PIN",
          "[token][keys]")
{
    Mount m;
    REQUIRE(make_dir(m.path("payments")).err == 0);
    REQUIRE(write_file(m.path("payments/db"), "hunter2").err == 0);
    REQUIRE(shell(cli(m, "key create payments/signer --type rsa-2048")).err == 0);
    auto cert = shell(cli(m, "cert create payments/web --subject CN=web.test --key rsa-2048 --days 30") + " 2>&1");
    INFO(cert.data);
    REQUIRE(cert.err == 0);

    // Every id this state's rows name in the token: the KEK (and its MAC key
    // on tokens without GCM), the audit signing key, the key and the
    // certificate's key.
    std::set<std::string> ids;
    const std::string kek = sql(m, "SELECT kek_id FROM vaults WHERE name = 'payments'");
    ids.insert(kek);
    ids.insert(kek + "6d");
    ids.insert(sql(m, "SELECT value FROM settings WHERE key = 'audit_signing_key'"));
    std::stringstream token_keys(sql(m, "SELECT token_key FROM object_versions WHERE token_key <> ''"));
    for (std::string id; std::getline(token_keys, id);)
        ids.insert(id);
    REQUIRE(ids.size() >= 5);

    const auto attacked = vaultfs_keys(p11_attack(m.state, "keys"), ids);
    CHECK(attacked.size() >= 4);
    bool saw_kek = false;
    for (const auto& k : attacked) {
        INFO(k.dump());
        CHECK(k["wrap_aes_rv"] == ckr_key_unextractable);
        CHECK(k["recovered_bytes"] == 0);
        if (k["class"] == 4) {  // CKO_SECRET_KEY: the KEK (and MAC key)
            CHECK(k["wrap_rsa_rv"] == ckr_key_unextractable);
            CHECK(k["value_rv"] == ckr_attribute_sensitive);
            saw_kek = saw_kek || k["id"] == kek;
        }
    }
    CHECK(saw_kek);
    // Nor can the PIN make a wrapping key of its own trusted (SoftHSM2
    // says CKR_ATTRIBUTE_READ_ONLY, openCryptoki CKR_TEMPLATE_INCONSISTENT).
    CHECK(p11_attack(m.state, "trust")["own_key_rv"] != ckr_ok);
    // The value is still served (the keys work inside the token).
    INFO(m.daemon_stderr());
    const auto read = read_file(m.path("payments/db"));
    INFO(m.last_audit("get").dump());
    CHECK(ok(read) == "hunter2");
    CHECK(m.verify().err == 0);
}

TEST_CASE("init keeps the embedded token's SO PIN for the admin to move offline; the daemon never needs it",
          "[keys]")
{
    Mount m(MountOptions{.init = false, .embedded_token = true});
    auto r = shell(m.binary + " init --state " + m.state + " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK_THAT(r.data, Catch::Contains("so-pin                   the token's Security Officer PIN (mode 0400): "
                                       "move it offline"));
    struct stat st{};
    REQUIRE(::stat(m.state_file("so-pin").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0400);
    CHECK(st.st_size == 32);
    CHECK(slurp(m.state_file("so-pin")) != slurp(m.state_file("pin")));
    // Moved away, as the admin is told to: the daemon serves without it.
    REQUIRE(shell("mv " + m.state_file("so-pin") + " " + m.root + "/offline-so-pin").err == 0);
    m.start();
    REQUIRE(make_dir(m.path("payments")).err == 0);
    REQUIRE(write_file(m.path("payments/db"), "x").err == 0);
    CHECK(ok(read_file(m.path("payments/db"))) == "x");
    // Another place, chosen at init; and never for an adopted token.
    Mount other(MountOptions{.init = false, .embedded_token = true});
    r = shell(other.binary + " init --state " + other.state + " --so-pin-file " + other.root + "/so.pin 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK(slurp(other.root + "/so.pin").size() == 32);
    CHECK_FALSE(std::ifstream(other.state_file("so-pin")).good());
    r = shell(other.binary + " init --state " + other.root + "/third --token-label x --pin-file " + other.state +
              "/pin --so-pin-file " + other.root + "/x.pin 2>&1");
    CHECK(r.err == 1);
    CHECK_THAT(r.data, Catch::Contains("an adopted token's Security Officer PIN is its owner's"));
}

TEST_CASE("a KEK an older vaultfs made extractable: named by status and the log, then rekeyed; the attack "
          "fails after, the values read the same, the audit records it",
          "[keys][rekey]")
{
    Mount m(MountOptions{.embedded_token = true});
    REQUIRE(make_dir(m.path("legacy")).err == 0);
    REQUIRE(make_dir(m.path("current")).err == 0);
    const std::string old_kek = sql(m, "SELECT kek_id FROM vaults WHERE name = 'legacy'");
    // What vaultfs 0.1 made: the same id, CKA_EXTRACTABLE, no CKA_WRAP_WITH_TRUSTED.
    REQUIRE(p11_attack(m.state, "plant-exposed-kek " + old_kek)["rv"] == ckr_ok);
    REQUIRE(write_file(m.path("legacy/db"), "one").err == 0);
    REQUIRE(write_file(m.path("legacy/db"), "two").err == 0);
    REQUIRE(write_file(m.path("current/api"), "three").err == 0);
    // The attack of issue 33 works on it: 32 bytes come out in the clear.
    const auto before = vaultfs_keys(p11_attack(m.state, "keys"), {old_kek});
    REQUIRE(before.size() == 1);
    CHECK(before[0]["wrap_aes_rv"] == ckr_ok);
    CHECK(before[0]["recovered_bytes"] == 32);

    m.stop();
    m.start();
    CHECK(m.daemon_stderr().find("vault legacy: its KEK can be wrapped out of the token under any key (made by an "
                                 "older vaultfs): run `vaultfs vault rekey legacy`") != std::string::npos);
    auto status = shell(cli(m, "status"));
    CHECK(status.err == 1);
    CHECK(status.data.rfind("vaultfs WARNING: KEKs to replace (vaultfs vault rekey VAULT): legacy\n", 0) == 0);

    // (Who may rekey -- manage on the vault -- is the unit tests' part:
    // tests/vault/secret_service_test.cpp.)
    auto r = shell(cli(m, "vault rekey legacy") + " 2>&1");
    INFO(r.data);
    REQUIRE(r.err == 0);
    CHECK_THAT(r.data, Catch::Contains("vault legacy rekeyed: 2 row(s) sealed again under KEK "));
    CHECK_THAT(r.data, Catch::Contains("KEK " + old_kek + " destroyed"));
    const std::string new_kek = sql(m, "SELECT kek_id FROM vaults WHERE name = 'legacy'");
    CHECK(new_kek != old_kek);
    CHECK(sql(m, "SELECT DISTINCT v.kek_id FROM versions v JOIN secrets s ON s.id = v.secret_id JOIN vaults w ON "
                 "w.id = s.vault_id WHERE w.name = 'legacy'") == new_kek);
    const auto rec = m.last_audit("vault_rekey");
    CHECK(rec["vault"] == "legacy");
    CHECK(rec["result"] == "ok");
    CHECK(rec["decision"] == "allow");
    CHECK(rec["reason"] == "2 row(s) sealed again under KEK " + new_kek + ", in place of " + old_kek);

    CHECK(ok(read_file(m.path("legacy/db@1"))) == "one");
    CHECK(ok(read_file(m.path("legacy/db"))) == "two");
    CHECK(ok(read_file(m.path("current/api"))) == "three");
    // The old key is gone from the token; the new one refuses the attack.
    const auto after = p11_attack(m.state, "keys");
    CHECK(vaultfs_keys(after, {old_kek}).empty());
    const auto fresh = vaultfs_keys(after, {new_kek});
    REQUIRE(fresh.size() == 1);
    CHECK(fresh[0]["wrap_aes_rv"] == ckr_key_unextractable);
    CHECK(fresh[0]["recovered_bytes"] == 0);
    status = shell(cli(m, "status"));
    CHECK(status.err == 0);
    CHECK(m.verify().err == 0);
}

TEST_CASE("vault rekey survives a kill -9 of the daemon in the middle: every version reads after the restart, "
          "and the next rekey completes",
          "[keys][rekey]")
{
    Mount m(MountOptions{.embedded_token = true});
    REQUIRE(make_dir(m.path("busy")).err == 0);
    // Enough versions that re-sealing them takes a while.
    constexpr int versions = 1500;
    for (int i = 1; i <= versions; ++i)
        REQUIRE(write_file(m.path("busy/s"), "v" + std::to_string(i)).err == 0);
    const std::string old_kek = sql(m, "SELECT kek_id FROM vaults WHERE name = 'busy'");

    // The rekey runs; as soon as it has recorded what it is doing, the daemon dies.
    const std::string out = m.root + "/rekey.out";
    REQUIRE(shell("(" + cli(m, "vault rekey busy") + " >" + out + " 2>&1 &)").err == 0);
    bool pending = false;
    for (int i = 0; i < 3000 && !pending; ++i) {
        pending = !sql(m, "SELECT value FROM settings WHERE key = 'rekey_pending'").empty();
        if (!pending)
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    REQUIRE(pending);
    m.kill_daemon();
    REQUIRE(eventually(10, [&] { return !slurp(out).empty(); }));
    const std::string said = slurp(out);
    const bool finished = said.find("rekeyed") != std::string::npos;
    WARN("kill -9 after the rekey recorded itself: the rekey " << (finished ? "had finished" : "had not finished")
                                                              << " (" << said.substr(0, said.find('\n')) << ")");

    m.start();
    CHECK(m.daemon_stderr().find("the rekey of vault busy was interrupted") != std::string::npos);
    CHECK(sql(m, "SELECT count(*) FROM settings WHERE key = 'rekey_pending'") == "0");
    const std::string kek = sql(m, "SELECT kek_id FROM vaults WHERE name = 'busy'");
    CHECK(sql(m, "SELECT DISTINCT kek_id FROM versions") == kek);
    // Exactly one KEK of the vault is left in the token: the one it uses.
    int kek_objects = 0;
    for (const auto& k : p11_attack(m.state, "keys"))
        if (k["label"] == "vaultfs-kek-busy") {
            ++kek_objects;
            CHECK(k["id"] == kek);
        }
    CHECK(kek_objects == 1);
    for (int i = 1; i <= versions; i += 97)
        CHECK(ok(read_file(m.path("busy/s@" + std::to_string(i)))) == "v" + std::to_string(i));
    CHECK(ok(read_file(m.path("busy/s"))) == "v" + std::to_string(versions));

    auto again = shell(cli(m, "vault rekey busy") + " 2>&1");
    INFO(again.data);
    REQUIRE(again.err == 0);
    CHECK_THAT(again.data, Catch::Contains(std::to_string(versions) + " row(s) sealed again"));
    CHECK(ok(read_file(m.path("busy/s@1"))) == "v1");
    // What the kill left after the last signature and anchor is unproven
    // until an admin, having examined it, acknowledges it.
    if (const std::uint64_t through = unproven_through(m.verify().data); through != 0)
        CHECK(shell(m.binary + " audit acknowledge --through " + std::to_string(through) + " --state " + m.state)
                  .err == 0);
    CHECK(m.verify().err == 0);
    (void)old_kek;
}

}  // namespace vaultfs::testing
