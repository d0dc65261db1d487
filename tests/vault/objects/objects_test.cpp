// Unit tests for keys and certificates over the real parts (a SoftHSM token,
// a SQLite store, an audit log in a temporary directory): permissions and
// their records, what a version may do, and the rotation and renewal
// policies, driven by the clock each round is given (no waiting).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <openssl/evp.h>

#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "hsm/pkcs11/token_evp.hpp"
#include "tests/support/temp_token.hpp"
#include "vault/certificates/certificates.hpp"
#include "vault/keys/key_vault.hpp"
#include "vault/secrets/secret_service.hpp"
#include "vault/crypto/signing.hpp"

namespace vaultfs::vault {
namespace {

using testing::TempToken;
using json = nlohmann::json;

Caller caller(uid_t uid) { return Caller{policy::Subject{uid, uid, {}}, ::getpid()}; }
const Caller root = caller(0);
const Caller alice = caller(4101);
const Caller bob = caller(4102);

struct Stack {
    Stack()
    {
        auto k = token.open();
        REQUIRE(k);
        keys = std::move(*k);
        auto s = Store::open(token.dir() / "vault.db", Store::Mode::create);
        REQUIRE(s);
        store = std::move(*s);
        auto signing = keys->create_signing_key("audit");
        REQUIRE(signing);
        const audit::Signer signer{keys.get(), *signing};
        audit_path = token.dir() / "audit.jsonl";
        REQUIRE(audit::Log::create(audit_path, signer, audit::Bound{}, store.get()));
        audit::Log::Options o;
        o.path = audit_path;
        auto log = audit::Log::open(o, signer, store.get());
        REQUIRE(log);
        audit = std::move(*log);
        core = std::make_unique<Core>(*store, *audit, names, std::nullopt);
        auto der = keys->public_key_der(*signing);
        REQUIRE(der);
        service = std::make_unique<SecretService>(*core, *keys, deks,
                                                  Options{86400000, *signing, *public_key_pem(*der)});
        evp = std::make_unique<hsm::TokenEvp>(*keys);
        key_vault = std::make_unique<keys::KeyVault>(*core, *keys);
        certs = std::make_unique<certificates::Certificates>(*core, *keys, *keys, *evp);
        auto v = service->create_vault(root, "apps", VaultSettings{});
        REQUIRE(v);
        vault = v->id;
        REQUIRE(service->write_policy(root, vault, "allow uid:0 *\nallow uid:4101 get,sign,rotate\nallow uid:4102 get\n"));
    }

    // The audit records, parsed.
    std::vector<json> records() const
    {
        std::ifstream in(audit_path);
        std::vector<json> out;
        for (std::string line; std::getline(in, line);)
            out.push_back(json::parse(line));
        return out;
    }
    json last(const std::string& op) const
    {
        const auto all = records();
        for (auto it = all.rbegin(); it != all.rend(); ++it)
            if ((*it)["op"] == op)
                return *it;
        FAIL("no " << op << " record");
        return {};
    }

    TempToken token;
    std::unique_ptr<hsm::Pkcs11KeyService> keys;
    std::unique_ptr<Store> store;
    std::string audit_path;
    std::unique_ptr<audit::Log> audit;
    SystemNameResolver names;
    DekCache deks{16, std::chrono::seconds(60)};
    std::unique_ptr<Core> core;
    std::unique_ptr<SecretService> service;
    std::unique_ptr<hsm::TokenEvp> evp;
    std::unique_ptr<keys::KeyVault> key_vault;
    std::unique_ptr<certificates::Certificates> certs;
    VaultId vault;
};

std::vector<std::uint8_t> digest_of(const std::string& data)
{
    std::vector<std::uint8_t> out(32);
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr);
    return out;
}

TEST_CASE("keys: who may create and sign, what a version may do, every decision on the record", "[vault][keys]")
{
    Stack st;
    keys::KeySpec spec;
    spec.type = hsm::KeyType::ec_p256;
    spec.ops = keys::Operations::all_for(spec.type);
    // alice holds no create.
    auto refused = st.key_vault->create(alice, "apps", "signer", spec);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == Errc::access_denied);
    CHECK(st.last("key_create")["decision"] == "deny");
    // An EC key cannot decrypt.
    keys::KeySpec bad = spec;
    bad.ops.decrypt = true;
    auto wrong = st.key_vault->create(root, "apps", "signer", bad);
    REQUIRE_FALSE(wrong);
    CHECK(wrong.error().code == Errc::invalid_argument);

    auto made = st.key_vault->create(root, "apps", "signer", spec);
    REQUIRE(made);
    CHECK(made->version.number == 1);
    auto again = st.key_vault->create(root, "apps", "signer", spec);
    REQUIRE_FALSE(again);
    CHECK(again.error().code == Errc::already_exists);

    auto view = st.key_vault->objects().find(alice, st.vault, "signer");
    REQUIRE(view);
    auto sig = st.key_vault->sign(alice, *view, keys::SignAlgorithm::ES256, digest_of("x"));
    REQUIRE(sig);
    CHECK(st.last("key_sign")["result"] == "ok");
    auto by_bob = st.key_vault->sign(bob, *view, keys::SignAlgorithm::ES256, digest_of("x"));
    REQUIRE_FALSE(by_bob);
    CHECK(by_bob.error().code == Errc::access_denied);
    CHECK(st.last("key_sign")["uid"] == 4102);
    auto wrong_alg = st.key_vault->sign(alice, *view, keys::SignAlgorithm::ES384, std::vector<std::uint8_t>(48));
    REQUIRE_FALSE(wrong_alg);
    CHECK(wrong_alg.error().code == Errc::invalid_argument);

    // Disabled, or expired: nothing signs.
    REQUIRE(st.key_vault->objects().set_attribute(root, *view, "enabled", "false"));
    auto disabled = st.key_vault->objects().find(alice, st.vault, "signer@1");
    REQUIRE(disabled);
    auto none = st.key_vault->sign(alice, *disabled, keys::SignAlgorithm::ES256, digest_of("x"));
    REQUIRE_FALSE(none);
    CHECK(none.error().code == Errc::disabled);
    REQUIRE(st.key_vault->objects().set_attribute(root, *disabled, "enabled", "true"));
    // A view taken before that change does not write it back.
    REQUIRE(st.key_vault->objects().set_attribute(root, *disabled, "expires", "2020-01-01T00:00:00Z"));
    auto expired = st.key_vault->objects().find(alice, st.vault, "signer@1");
    REQUIRE(expired);
    auto late = st.key_vault->sign(alice, *expired, keys::SignAlgorithm::ES256, digest_of("x"));
    REQUIRE_FALSE(late);
    CHECK(late.error().code == Errc::not_valid_now);
    // bob may read the public half, not change attributes.
    CHECK(st.key_vault->public_key(bob, *view));
    auto attr = st.key_vault->objects().set_attribute(bob, *view, "enabled", "false");
    REQUIRE_FALSE(attr);
    CHECK(attr.error().code == Errc::access_denied);
}

TEST_CASE("rotation policies rotate once due and warn once per version before expiry", "[vault][keys][policies]")
{
    Stack st;
    keys::KeySpec spec;
    spec.type = hsm::KeyType::ec_p256;
    spec.ops = keys::Operations::all_for(spec.type);
    spec.rotate_after = std::chrono::seconds(3600);
    spec.notify_before = std::chrono::seconds(600);
    spec.expires_after = std::chrono::seconds(7200);
    REQUIRE(st.key_vault->create(root, "apps", "rotating", spec));
    const Micros now = now_micros();
    auto n = st.key_vault->run_policies(now);  // nothing due
    REQUIRE(n);
    CHECK(*n == 0);
    // Ten minutes before expiry... but after rotate_after: it rotates first.
    n = st.key_vault->run_policies(now + 3601LL * 1000000);
    REQUIRE(n);
    CHECK(*n == 1);
    auto current = st.key_vault->objects().find(root, st.vault, "rotating");
    REQUIRE(current);
    CHECK(current->version.number == 2);
    CHECK(st.last("key_rotate")["rule"] == "rotation-policy");
    // A key without rotate_after but near its expiry gets one warning.
    keys::KeySpec warn = spec;
    warn.rotate_after.reset();
    REQUIRE(st.key_vault->create(root, "apps", "expiring", warn));
    const Micros near = now + (7200 - 300) * 1000000LL;
    REQUIRE(st.key_vault->run_policies(near));
    REQUIRE(st.key_vault->run_policies(near + 1000000));
    int warnings = 0;
    for (const auto& r : st.records())
        warnings += r["op"] == "key_near_expiry" && r["secret"] == ".keys/expiring" ? 1 : 0;
    CHECK(warnings == 1);
}

TEST_CASE("certificates: files by permission and exportability; renewal by policy at its share of the validity",
          "[vault][certificates][policies]")
{
    Stack st;
    certificates::CertPolicy p;
    p.subject = "CN=web";
    p.validity = std::chrono::seconds(1000);
    p.exportable = true;
    p.renew_at_percent = 50;
    auto web = st.certs->create(root, "apps", "web", p);
    REQUIRE(web);
    CHECK(certificates::status_of(*web) == "issued");
    auto view = st.certs->objects().find(bob, st.vault, "web");
    REQUIRE(view);
    auto key = st.certs->read_file(bob, *view, certificates::CertFile::key);
    REQUIRE(key);
    CHECK(std::string(reinterpret_cast<const char*>(key->data()), key->size()).find("BEGIN PRIVATE KEY") !=
          std::string::npos);
    // Not exportable: no key file, whoever asks.
    certificates::CertPolicy hidden = p;
    hidden.exportable = false;
    hidden.renew_at_percent.reset();
    REQUIRE(st.certs->create(root, "apps", "hidden", hidden));
    auto hv = st.certs->objects().find(root, st.vault, "hidden");
    REQUIRE(hv);
    auto none = st.certs->read_file(root, *hv, certificates::CertFile::key);
    REQUIRE_FALSE(none);
    CHECK(none.error().code == Errc::not_found);
    CHECK(st.certs->read_file(root, *hv, certificates::CertFile::chain));
    // A bad subject changes nothing.
    certificates::CertPolicy nonsense = p;
    nonsense.subject = "not a subject";
    auto bad = st.certs->create(root, "apps", "bad", nonsense);
    REQUIRE_FALSE(bad);
    CHECK(bad.error().code == Errc::invalid_argument);
    CHECK_FALSE(st.certs->objects().find(root, st.vault, "bad"));

    const Micros now = now_micros();
    auto n = st.certs->run_policies(now + 100LL * 1000000);
    REQUIRE(n);
    CHECK(*n == 0);
    n = st.certs->run_policies(now + 600LL * 1000000);  // past 50%
    REQUIRE(n);
    CHECK(*n == 1);  // web only: hidden has no renewal policy
    auto renewed = st.certs->objects().find(root, st.vault, "web");
    REQUIRE(renewed);
    CHECK(renewed->version.number == 2);
    CHECK(renewed->version.public_der != view->version.public_der);  // a new key
    CHECK(st.last("cert_renew")["rule"] == "renewal-policy");
}

}  // namespace
}  // namespace vaultfs::vault
