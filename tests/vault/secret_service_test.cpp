// Unit tests for vault::SecretService over a real stack in a temporary
// directory: a SoftHSM2 token, a SQLite store, a signed audit log and the
// DEK cache. They cover vault creation, value round trips and versions,
// size and name limits, policy decisions and their audit records, rows
// tampered with behind the service's back (which must fail, never yield the
// wrong bytes), and that no plaintext reaches the disk.
//
// One TempToken at a time per process (the PKCS#11 module is process-wide).
#include "vault/secrets/secret_service.hpp"

#include <catch2/catch.hpp>

#include <sqlite3.h>
#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>
#include <unistd.h>

#include <openssl/rand.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/support/temp_token.hpp"
#include "tests/support/small_tmpfs.hpp"
#include "tests/support/token_attack.hpp"
#include "vault/kek/rekey.hpp"
#include "vault/crypto/signing.hpp"

namespace vaultfs::vault {
namespace {

using namespace std::chrono_literals;
using testing::TempDir;
using testing::TempToken;
using Bytes = std::vector<std::uint8_t>;
using json = nlohmann::json;

Bytes bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

hsm::SecureBuffer secure_bytes(const Bytes& b)
{
    auto s = hsm::SecureBuffer::copy_of(b);
    REQUIRE(s);
    return std::move(*s);
}

Caller caller(uid_t uid, gid_t gid, std::vector<gid_t> groups = {})
{
    return Caller{policy::Subject{uid, gid, std::move(groups)}, ::getpid()};
}

const Caller root = caller(0, 0);

// What a reader gets: the value opened (audited), then decrypted.
Result<hsm::SecureBuffer> read_value(SecretService& service, const Caller& who, const SecretView& view)
{
    auto opened = service.open_value(who, view);
    if (!opened)
        return tl::unexpected(opened.error());
    return opened->plaintext();
}

struct StackOptions {
    std::size_t cache_entries = 256;
    std::chrono::milliseconds cache_ttl = 300s;
    std::optional<gid_t> admin_gid;
    std::string audit_dir;  // default: the stack's own directory
};

// The parts the daemon wires together, each real, in one temporary
// directory. Members go in reverse order: service first, token last.
struct Stack {
    explicit Stack(StackOptions options = {})
        : audit_file((options.audit_dir.empty() ? dir.path() : options.audit_dir) + "/audit.jsonl"),
          deks(options.cache_entries, options.cache_ttl)
    {
        auto k = token.open();
        if (!k)
            FAIL("cannot log in to the test token: " << k.error().message);
        keys = std::move(*k);
        auto s = Store::open(db_path(), Store::Mode::create);
        if (!s)
            FAIL("cannot create the store: " << s.error().message);
        store = std::move(*s);
        auto key = keys->create_signing_key("vaultfs-audit");
        REQUIRE(key);
        signing = *key;
        auto der = keys->public_key_der(signing);
        REQUIRE(der);
        auto pem = public_key_pem(*der);
        REQUIRE(pem);
        public_pem = *pem;
        const audit::Signer signer{keys.get(), signing};
        auto created = audit::Log::create(audit_path(), signer, audit::Bound{}, store.get());
        if (!created)
            FAIL("cannot create the audit log: " << created.error().message);
        audit::Log::Options audit_options;
        audit_options.path = audit_path();
        auto log = audit::Log::open(audit_options, signer, store.get());
        if (!log)
            FAIL("cannot open the audit log: " << log.error().message);
        audit = std::move(*log);
        service_options = Options{86400000, signing, public_pem};
        admin_gid = options.admin_gid;
        restart_service();
    }

    // A new service over the same store, audit and token: what a restart of
    // the daemon gives (version counters come from the database again).
    void restart_service()
    {
        service.reset();
        core = std::make_unique<Core>(*store, *audit, names, admin_gid);
        service = std::make_unique<SecretService>(*core, *keys, deks, service_options);
    }

    std::string db_path() const { return dir / "vault.db"; }
    std::string audit_path() const { return audit_file; }

    VaultView make_vault(const std::string& name, const Caller& who = root)
    {
        auto v = service->create_vault(who, name, VaultSettings{});
        if (!v)
            FAIL("create_vault(" << name << ") failed: " << v.error().message);
        return *v;
    }

    // Commits `value` as the next version of `name`; returns its number.
    Result<std::uint64_t> put(VaultId vault, const std::string& name, const Bytes& value, const Caller& who = root)
    {
        auto grant = service->open_for_write(who, vault, name, SecretService::WriteIntent{true, false});
        if (!grant)
            return tl::unexpected(grant.error());
        return service->commit(who, *grant, secure_bytes(value));
    }

    std::uint64_t must_put(VaultId vault, const std::string& name, const Bytes& value)
    {
        auto n = put(vault, name, value);
        if (!n)
            FAIL("writing " << name << " failed: " << n.error().message);
        return *n;
    }

    Result<hsm::SecureBuffer> get(VaultId vault, const std::string& component, const Caller& who = root)
    {
        auto view = service->find_secret(who, vault, component);
        if (!view)
            return tl::unexpected(view.error());
        return read_value(*service, who, *view);
    }

    SecretView view(VaultId vault, const std::string& component)
    {
        auto v = service->find_secret(root, vault, component);
        if (!v)
            FAIL("find_secret(" << component << ") failed: " << v.error().message);
        return *v;
    }

    std::vector<json> audit_records() const
    {
        std::ifstream in(audit_path());
        std::vector<json> out;
        std::string line;
        while (std::getline(in, line)) {
            auto j = json::parse(line, nullptr, false);
            if (j.is_discarded() || !j.is_object())
                FAIL("not an audit record: " << line);
            out.push_back(std::move(j));
        }
        return out;
    }

    // The last audit record with this op.
    json last_record(const std::string& op) const
    {
        const auto all = audit_records();
        for (auto it = all.rbegin(); it != all.rend(); ++it)
            if (it->value("op", "") == op)
                return *it;
        FAIL("no audit record with op " << op);
        return {};
    }

    TempToken token;
    TempDir dir;
    std::string audit_file;
    std::unique_ptr<hsm::Pkcs11KeyService> keys;
    std::unique_ptr<Store> store;
    hsm::KeyId signing;
    std::string public_pem;
    std::unique_ptr<audit::Log> audit;
    DekCache deks;
    SystemNameResolver names;
    Options service_options;
    std::optional<gid_t> admin_gid;
    std::unique_ptr<Core> core;
    std::unique_ptr<SecretService> service;
};

// The test's own connection to vault.db, for editing rows behind the
// service's back.
class Tamper {
public:
    explicit Tamper(const std::string& path)
    {
        REQUIRE(sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
        sqlite3_busy_timeout(db_, 5000);
    }
    ~Tamper() { sqlite3_close_v2(db_); }
    Tamper(const Tamper&) = delete;
    Tamper& operator=(const Tamper&) = delete;

    void exec(const std::string& sql)
    {
        char* msg = nullptr;
        const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg);
        INFO(sql << ": " << (msg != nullptr ? msg : ""));
        sqlite3_free(msg);
        REQUIRE(rc == SQLITE_OK);
        REQUIRE(sqlite3_changes(db_) >= 1);
    }

    Bytes blob(const std::string& column, VersionId version)
    {
        sqlite3_stmt* st = nullptr;
        const std::string sql = "SELECT " + column + " FROM versions WHERE id = ?";
        REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
        sqlite3_bind_int64(st, 1, version.value);
        REQUIRE(sqlite3_step(st) == SQLITE_ROW);
        const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 0));
        Bytes out(p, p + sqlite3_column_bytes(st, 0));
        sqlite3_finalize(st);
        return out;
    }

    void set_blob(const std::string& column, VersionId version, const Bytes& value)
    {
        sqlite3_stmt* st = nullptr;
        const std::string sql = "UPDATE versions SET " + column + " = ? WHERE id = ?";
        REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
        sqlite3_bind_blob(st, 1, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 2, version.value);
        REQUIRE(sqlite3_step(st) == SQLITE_DONE);
        REQUIRE(sqlite3_changes(db_) == 1);
        sqlite3_finalize(st);
    }

    void flip(const std::string& column, VersionId version, std::size_t byte)
    {
        Bytes b = blob(column, version);
        REQUIRE(byte < b.size());
        b[byte] ^= 0x01;
        set_blob(column, version, b);
    }

    std::string text(const std::string& sql)
    {
        sqlite3_stmt* st = nullptr;
        REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
        REQUIRE(sqlite3_step(st) == SQLITE_ROW);
        std::string v(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)));
        sqlite3_finalize(st);
        return v;
    }

private:
    sqlite3* db_ = nullptr;
};

Bytes binary_value()
{
    Bytes b(256);
    std::iota(b.begin(), b.end(), 0);
    return b;
}

Bytes patterned(std::size_t size)
{
    Bytes b(size);
    for (std::size_t i = 0; i < size; ++i)
        b[i] = static_cast<std::uint8_t>((i * 31 + 7) % 251);
    return b;
}

std::string random_hex(std::size_t bytes)
{
    Bytes raw(bytes);
    REQUIRE(RAND_bytes(raw.data(), static_cast<int>(raw.size())) == 1);
    static const char digits[] = "0123456789abcdef";
    std::string s;
    for (const auto b : raw) {
        s.push_back(digits[b >> 4]);
        s.push_back(digits[b & 0xf]);
    }
    return s;
}

bool file_contains(const std::string& path, const std::string& needle)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str().find(needle) != std::string::npos;
}

// ---- vaults --------------------------------------------------------------------

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

namespace vaultfs::vault {
namespace {

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
