// Unit tests for vault::SecretService over a real stack in a temporary
// directory: a SoftHSM2 token, a SQLite store, a signed audit log and the
// DEK cache. They cover vault creation, value round trips and versions,
// size and name limits, policy decisions and their audit records, rows
// tampered with behind the service's back (which must fail, never yield the
// wrong bytes), and that no plaintext reaches the disk.
//
// One TempToken at a time per process (the PKCS#11 module is process-wide).
#include "tests/vault/secret_service_support.hpp"

namespace vaultfs::vault {
namespace {

using namespace secret_service_test;  // with its usings: chrono literals, TempDir, TempToken, Bytes, json

TEST_CASE("create_vault makes a vault with its own KEK and an owner policy", "[secret_service]")
{
    Stack s;
    const VaultView v = s.make_vault("payments");
    CHECK(v.name == "payments");
    CHECK(v.caller_is_admin);
    CHECK(v.permissions == policy::PermissionSet::all());

    auto text = s.service->read_policy(root, v.id);
    REQUIRE(text);
    CHECK(*text == "allow uid:0 *\n");

    const VaultView other = s.make_vault("Team-2");
    auto row_a = s.store->vault_by_id(v.id);
    auto row_b = s.store->vault_by_id(other.id);
    REQUIRE(row_a);
    REQUIRE(row_b);
    REQUIRE(*row_a);
    REQUIRE(*row_b);
    CHECK((*row_a)->kek_id != (*row_b)->kek_id);
    CHECK(s.keys->find_key(hsm::KeyId{(*row_a)->kek_id}));
    CHECK(s.keys->find_key(hsm::KeyId{(*row_b)->kek_id}));

    const json rec = s.last_record("vault_create");
    CHECK(rec["vault"] == "Team-2");
    CHECK(rec["decision"] == "allow");
    CHECK(rec["rule"] == "admin");
    CHECK(rec["result"] == "ok");

    auto dup = s.service->create_vault(root, "payments", VaultSettings{});
    REQUIRE_FALSE(dup);
    CHECK(dup.error().code == Errc::already_exists);
    CHECK(s.last_record("vault_create")["result"] == "EEXIST");

    auto listed = s.service->list_vaults(root);
    REQUIRE(listed);
    CHECK(listed->size() == 2);
}

TEST_CASE("a member of the admin group creates a vault only it can use", "[secret_service]")
{
    Stack s(StackOptions{.admin_gid = 4242});
    const Caller admin = caller(1000, 1000, {4242});
    const VaultView v = s.make_vault("team-vault", admin);
    CHECK(v.caller_is_admin);
    CHECK(v.permissions == policy::PermissionSet::all());
    REQUIRE(s.put(v.id, "token", bytes_of("t0ken"), admin));
    auto value = s.get(v.id, "token", admin);
    REQUIRE(value);
    CHECK(value->equals(bytes_of("t0ken")));

    // uid 0 is an admin too, but the policy gives it no data access.
    auto policy = s.service->read_policy(admin, v.id);
    REQUIRE(policy);
    CHECK(*policy == "allow uid:1000 *\n");
    auto by_root = s.service->find_secret(root, v.id, "token");
    REQUIRE_FALSE(by_root);
    CHECK(by_root.error().code == Errc::access_denied);
}

TEST_CASE("callers who are not admins cannot create vaults", "[secret_service]")
{
    Stack s;
    const Caller user = caller(1000, 1000, {4242});  // no admin group configured
    auto v = s.service->create_vault(user, "payments", VaultSettings{});
    REQUIRE_FALSE(v);
    // README: a non-admin mkdir is EACCES.
    CHECK(v.error().code == Errc::access_denied);
    auto vaults = s.store->vaults();
    REQUIRE(vaults);
    CHECK(vaults->empty());

    const json rec = s.last_record("vault_create");
    CHECK(rec["decision"] == "deny");
    CHECK(rec["uid"] == 1000);
    CHECK(rec["vault"] == "payments");
    CHECK(rec["result"] == "EACCES");
}

TEST_CASE("invalid vault names are refused", "[secret_service]")
{
    Stack s;
    for (const std::string name : {"ab", "1abc", "-abc", "abc-", "a--b", "a_b", "a.b", "a b", "caf\xc3\xa9",
                                   "abcdefghijklmnopqrstuvwxy"}) {
        INFO(name);
        auto v = s.service->create_vault(root, name, VaultSettings{});
        REQUIRE_FALSE(v);
        CHECK(v.error().code == Errc::invalid_argument);
    }
    auto bad_retention = s.service->create_vault(root, "payments", VaultSettings{6, false});
    REQUIRE_FALSE(bad_retention);
    CHECK(bad_retention.error().code == Errc::invalid_argument);
    auto vaults = s.store->vaults();
    REQUIRE(vaults);
    CHECK(vaults->empty());
}

// ---- values --------------------------------------------------------------------

TEST_CASE("values round trip exactly: empty, one byte, 25 KiB, binary", "[secret_service]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    const std::pair<std::string, Bytes> values[] = {
        {"empty", {}},
        {"one-byte", {'x'}},
        {"max-size", patterned(max_value_size)},
        {"binary", binary_value()},
        {"with-newline", bytes_of("hunter2\n")},
    };
    for (const auto& [name, value] : values) {
        INFO(name);
        auto n = s.put(v, name, value);
        REQUIRE(n);
        CHECK(*n == 1);

        const SecretView view = s.view(v, name);
        CHECK(view.name == name);
        CHECK(view.vault_name == "payments");
        CHECK(view.version.number == 1);
        CHECK(view.version.size == value.size());
        CHECK_FALSE(view.pinned);
        auto read = read_value(*s.service, root, view);
        REQUIRE(read);
        CHECK(read->size() == value.size());
        CHECK(read->equals(value));
        if (!read->empty())
            CHECK(CRYPTO_secure_allocated(read->data()) == 1);

        auto pinned = s.get(v, name + "@1");
        REQUIRE(pinned);
        CHECK(pinned->equals(value));

        const json rec = s.last_record("get");
        CHECK(rec["secret"] == name);
        CHECK(rec["bytes"] == value.size());
        CHECK(rec["decision"] == "allow");
    }
}

TEST_CASE("each commit is a new version; S is the latest, S@N each one", "[secret_service]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    const Bytes values[] = {bytes_of("hunter2"), bytes_of("correct horse"), bytes_of("battery staple")};
    for (std::uint64_t i = 0; i < 3; ++i) {
        CHECK(s.must_put(v, "db-password", values[i]) == i + 1);
        auto current = s.get(v, "db-password");
        REQUIRE(current);
        CHECK(current->equals(values[i]));
    }
    for (std::uint64_t n = 1; n <= 3; ++n) {
        INFO("version " << n);
        const SecretView view = s.view(v, "db-password@" + std::to_string(n));
        CHECK(view.pinned);
        CHECK(view.version.number == n);
        auto value = read_value(*s.service, root, view);
        REQUIRE(value);
        CHECK(value->equals(values[n - 1]));
    }
    CHECK(s.view(v, "db-password").version.number == 3);

    for (const std::string missing : {"db-password@4", "db-password@0", "db-password@01", "db-password@", "nope"}) {
        INFO(missing);
        auto r = s.service->find_secret(root, v, missing);
        REQUIRE_FALSE(r);
        CHECK(r.error().code == Errc::not_found);
    }
}

TEST_CASE("a value over 25 KiB is too_large and creates no version", "[secret_service]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;

    SECTION("a new secret stays invisible")
    {
        auto n = s.put(v, "big", patterned(max_value_size + 1));
        REQUIRE_FALSE(n);
        CHECK(n.error().code == Errc::too_large);
        const json rec = s.last_record("commit");
        CHECK(rec["secret"] == "big");
        CHECK(rec["bytes"] == max_value_size + 1);
        CHECK(rec["result"] == "EFBIG");
        auto view = s.service->find_secret(root, v, "big");
        REQUIRE_FALSE(view);
        CHECK(view.error().code == Errc::not_found);
        Tamper db(s.db_path());
        CHECK(db.text("SELECT count(*) FROM versions") == "0");
    }
    SECTION("an existing secret keeps its versions")
    {
        s.must_put(v, "big", bytes_of("small"));
        auto n = s.put(v, "big", patterned(max_value_size + 1));
        REQUIRE_FALSE(n);
        CHECK(n.error().code == Errc::too_large);
        const json rec = s.last_record("commit");
        CHECK(rec["secret"] == "big");
        CHECK(rec["bytes"] == max_value_size + 1);
        CHECK(rec["result"] == "EFBIG");
        CHECK(s.view(v, "big").version.number == 1);
        CHECK_FALSE(s.service->find_secret(root, v, "big@2"));
        auto value = s.get(v, "big");
        REQUIRE(value);
        CHECK(value->equals(bytes_of("small")));
        // The refused write used no version number.
        CHECK(s.must_put(v, "big", patterned(max_value_size)) == 2);
    }
}

TEST_CASE("invalid secret names are refused at open for write", "[secret_service]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    for (const std::string& name : {std::string(), std::string(128, 'a'), std::string("a_b"), std::string("a.b"),
                                   std::string("a b"), std::string("a@1"), std::string(".policy"),
                                   std::string("caf\xc3\xa9"), std::string("a/b")}) {
        INFO(name);
        const auto before = s.audit_records().size();
        auto grant = s.service->open_for_write(root, v, name, SecretService::WriteIntent{true, false});
        REQUIRE_FALSE(grant);
        CHECK(grant.error().code == Errc::invalid_argument);
        // This attempt's own record: exactly one more, naming this name.
        const auto records = s.audit_records();
        REQUIRE(records.size() == before + 1);
        CHECK(records.back()["op"] == "set");
        CHECK(records.back()["rule"] == "invalid-name");
        CHECK(records.back()["secret"] == (name.empty() ? json(nullptr) : json(name)));
    }
    // The longest valid name works.
    CHECK(s.must_put(v, std::string(127, 'a'), bytes_of("x")) == 1);
    Tamper db(s.db_path());
    CHECK(db.text("SELECT count(*) FROM secrets") == "1");
}

// ---- policy ----------------------------------------------------------------------

TEST_CASE("the policy decides, and a denial is audited", "[secret_service]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    s.must_put(v, "db-password", bytes_of("hunter2"));
    s.must_put(v, "api-key", bytes_of("k3y"));
    REQUIRE(s.service->write_policy(root, v,
                                    "allow uid:0 *\n"
                                    "allow uid:1000 list\n"
                                    "allow uid:1001 get,list\n"
                                    "deny uid:1001 get db-*\n"));
    const Caller lister = caller(1000, 1000);
    const Caller reader = caller(1001, 1001);
    const Caller stranger = caller(2000, 2000);

    SECTION("list but not get")
    {
        auto view = s.service->find_secret(lister, v, "api-key");
        REQUIRE(view);  // visible: the caller holds a permission in the vault
        auto value = read_value(*s.service, lister, *view);
        REQUIRE_FALSE(value);
        CHECK(value.error().code == Errc::access_denied);
        const json rec = s.last_record("get");
        CHECK(rec["decision"] == "deny");
        CHECK(rec["uid"] == 1000);
        CHECK(rec["secret"] == "api-key");
        CHECK(rec["result"] == "EACCES");
        CHECK(rec["rule"] == "default-deny");
        CHECK(rec["bytes"].is_null());

        auto write = s.service->open_for_write(lister, v, "api-key", SecretService::WriteIntent{true, false});
        REQUIRE_FALSE(write);
        CHECK(write.error().code == Errc::access_denied);
        CHECK(s.last_record("set")["decision"] == "deny");
    }
    SECTION("a deny rule wins over an allow")
    {
        auto denied = s.get(v, "db-password", reader);
        REQUIRE_FALSE(denied);
        CHECK(denied.error().code == Errc::access_denied);
        const json rec = s.last_record("get");
        CHECK(rec["decision"] == "deny");
        CHECK(rec["uid"] == 1001);
        CHECK(rec["rule"] == "4: deny uid:1001 get db-*");

        auto allowed = s.get(v, "api-key", reader);
        REQUIRE(allowed);
        CHECK(allowed->equals(bytes_of("k3y")));
        const json ok = s.last_record("get");
        CHECK(ok["decision"] == "allow");
        CHECK(ok["uid"] == 1001);
        CHECK(ok["rule"] == "3: allow uid:1001 get,list");
        CHECK(ok["bytes"] == 3);
    }
    SECTION("no permission at all: the vault is invisible")
    {
        auto found = s.service->find_vault(stranger, "payments");
        REQUIRE_FALSE(found);
        CHECK(found.error().code == Errc::not_found);
        auto secret = s.service->find_secret(stranger, v, "api-key");
        REQUIRE_FALSE(secret);
        CHECK(secret.error().code == Errc::access_denied);
        // A view obtained elsewhere still cannot be read.
        auto value = read_value(*s.service, stranger, s.view(v, "api-key"));
        REQUIRE_FALSE(value);
        CHECK(value.error().code == Errc::access_denied);
        CHECK(s.last_record("get")["uid"] == 2000);
    }
}

// ---- the DEK cache -----------------------------------------------------------------

TEST_CASE("a second read of a version hits the DEK cache", "[secret_service][dek_cache]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    s.must_put(v, "db-password", bytes_of("hunter2"));
    const auto before = s.deks.stats();
    REQUIRE(s.get(v, "db-password"));
    const auto first = s.deks.stats();
    CHECK(first.misses == before.misses + 1);
    CHECK(first.hits == before.hits);
    CHECK(first.entries == 1);
    auto again = s.get(v, "db-password");
    REQUIRE(again);
    CHECK(again->equals(bytes_of("hunter2")));
    const auto second = s.deks.stats();
    CHECK(second.hits == first.hits + 1);
    CHECK(second.misses == first.misses);
}

TEST_CASE("with the DEK cache off every read still works", "[secret_service][dek_cache]")
{
    Stack s(StackOptions{.cache_entries = 0, .cache_ttl = 0ms});
    CHECK_FALSE(s.deks.enabled());
    const VaultId v = s.make_vault("payments").id;
    s.must_put(v, "db-password", bytes_of("hunter2"));
    s.must_put(v, "db-password", bytes_of("correct horse"));
    for (int i = 0; i < 3; ++i) {
        auto latest = s.get(v, "db-password");
        REQUIRE(latest);
        CHECK(latest->equals(bytes_of("correct horse")));
        auto first = s.get(v, "db-password@1");
        REQUIRE(first);
        CHECK(first->equals(bytes_of("hunter2")));
    }
    CHECK(s.deks.stats().hits == 0);
    CHECK(s.deks.stats().entries == 0);
    CHECK(s.deks.stats().misses == 6);
}

// ---- tampering -----------------------------------------------------------------------

TEST_CASE("rows edited in the database fail authentication, never yield other bytes", "[secret_service][tamper]")
{
    Stack s;
    const VaultId a = s.make_vault("payments").id;
    const VaultId b = s.make_vault("other-vault").id;
    const Bytes v1 = bytes_of("first value of target");
    const Bytes v2 = bytes_of("second value of target");
    s.must_put(a, "target", v1);
    s.must_put(a, "target", v2);
    s.must_put(a, "bystander", bytes_of("untouched"));
    s.must_put(b, "resident", bytes_of("in b"));
    const SecretView t1 = s.view(a, "target@1");
    const SecretView t2 = s.view(a, "target@2");
    // Warm the DEK cache: tampering must not be masked by a cached DEK.
    REQUIRE(s.get(a, "target@1"));
    REQUIRE(s.get(a, "target@2"));

    Tamper db(s.db_path());
    const std::string kek_b = db.text("SELECT kek_id FROM vaults WHERE id = " + std::to_string(b.value));

    // The store keeps what opens read in memory until its next write (and
    // the DEK cache is warm): an edit behind its back is read, and must be
    // refused, once a write has dropped that copy.
    int writes = 0;
    const auto refused = [&](VaultId vault, const std::string& component) {
        INFO("reading " << component);
        s.must_put(b, "unrelated", bytes_of("write " + std::to_string(++writes)));
        auto view = s.service->find_secret(root, vault, component);
        if (!view)
            FAIL("the tampered secret cannot be found: " << view.error().message);
        auto value = read_value(*s.service, root, *view);
        if (value)
            FAIL("read " << value->size() << " bytes from a tampered row");
        return value.error().code;
    };
    bool bystander_touched = false;
    const auto check_audited_failure = [&] {
        const json rec = s.last_record("get");
        CHECK(rec["result"] == "EIO");
        CHECK(rec["decision"] == "allow");
        CHECK(rec["bytes"].is_null());
    };

    SECTION("a flipped byte in versions.ciphertext")
    {
        db.flip("ciphertext", t2.version.id, 3);
        CHECK(refused(a, "target") == Errc::integrity);
        CHECK(s.last_record("get")["reason"] == "integrity check failed");
        check_audited_failure();
        auto other = s.get(a, "target@1");
        REQUIRE(other);
        CHECK(other->equals(v1));
    }
    SECTION("a flipped byte in the GCM tag of versions.ciphertext")
    {
        const std::size_t last = db.blob("ciphertext", t2.version.id).size() - 1;
        db.flip("ciphertext", t2.version.id, last);
        CHECK(refused(a, "target@2") == Errc::integrity);
        check_audited_failure();
    }
    SECTION("versions.size claiming more bytes than the value holds")
    {
        // The size column is not under the AEAD: a reader must never be
        // sent (or told of) bytes past the authenticated value.
        db.exec("UPDATE versions SET size = 25600 WHERE id = " + std::to_string(t2.version.id.value));
        CHECK(refused(a, "target") == Errc::integrity);
        check_audited_failure();
        auto other = s.get(a, "target@1");
        REQUIRE(other);
        CHECK(other->equals(v1));
    }
    SECTION("a flipped byte in versions.nonce")
    {
        db.flip("nonce", t1.version.id, 0);
        CHECK(refused(a, "target@1") == Errc::integrity);
        check_audited_failure();
    }
    SECTION("a flipped byte in versions.sealed_dek")
    {
        db.flip("sealed_dek", t1.version.id, 20);
        CHECK(refused(a, "target@1") == Errc::integrity);
        check_audited_failure();
        auto other = s.get(a, "target@2");
        REQUIRE(other);
        CHECK(other->equals(v2));
    }
    SECTION("versions.version renumbered")
    {
        db.exec("UPDATE versions SET version = 9 WHERE id = " + std::to_string(t2.version.id.value));
        CHECK(refused(a, "target@9") == Errc::integrity);
        CHECK(refused(a, "target") == Errc::integrity);  // 9 is now the latest
        CHECK_FALSE(s.service->find_secret(root, a, "target@2"));
        check_audited_failure();
    }
    SECTION("versions.version swapped between two versions")
    {
        db.exec("UPDATE versions SET version = 100 WHERE id = " + std::to_string(t1.version.id.value));
        db.exec("UPDATE versions SET version = 1 WHERE id = " + std::to_string(t2.version.id.value));
        db.exec("UPDATE versions SET version = 2 WHERE id = " + std::to_string(t1.version.id.value));
        CHECK(refused(a, "target@1") == Errc::integrity);
        CHECK(refused(a, "target@2") == Errc::integrity);
    }
    SECTION("secrets.name renamed")
    {
        db.exec("UPDATE secrets SET name = 'renamed' WHERE id = " + std::to_string(t1.id.value));
        CHECK(refused(a, "renamed") == Errc::integrity);
        CHECK(refused(a, "renamed@1") == Errc::integrity);
        check_audited_failure();
    }
    SECTION("a secret renamed onto another's name")
    {
        bystander_touched = true;
        db.exec("UPDATE secrets SET name = 'gone' WHERE name = 'bystander'");
        db.exec("UPDATE secrets SET name = 'bystander' WHERE id = " + std::to_string(t1.id.value));
        CHECK(refused(a, "bystander") == Errc::integrity);
    }
    SECTION("versions.kek_id pointed at another vault's KEK")
    {
        db.exec("UPDATE versions SET kek_id = '" + kek_b + "' WHERE id = " + std::to_string(t2.version.id.value));
        const Errc code = refused(a, "target@2");
        CHECK((code == Errc::integrity || code == Errc::key_unavailable));
        check_audited_failure();
    }
    SECTION("versions.kek_id pointed at a key the token does not hold")
    {
        db.exec("UPDATE versions SET kek_id = '00000000000000000000000000000000' WHERE id = " +
                std::to_string(t2.version.id.value));
        CHECK(refused(a, "target@2") == Errc::key_unavailable);
        check_audited_failure();
    }
    SECTION("secrets.vault_id moved to another vault")
    {
        db.exec("UPDATE secrets SET vault_id = " + std::to_string(b.value) + " WHERE id = " +
                std::to_string(t1.id.value));
        CHECK(refused(b, "target") == Errc::integrity);
        CHECK(refused(b, "target@1") == Errc::integrity);
        check_audited_failure();
        auto resident = s.get(b, "resident");
        REQUIRE(resident);
        CHECK(resident->equals(bytes_of("in b")));
    }
    SECTION("ciphertext and nonce swapped between two versions")
    {
        const Bytes c1 = db.blob("ciphertext", t1.version.id);
        const Bytes n1 = db.blob("nonce", t1.version.id);
        db.set_blob("ciphertext", t1.version.id, db.blob("ciphertext", t2.version.id));
        db.set_blob("nonce", t1.version.id, db.blob("nonce", t2.version.id));
        db.set_blob("ciphertext", t2.version.id, c1);
        db.set_blob("nonce", t2.version.id, n1);
        CHECK(refused(a, "target@1") == Errc::integrity);
        CHECK(refused(a, "target@2") == Errc::integrity);
        check_audited_failure();
    }
    SECTION("ciphertext, nonce and sealed DEK all swapped between two versions")
    {
        for (const std::string column : {"ciphertext", "nonce", "sealed_dek"}) {
            const Bytes first = db.blob(column, t1.version.id);
            db.set_blob(column, t1.version.id, db.blob(column, t2.version.id));
            db.set_blob(column, t2.version.id, first);
        }
        CHECK(refused(a, "target@1") == Errc::integrity);
        CHECK(refused(a, "target@2") == Errc::integrity);
    }
    SECTION("a version's ciphertext copied into another secret")
    {
        bystander_touched = true;
        const SecretView by = s.view(a, "bystander");
        for (const std::string column : {"ciphertext", "nonce", "sealed_dek"})
            db.set_blob(column, by.version.id, db.blob(column, t1.version.id));
        CHECK(refused(a, "bystander") == Errc::integrity);
    }

    // Whatever was done to the target, a secret nobody touched still reads.
    if (!bystander_touched) {
        auto value = s.get(a, "bystander");
        REQUIRE(value);
        CHECK(value->equals(bytes_of("untouched")));
    }
}

// ---- no plaintext on disk ----------------------------------------------------------------

TEST_CASE("no plaintext reaches the disk: database, WAL, audit log, token", "[secret_service]")
{
    Stack s;
    const std::string canary = "CANARY-" + random_hex(16);
    const VaultId v = s.make_vault("payments").id;
    const std::string name = "canary-holder-" + random_hex(4);

    Bytes repeated;
    while (repeated.size() + canary.size() <= max_value_size)
        repeated.insert(repeated.end(), canary.begin(), canary.end());
    Bytes embedded = binary_value();
    embedded.insert(embedded.begin() + 100, canary.begin(), canary.end());
    const Bytes values[] = {bytes_of(canary), bytes_of(canary + "\n"), repeated, embedded, bytes_of(canary)};
    for (const auto& value : values)
        s.must_put(v, name, value);
    for (std::size_t n = 1; n <= std::size(values); ++n) {
        auto read = s.get(v, name + "@" + std::to_string(n));
        REQUIRE(read);
        CHECK(read->equals(values[n - 1]));
    }

    const auto files_to_scan = [&] {
        std::vector<std::string> files;
        for (const auto& e : std::filesystem::recursive_directory_iterator(s.dir.path()))
            if (e.is_regular_file())
                files.push_back(e.path().string());
        for (const auto& e : std::filesystem::recursive_directory_iterator(s.token.dir().path()))
            if (e.is_regular_file())
                files.push_back(e.path().string());
        return files;
    };
    const auto scan = [&] {
        const auto files = files_to_scan();
        std::set<std::string> names;
        for (const auto& f : files)
            names.insert(std::filesystem::path(f).filename().string());
        // The scan covers what it must.
        CHECK(names.count("vault.db") == 1);
        CHECK(names.count("audit.jsonl") == 1);
        CHECK(std::any_of(files.begin(), files.end(),
                          [&](const std::string& f) { return f.rfind(s.token.dir().path() + "/tokens/", 0) == 0; }));
        for (const auto& f : files) {
            INFO(f);
            CHECK_FALSE(file_contains(f, canary));
        }
    };

    // While the service runs: vault.db, vault.db-wal, vault.db-shm, the
    // audit file and the token's object files.
    CHECK(std::filesystem::exists(s.db_path() + "-wal"));
    scan();
    // The scan would see a name that is stored: the secret's name is in the
    // database and in the audit records (names are not secret).
    CHECK(file_contains(s.audit_path(), name));
    CHECK((file_contains(s.db_path(), name) || file_contains(s.db_path() + "-wal", name)));

    // After an orderly shutdown (the WAL is checkpointed into vault.db).
    REQUIRE(s.audit->close());
    s.service.reset();
    s.core.reset();  // it reports to the store while it lives
    s.audit.reset();
    s.store.reset();
    s.keys.reset();
    CHECK_FALSE(std::filesystem::exists(s.db_path() + "-wal"));
    CHECK(file_contains(s.db_path(), name));
    scan();
}

// ---- fail closed ---------------------------------------------------------------------------

TEST_CASE("when the audit record cannot be written, no secret byte is served", "[secret_service][audit]")
{
    TempDir outer;
    testing::SmallTmpfs small(outer / "small", "size=64k,mode=0700");  // unmounted after the stack is gone
    Stack s(StackOptions{.audit_dir = small.path()});
    const VaultId v = s.make_vault("payments").id;
    s.must_put(v, "db-password", bytes_of("hunter2"));
    const SecretView view = s.view(v, "db-password");
    REQUIRE(read_value(*s.service, root, view));

    CHECK(small.fill("filler") > 0);
    // The audit file's last page may take a few more records.
    Result<hsm::SecureBuffer> value = fail(Errc::storage);
    int reads = 0;
    for (; reads < 200; ++reads) {
        value = read_value(*s.service, root, view);
        if (!value)
            break;
    }
    REQUIRE_FALSE(value);
    CHECK(reads < 200);
    CHECK(value.error().code == Errc::audit_unavailable);
    CHECK_FALSE(s.audit->healthy());

    // A commit is refused and leaves no version behind.
    auto n = s.put(v, "db-password", bytes_of("new value"));
    REQUIRE_FALSE(n);
    CHECK(n.error().code == Errc::audit_unavailable);
    CHECK_FALSE(s.service->find_secret(root, v, "db-password@2"));
    CHECK(s.view(v, "db-password").version.number == 1);

    // With space again, reads are served (and audited) again.
    REQUIRE(::unlink((small / "filler").c_str()) == 0);
    auto again = read_value(*s.service, root, view);
    REQUIRE(again);
    CHECK(again->equals(bytes_of("hunter2")));
    CHECK(s.audit->healthy());
    CHECK(s.last_record("get")["bytes"] == 7);
}

// ---- concurrency -------------------------------------------------------------------------

TEST_CASE("concurrent commits to one secret get distinct versions that read back", "[secret_service][concurrency]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    constexpr int threads = 4;
    constexpr int per_thread = 6;
    std::mutex mutex;
    std::vector<std::pair<std::uint64_t, std::string>> written;
    std::vector<std::string> errors;
    // No Catch2 assertions off the main thread: results are collected.
    const auto commit_one = [&](const std::string& value) -> Result<std::uint64_t> {
        auto grant = s.service->open_for_write(root, v, "shared", SecretService::WriteIntent{true, false});
        if (!grant)
            return tl::unexpected(grant.error());
        auto buf = hsm::SecureBuffer::copy_of(bytes_of(value));
        if (!buf)
            return fail(Errc::out_of_memory, buf.error().message);
        return s.service->commit(root, *grant, *buf);
    };
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            for (int i = 0; i < per_thread; ++i) {
                const std::string value = "thread " + std::to_string(t) + " write " + std::to_string(i);
                auto n = commit_one(value);
                std::lock_guard lock(mutex);
                if (n)
                    written.emplace_back(*n, value);
                else
                    errors.push_back(n.error().message);
            }
        });
    }
    for (auto& w : workers)
        w.join();
    INFO((errors.empty() ? std::string() : errors.front()));
    REQUIRE(errors.empty());
    std::set<std::uint64_t> numbers;
    for (const auto& [n, value] : written)
        numbers.insert(n);
    CHECK(numbers.size() == threads * per_thread);
    CHECK(*numbers.begin() == 1);
    CHECK(*numbers.rbegin() == threads * per_thread);
    for (const auto& [n, value] : written) {
        auto read = s.get(v, "shared@" + std::to_string(n));
        REQUIRE(read);
        CHECK(read->equals(bytes_of(value)));
    }
}

// ---- version numbers, as the daemon hands them out --------------------------------------

TEST_CASE("version numbers: taken in the commit's transaction, so a failed commit leaves no gap",
          "[secret_service][versions]")
{
    Stack s;
    const VaultId v = s.make_vault("payments").id;
    REQUIRE(s.put(v, "n", bytes_of("one")) == 1u);
    REQUIRE(s.put(v, "n", bytes_of("two")) == 2u);
    const auto next_in_db = [&] {
        auto row = s.store->secret_by_name(v, "n");
        REQUIRE(row);
        REQUIRE(*row);
        return (*row)->next_version;
    };
    CHECK(next_in_db() == 3);

    // A writer whose secret is deleted before its close: the close fails
    // with not_found, and nothing is committed (nor a number taken).
    auto grant = s.service->open_for_write(root, v, "n", SecretService::WriteIntent{false, false});
    REQUIRE(grant);
    REQUIRE(s.service->delete_secret(root, v, "n"));
    auto lost = s.service->commit(root, *grant, secure_bytes(bytes_of("never")));
    REQUIRE_FALSE(lost);
    CHECK(lost.error().code == Errc::not_found);
    CHECK(s.last_record("commit")["result"] == "ENOENT");
    REQUIRE(s.service->recover(root, v, "n"));
    CHECK_FALSE(s.service->find_secret(root, v, "n@3"));
    CHECK(next_in_db() == 3);  // the failed commit raised nothing

    CHECK(s.put(v, "n", bytes_of("three")) == 3u);
    CHECK(next_in_db() == 4);
    s.restart_service();
    CHECK(s.put(v, "n", bytes_of("four")) == 4u);
    CHECK(next_in_db() == 5);
}


}  // namespace
}  // namespace vaultfs::vault
