// What the SecretService unit tests share: a real stack in a temporary
// directory (Stack), rows tampered with behind the service's back (Tamper),
// and small helpers. Only tests/vault/secret_service*_test.cpp include it.
#pragma once

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
#include "tests/support/sqlite_file.hpp"
#include "tests/support/token_attack.hpp"
#include "vault/kek/rekey.hpp"
#include "vault/crypto/signing.hpp"


namespace vaultfs::vault::secret_service_test {

using namespace std::chrono_literals;
using testing::TempDir;
using testing::TempToken;
using Bytes = std::vector<std::uint8_t>;
using json = nlohmann::json;

inline Bytes bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

inline hsm::SecureBuffer secure_bytes(const Bytes& b)
{
    auto s = hsm::SecureBuffer::copy_of(b);
    REQUIRE(s);
    return std::move(*s);
}

inline Caller caller(uid_t uid, gid_t gid, std::vector<gid_t> groups = {})
{
    return Caller{policy::Subject{uid, gid, std::move(groups)}, ::getpid()};
}

const Caller root = caller(0, 0);

// What a reader gets: the value opened (audited), then decrypted.
inline Result<hsm::SecureBuffer> read_value(SecretService& service, const Caller& who, const SecretView& view)
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
// service's back: every edit must change a row.
class Tamper : public testing::SqliteFile {
public:
    using SqliteFile::SqliteFile;

    void exec(const std::string& sql) { REQUIRE(SqliteFile::exec(sql) >= 1); }

    Bytes blob(const std::string& column, VersionId version)
    {
        sqlite3_stmt* st = nullptr;
        const std::string sql = "SELECT " + column + " FROM versions WHERE id = ?";
        REQUIRE(sqlite3_prepare_v2(handle(), sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
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
        REQUIRE(sqlite3_prepare_v2(handle(), sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
        sqlite3_bind_blob(st, 1, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 2, version.value);
        REQUIRE(sqlite3_step(st) == SQLITE_DONE);
        REQUIRE(sqlite3_changes(handle()) == 1);
        sqlite3_finalize(st);
    }

    void flip(const std::string& column, VersionId version, std::size_t byte)
    {
        Bytes b = blob(column, version);
        REQUIRE(byte < b.size());
        b[byte] ^= 0x01;
        set_blob(column, version, b);
    }
};

inline Bytes binary_value()
{
    Bytes b(256);
    std::iota(b.begin(), b.end(), 0);
    return b;
}

inline Bytes patterned(std::size_t size)
{
    Bytes b(size);
    for (std::size_t i = 0; i < size; ++i)
        b[i] = static_cast<std::uint8_t>((i * 31 + 7) % 251);
    return b;
}

inline std::string random_hex(std::size_t bytes)
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

inline bool file_contains(const std::string& path, const std::string& needle)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str().find(needle) != std::string::npos;
}

// ---- vaults --------------------------------------------------------------------

}  // namespace vaultfs::vault::secret_service_test
