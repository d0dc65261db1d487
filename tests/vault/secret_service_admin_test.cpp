// Unit tests for vault::SecretService over a real stack (see
// secret_service_support.hpp): what tools do (staging, renames), ownership,
// refused attributes, and rekeying a vault.
//
// One TempToken at a time per process (the PKCS#11 module is process-wide).
#include "tests/vault/secret_service_support.hpp"

namespace vaultfs::vault {
namespace {

using namespace secret_service_test;  // with its usings: chrono literals, TempDir, TempToken, Bytes, json

TEST_CASE("what tools do: a staged file committed by name, a fresh secret renamed, a probe removed for good",
          "[secret_service][tools]")
{
    Stack s;
    const VaultId v = s.make_vault("tools").id;
    s.must_put(v, "target", bytes_of("one"));

    SECTION("commit_renamed: one audited commit naming the staged file; noreplace keeps what is there")
    {
        auto n = s.service->commit_renamed(root, v, "target", secure_bytes(bytes_of("two")), ".target.XyZ", false,
                                           std::nullopt);
        REQUIRE(n);
        CHECK(*n == 2);
        auto rec = s.last_record("commit");
        CHECK(rec["from"] == ".target.XyZ");
        CHECK(rec["version"] == 2);
        auto kept = s.service->commit_renamed(root, v, "target", secure_bytes(bytes_of("three")), ".t", true,
                                              std::nullopt);
        REQUIRE_FALSE(kept);
        CHECK(kept.error().code == Errc::already_exists);
        CHECK(s.get(v, "target")->equals(bytes_of("two")));
        // A new name is made by it.
        REQUIRE(s.service->commit_renamed(root, v, "fresh-name", secure_bytes(bytes_of("x")), ".f", true,
                                          std::nullopt));
        CHECK(s.get(v, "fresh-name")->equals(bytes_of("x")));
    }
    SECTION("rename_fresh: a secret just made moves; any other is never renamed")
    {
        s.must_put(v, "sedAbC123", bytes_of("edited"));
        auto n = s.service->rename_fresh(root, v, "sedAbC123", "target", false);
        REQUIRE(n);
        CHECK(*n == 2);
        CHECK(s.get(v, "target")->equals(bytes_of("edited")));
        CHECK_FALSE(s.service->find_secret(root, v, "sedAbC123"));
        CHECK(s.last_record("rename")["from"] == "sedAbC123");
        // Two versions: not fresh.
        s.must_put(v, "settled", bytes_of("a"));
        s.must_put(v, "settled", bytes_of("b"));
        auto refused = s.service->rename_fresh(root, v, "settled", "target", false);
        REQUIRE_FALSE(refused);
        CHECK(refused.error().code == Errc::not_permitted);
        // Made by another uid: not this caller's temporary file.
        REQUIRE(s.service->write_policy(root, v, "allow uid:0 *\nallow uid:4242 set\n"));
        REQUIRE(s.put(v, "theirs", bytes_of("t"), caller(4242, 4242)));
        CHECK(s.service->rename_fresh(root, v, "theirs", "target", false).error().code == Errc::not_permitted);
    }
    SECTION("delete: an empty fresh secret goes for good, anything else to .deleted")
    {
        s.must_put(v, "probe", {});
        REQUIRE(s.service->delete_secret(root, v, "probe"));
        CHECK_FALSE(s.service->find_deleted(root, v, "probe"));
        CHECK(s.last_record("delete")["reason"] == "fresh and empty: made by this uid moments ago, removed for good");
        s.must_put(v, "kept", bytes_of("value"));
        REQUIRE(s.service->delete_secret(root, v, "kept"));
        CHECK(s.service->find_deleted(root, v, "kept"));
    }
    SECTION("a name its uid deleted moments ago is made again by that uid (recovered), not by another")
    {
        REQUIRE(s.service->delete_secret(root, v, "target"));
        REQUIRE(s.service->write_policy(root, v, "allow uid:0 *\nallow uid:4242 set,delete,recover\n"));
        auto other = s.service->open_for_write(caller(4242, 4242), v, "target", SecretService::WriteIntent{true, true});
        REQUIRE_FALSE(other);
        CHECK(other.error().code == Errc::already_exists);
        auto grant = s.service->open_for_write(root, v, "target", SecretService::WriteIntent{true, true});
        REQUIRE(grant);
        REQUIRE(s.service->commit(root, *grant, secure_bytes(bytes_of("installed"))));
        CHECK(s.get(v, "target")->equals(bytes_of("installed")));
        CHECK(s.get(v, "target@1")->equals(bytes_of("one")));
        CHECK(s.last_record("recover")["result"] == "ok");
    }
}

TEST_CASE("ownership: managers change it (audited), others set only what is shown, bits are permission bits",
          "[secret_service][ownership]")
{
    Stack s;
    const VaultId v = s.make_vault("owned").id;
    s.must_put(v, "s", bytes_of("x"));
    REQUIRE(s.service->write_policy(root, v, "allow uid:0 *\nallow uid:4242 get,list\n"));
    const Caller other = caller(4242, 4242);
    CHECK(s.view(v, "s").ownership == Ownership{0, 0, 0400});
    REQUIRE(s.service->set_ownership(root, s.view(v, "s"), 4242u, 4242u, std::nullopt));
    REQUIRE(s.service->set_ownership(root, s.view(v, "s"), std::nullopt, std::nullopt, 0640u));
    CHECK(s.view(v, "s").ownership == Ownership{4242, 4242, 0640});
    CHECK(s.last_record("chmod")["attribute"] == "mode 0640");
    const auto records = s.audit_records().size();
    CHECK(s.service->set_ownership(other, s.view(v, "s"), std::nullopt, std::nullopt, 0640u));  // as shown
    CHECK(s.audit_records().size() == records);
    auto refused = s.service->set_ownership(other, s.view(v, "s"), std::nullopt, std::nullopt, 0600u);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == Errc::not_permitted);
    CHECK(s.last_record("chmod")["decision"] == "deny");
    CHECK(s.service->set_ownership(root, s.view(v, "s"), std::nullopt, std::nullopt, 04755u).error().code ==
          Errc::invalid_argument);
    // The vault's defaults, for secrets never given their own.
    REQUIRE(s.service->set_vault_attribute(root, v, "default_mode", "0440"));
    s.must_put(v, "t", bytes_of("y"));
    CHECK(s.view(v, "t").ownership == Ownership{0, 0, 0440});
    CHECK(s.view(v, "s").ownership == Ownership{4242, 4242, 0640});
    CHECK(s.service->set_vault_attribute(other, v, "default_mode", "0400").error().code == Errc::access_denied);
    // `set` is not `manage`: a writer does not change what new secrets show.
    REQUIRE(s.service->write_policy(root, v, "allow uid:0 *\nallow uid:4242 get,list\nallow uid:4343 get,set,list\n"));
    const Caller writer = caller(4343, 4343);
    for (const char* name : {"default_mode", "default_owner", "default_group"}) {
        INFO(name);
        auto r = s.service->set_vault_attribute(writer, v, name, "0");
        REQUIRE_FALSE(r);
        CHECK(r.error().code == Errc::access_denied);
        const auto rec = s.last_record("vault_set");
        CHECK(rec["decision"] == "deny");
        CHECK(rec["uid"] == 4343);
    }
    CHECK(s.view(v, "t").ownership == Ownership{0, 0, 0440});
}


TEST_CASE("a caller with neither get nor list is refused attributes, and each refusal is a deny record",
          "[secret_service][xattr]")
{
    Stack s;
    const VaultId v = s.make_vault("attrs").id;
    s.must_put(v, "s", bytes_of("x"));
    REQUIRE(s.service->write_policy(root, v, "allow uid:0 *\nallow uid:4242 set\n"));
    const Caller setter = caller(4242, 4242);
    auto view = s.service->find_secret(setter, v, "s");
    REQUIRE(view);  // set-only: the name resolves (it may write it)
    auto listed = s.service->list_attributes(setter, *view);
    REQUIRE_FALSE(listed);
    CHECK(listed.error().code == Errc::access_denied);
    auto rec = s.last_record("xattr_list");
    CHECK(rec["decision"] == "deny");
    CHECK(rec["uid"] == 4242);
    CHECK(rec["rule"] == "needs get or list");
    auto got = s.service->get_attribute(setter, *view, "version");
    REQUIRE_FALSE(got);
    CHECK(got.error().code == Errc::access_denied);
    rec = s.last_record("xattr_get");
    CHECK(rec["decision"] == "deny");
    CHECK(rec["uid"] == 4242);
    CHECK(rec["attribute"] == "version");
}

// ---- KEK rotation (vault/kek/rekey.hpp) ----------------------------------------------

// Every version row's KEK id, and the vault's, as the database holds them.
std::set<std::string> row_keks(const std::string& db)
{
    sqlite3* c = nullptr;
    REQUIRE(sqlite3_open_v2(db.c_str(), &c, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    sqlite3_busy_timeout(c, 5000);
    std::set<std::string> out;
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(c, "SELECT kek_id FROM versions", -1, &st, nullptr) == SQLITE_OK);
    while (sqlite3_step(st) == SQLITE_ROW)
        out.insert(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)));
    sqlite3_finalize(st);
    sqlite3_close_v2(c);
    return out;
}

TEST_CASE("rekey: every version reads the same under a new KEK, the old one is gone, and readers and writers "
          "meanwhile lose nothing",
          "[rekey][concurrency]")
{
    Stack s;
    kek::Rekey rekey(*s.core, *s.keys, hsm::KekReach::this_token, nullptr);
    const VaultId v = s.make_vault("rotating").id;
    const std::string first_kek = s.store->vault_by_id(v).value()->kek_id;
    for (int i = 0; i < 20; ++i)
        s.must_put(v, "s" + std::to_string(i % 5), bytes_of("value-" + std::to_string(i)));

    // Writers and readers go on while the vault is rekeyed three times.
    std::atomic<bool> done{false};
    std::atomic<int> write_failures{0}, read_failures{0}, writes{0};
    std::thread writer([&] {
        for (int i = 0; !done; ++i) {
            if (s.put(v, "w", bytes_of("w-" + std::to_string(i))))
                ++writes;
            else
                ++write_failures;
        }
    });
    std::thread reader([&] {
        while (!done)
            for (int i = 0; i < 5; ++i)
                if (auto r = s.get(v, "s" + std::to_string(i)); !r)
                    ++read_failures;
    });
    std::vector<std::string> keks{first_kek};
    for (int round = 0; round < 3; ++round) {
        auto r = rekey.rekey(&root, "rotating");
        INFO((r ? std::string() : r.error().message));
        REQUIRE(r);
        CHECK(r->old_kek == keks.back());
        CHECK(r->resealed >= 20);
        keks.push_back(r->new_kek);
        std::this_thread::sleep_for(20ms);
    }
    done = true;
    writer.join();
    reader.join();
    CHECK(write_failures == 0);
    CHECK(read_failures == 0);
    CHECK(writes > 0);

    // Every version as it was written, each under the last KEK.
    for (int i = 0; i < 20; ++i) {
        auto value = s.get(v, "s" + std::to_string(i % 5) + "@" + std::to_string(i / 5 + 1));
        REQUIRE(value);
        CHECK(value->equals(bytes_of("value-" + std::to_string(i))));
    }
    for (int n = 1; n <= writes; ++n)
        CHECK(s.get(v, "w@" + std::to_string(n)));
    CHECK(row_keks(s.db_path()) == std::set<std::string>{keks.back()});
    CHECK(s.store->vault_by_id(v).value()->kek_id == keks.back());
    for (std::size_t i = 0; i + 1 < keks.size(); ++i)
        CHECK_FALSE(s.keys->find_key(hsm::KeyId{keks[i]}));
    // Made under today's rule for one host: it never leaves the token.
    CHECK(*s.keys->kek_exposure(hsm::KeyId{keks.back()}) == hsm::Pkcs11KeyService::KekExposure::none);
    const auto record = s.last_record("vault_rekey");
    CHECK(record["decision"] == "allow");
    CHECK(record["result"] == "ok");
    CHECK(record["rule"] == "1: allow uid:0 *");
    CHECK(record["reason"].get<std::string>().find("in place of " + keks[2]) != std::string::npos);
}

TEST_CASE("rekey needs manage, and a refusal changes nothing", "[rekey]")
{
    Stack s;
    kek::Rekey rekey(*s.core, *s.keys, hsm::KekReach::this_token, nullptr);
    const VaultId v = s.make_vault("guarded").id;
    s.must_put(v, "s", bytes_of("x"));
    REQUIRE(s.service->write_policy(root, v, "allow uid:0 *\nallow uid:4242 get,set,list\n"));
    const std::string before = s.store->vault_by_id(v).value()->kek_id;
    const Caller reader = caller(4242, 4242);
    auto refused = rekey.rekey(&reader, "guarded");
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == Errc::access_denied);
    CHECK(s.last_record("vault_rekey")["decision"] == "deny");
    auto missing = rekey.rekey(&root, "no-such-vault");
    REQUIRE_FALSE(missing);
    CHECK(missing.error().code == Errc::not_found);
    CHECK(s.store->vault_by_id(v).value()->kek_id == before);
    CHECK(s.keys->find_key(hsm::KeyId{before}));
    CHECK(s.get(v, "s")->equals(bytes_of("x")));
    // rekey_after_days: the vault's managers set it, and the round rekeys
    // once the KEK is older (a day here is a millisecond).
    kek::Rekey quick(*s.core, *s.keys, hsm::KekReach::this_token, nullptr, 1);
    CHECK(s.service->set_vault_attribute(caller(4242, 4242), v, "rekey_after_days", "1").error().code ==
          Errc::access_denied);
    CHECK(s.service->set_vault_attribute(root, v, "rekey_after_days", "-1").error().code == Errc::invalid_argument);
    CHECK(*quick.rotate_due(now_micros()) == 0);
    REQUIRE(s.service->set_vault_attribute(root, v, "rekey_after_days", "1"));
    std::this_thread::sleep_for(5ms);
    CHECK(*quick.rotate_due(now_micros()) == 1);
    CHECK(s.store->vault_by_id(v).value()->kek_id != before);
    CHECK(s.last_record("vault_rekey")["rule"] == "rekey_after_days");
    CHECK(s.get(v, "s")->equals(bytes_of("x")));
}

TEST_CASE("an interrupted rekey is undone, or finished, at the next start; every secret reads either way",
          "[rekey]")
{
    Stack s;
    kek::Rekey rekey(*s.core, *s.keys, hsm::KekReach::this_token, nullptr);
    const VaultId v = s.make_vault("crashing").id;
    s.must_put(v, "s", bytes_of("one"));
    s.must_put(v, "s", bytes_of("two"));
    const std::string old_kek = s.store->vault_by_id(v).value()->kek_id;
    // What step 1 leaves: the record, then the new KEK.
    const auto interrupted = [&] {
        auto id = kek::fresh_kek_id();
        REQUIRE(id);
        const json pending{{"vault", "crashing"}, {"vault_id", v.value}, {"old", s.store->vault_by_id(v).value()->kek_id},
                           {"new", *id}};
        REQUIRE(s.store->write([&](Store::Transaction& tx) { return tx.set_setting(kek::pending_setting, pending.dump()); }));
        REQUIRE(s.keys->create_kek_with_id("vaultfs-kek-crashing", hsm::KeyId{*id}, hsm::KekReach::this_token));
        return *id;
    };
    SECTION("before the transaction committed: the new KEK goes")
    {
        const std::string made = interrupted();
        REQUIRE(rekey.recover());
        CHECK_FALSE(s.keys->find_key(hsm::KeyId{made}));
        CHECK(s.keys->find_key(hsm::KeyId{old_kek}));
        CHECK(s.store->vault_by_id(v).value()->kek_id == old_kek);
    }
    SECTION("after it committed: the old KEK goes")
    {
        const std::string made = interrupted();
        REQUIRE(s.store->write([&](Store::Transaction& tx) -> Result<void> {
            auto n = kek::move_vault_to(tx, *s.keys, v, old_kek, made);
            if (!n)
                return tl::unexpected(n.error());
            return {};
        }));
        REQUIRE(rekey.recover());
        CHECK_FALSE(s.keys->find_key(hsm::KeyId{old_kek}));
        CHECK(s.keys->find_key(hsm::KeyId{made}));
        CHECK(s.store->vault_by_id(v).value()->kek_id == made);
    }
    CHECK_FALSE(*s.store->setting(kek::pending_setting));
    s.restart_service();
    CHECK(s.get(v, "s@1")->equals(bytes_of("one")));
    CHECK(s.get(v, "s")->equals(bytes_of("two")));
    // Nothing left to do: recover is a no-op, and a rekey works.
    kek::Rekey after(*s.core, *s.keys, hsm::KekReach::this_token, nullptr);
    REQUIRE(after.recover());
    CHECK(after.rekey(&root, "crashing"));
    CHECK(s.get(v, "s")->equals(bytes_of("two")));
}

TEST_CASE("a KEK an older vaultfs made extractable is named, and a rekey replaces it", "[rekey][attack]")
{
    Stack s;
    kek::Rekey rekey(*s.core, *s.keys, hsm::KekReach::this_token, nullptr);
    const VaultId fresh = s.make_vault("fresh").id;
    const VaultId old = s.make_vault("old").id;
    const std::string old_kek = s.store->vault_by_id(old).value()->kek_id;
    const testing::TokenAccess access{VAULTFS_SOFTHSM_MODULE, TempToken::label, TempToken::pin,
                                      s.token.environment()};
    REQUIRE(testing::plant_exposed_kek(access, old_kek) == 0);  // as vaultfs 0.1 made them
    s.must_put(old, "s", bytes_of("secret"));
    s.must_put(fresh, "s", bytes_of("other"));
    auto found = rekey.inspect();
    REQUIRE(found);
    REQUIRE(found->size() == 1);
    CHECK((*found)[0].vault == "old");
    CHECK((*found)[0].reason.find("vaultfs vault rekey old") != std::string::npos);
    // The attack works on it, until the rekey.
    const auto before = testing::attack_every_key(access);
    const auto taken = std::find_if(before.begin(), before.end(), [&](const auto& k) { return k.id == old_kek; });
    REQUIRE(taken != before.end());
    CHECK(taken->recovered_bytes == 32);
    auto r = rekey.rekey(&root, "old");
    REQUIRE(r);
    CHECK(rekey.findings().empty());
    CHECK(s.get(old, "s")->equals(bytes_of("secret")));
    for (const auto& k : testing::attack_every_key(access)) {
        INFO(k.label);
        CHECK(k.id != old_kek);
        CHECK(k.wrap_aes_rv == CKR_KEY_UNEXTRACTABLE);
        CHECK(k.recovered_bytes == 0);
    }
}

}  // namespace
}  // namespace vaultfs::vault
