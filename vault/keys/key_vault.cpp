#include "vault/keys/key_vault.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "vault/model/attributes.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::vault::keys {

using policy::Permission;
using json = nlohmann::json;

// ---- operations and algorithms ---------------------------------------------------

std::optional<Operations> Operations::parse(std::string_view text, std::string* bad)
{
    Operations o;
    std::size_t start = 0;
    while (start <= text.size()) {
        const std::size_t comma = std::min(text.find(',', start), text.size());
        const std::string_view op = text.substr(start, comma - start);
        if (op == "sign")
            o.sign = true;
        else if (op == "verify")
            o.verify = true;
        else if (op == "encrypt")
            o.encrypt = true;
        else if (op == "decrypt")
            o.decrypt = true;
        else if (op == "wrapkey")
            o.wrap = true;
        else if (op == "unwrapkey")
            o.unwrap = true;
        else {
            if (bad != nullptr)
                *bad = std::string(op);
            return std::nullopt;
        }
        start = comma + 1;
    }
    return o;
}

Operations Operations::all_for(hsm::KeyType type)
{
    if (hsm::is_rsa(type))
        return Operations{true, true, true, true, true, true};
    return Operations{.sign = true, .verify = true};
}

std::vector<std::string> Operations::names() const
{
    std::vector<std::string> out;
    if (sign)
        out.emplace_back("sign");
    if (verify)
        out.emplace_back("verify");
    if (encrypt)
        out.emplace_back("encrypt");
    if (decrypt)
        out.emplace_back("decrypt");
    if (wrap)
        out.emplace_back("wrapkey");
    if (unwrap)
        out.emplace_back("unwrapkey");
    return out;
}

bool Operations::within(const Operations& a) const
{
    return (!sign || a.sign) && (!verify || a.verify) && (!encrypt || a.encrypt) && (!decrypt || a.decrypt) &&
           (!wrap || a.wrap) && (!unwrap || a.unwrap);
}

std::string KeySpec::to_json() const
{
    json j{{"type", std::string(hsm::to_string(type))}, {"ops", ops.names()}};
    if (rotate_after)
        j["rotate_after"] = rotate_after->count();
    if (notify_before)
        j["notify_before"] = notify_before->count();
    if (expires_after)
        j["expires_after"] = expires_after->count();
    return j.dump();
}

std::optional<KeySpec> KeySpec::from_json(std::string_view text)
{
    const json j = json::parse(text, nullptr, false);
    if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
        return std::nullopt;
    KeySpec s;
    const auto type = hsm::key_type_from(j["type"].get<std::string>());
    if (!type)
        return std::nullopt;
    s.type = *type;
    std::string ops;
    for (const auto& o : j.value("ops", json::array()))
        if (o.is_string())
            ops += (ops.empty() ? "" : ",") + o.get<std::string>();
    if (!ops.empty()) {
        const auto parsed = Operations::parse(ops);
        if (!parsed)
            return std::nullopt;
        s.ops = *parsed;
    }
    const auto seconds = [&](const char* k) -> std::optional<std::chrono::seconds> {
        if (j.contains(k) && j[k].is_number_integer())
            return std::chrono::seconds(j[k].get<std::int64_t>());
        return std::nullopt;
    };
    s.rotate_after = seconds("rotate_after");
    s.notify_before = seconds("notify_before");
    s.expires_after = seconds("expires_after");
    return s;
}

namespace {

struct AlgorithmInfo {
    SignAlgorithm alg;
    std::string_view name;
    hsm::Mechanism mechanism;
};

const AlgorithmInfo sign_table[] = {
    {SignAlgorithm::RS256, "RS256", {hsm::Mechanism::Kind::rsa_pkcs1_sign, hsm::Digest::sha256}},
    {SignAlgorithm::RS384, "RS384", {hsm::Mechanism::Kind::rsa_pkcs1_sign, hsm::Digest::sha384}},
    {SignAlgorithm::RS512, "RS512", {hsm::Mechanism::Kind::rsa_pkcs1_sign, hsm::Digest::sha512}},
    {SignAlgorithm::PS256, "PS256", {hsm::Mechanism::Kind::rsa_pss, hsm::Digest::sha256}},
    {SignAlgorithm::PS384, "PS384", {hsm::Mechanism::Kind::rsa_pss, hsm::Digest::sha384}},
    {SignAlgorithm::PS512, "PS512", {hsm::Mechanism::Kind::rsa_pss, hsm::Digest::sha512}},
    {SignAlgorithm::ES256, "ES256", {hsm::Mechanism::Kind::ecdsa, hsm::Digest::sha256}},
    {SignAlgorithm::ES384, "ES384", {hsm::Mechanism::Kind::ecdsa, hsm::Digest::sha384}},
    {SignAlgorithm::ES512, "ES512", {hsm::Mechanism::Kind::ecdsa, hsm::Digest::sha512}},
};

struct DecryptInfo {
    DecryptAlgorithm alg;
    std::string_view name;
    hsm::Mechanism mechanism;
};

const DecryptInfo decrypt_table[] = {
    {DecryptAlgorithm::RSA_OAEP, "RSA-OAEP", {hsm::Mechanism::Kind::rsa_oaep, hsm::Digest::sha1}},
    {DecryptAlgorithm::RSA_OAEP_256, "RSA-OAEP-256", {hsm::Mechanism::Kind::rsa_oaep, hsm::Digest::sha256}},
    {DecryptAlgorithm::RSA1_5, "RSA1_5", {hsm::Mechanism::Kind::rsa_pkcs1_decrypt, hsm::Digest::sha1}},
};

const AlgorithmInfo& info(SignAlgorithm a)
{
    for (const auto& i : sign_table)
        if (i.alg == a)
            return i;
    return sign_table[0];
}

const DecryptInfo& info(DecryptAlgorithm a)
{
    for (const auto& i : decrypt_table)
        if (i.alg == a)
            return i;
    return decrypt_table[0];
}

// Whether a key of `type` can sign with `a` (ES256 needs P-256, ...).
bool fits(SignAlgorithm a, hsm::KeyType type)
{
    switch (a) {
    case SignAlgorithm::ES256:
        return type == hsm::KeyType::ec_p256;
    case SignAlgorithm::ES384:
        return type == hsm::KeyType::ec_p384;
    case SignAlgorithm::ES512:
        return type == hsm::KeyType::ec_p521;
    default:
        return hsm::is_rsa(type);
    }
}

struct PkeyFree {
    void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};

std::unique_ptr<EVP_PKEY, PkeyFree> parse_spki(std::span<const std::uint8_t> der)
{
    const unsigned char* p = der.data();
    return std::unique_ptr<EVP_PKEY, PkeyFree>(d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
}

std::string base64url(std::span<const std::uint8_t> bytes)
{
    static constexpr char table[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    std::string out;
    std::size_t i = 0;
    for (; i + 2 < bytes.size(); i += 3) {
        const std::uint32_t n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
        out += table[(n >> 18) & 63];
        out += table[(n >> 12) & 63];
        out += table[(n >> 6) & 63];
        out += table[n & 63];
    }
    if (i + 1 == bytes.size()) {
        const std::uint32_t n = bytes[i] << 16;
        out += table[(n >> 18) & 63];
        out += table[(n >> 12) & 63];
    } else if (i + 2 == bytes.size()) {
        const std::uint32_t n = (bytes[i] << 16) | (bytes[i + 1] << 8);
        out += table[(n >> 18) & 63];
        out += table[(n >> 12) & 63];
        out += table[(n >> 6) & 63];
    }
    return out;
}

std::vector<std::uint8_t> bn_param(EVP_PKEY* pkey, const char* name)
{
    BIGNUM* bn = nullptr;
    if (EVP_PKEY_get_bn_param(pkey, name, &bn) != 1)
        return {};
    std::vector<std::uint8_t> out(static_cast<std::size_t>(BN_num_bytes(bn)));
    BN_bn2bin(bn, out.data());
    BN_free(bn);
    return out;
}

std::string dur(std::chrono::seconds s) { return std::to_string(s.count()) + "s"; }

}  // namespace

std::optional<SignAlgorithm> sign_algorithm(std::string_view name)
{
    for (const auto& i : sign_table)
        if (i.name == name)
            return i.alg;
    return std::nullopt;
}

std::optional<DecryptAlgorithm> decrypt_algorithm(std::string_view name)
{
    for (const auto& i : decrypt_table)
        if (i.name == name)
            return i.alg;
    return std::nullopt;
}

std::string_view to_string(SignAlgorithm a) { return info(a).name; }
std::string_view to_string(DecryptAlgorithm a) { return info(a).name; }
std::size_t digest_size(SignAlgorithm a) { return hsm::digest_size(info(a).mechanism.digest); }

std::vector<SignAlgorithm> sign_algorithms(hsm::KeyType type, const Operations& ops)
{
    std::vector<SignAlgorithm> out;
    if (!ops.sign)
        return out;
    for (const auto& i : sign_table)
        if (fits(i.alg, type))
            out.push_back(i.alg);
    return out;
}

std::vector<DecryptAlgorithm> decrypt_algorithms(hsm::KeyType type, const Operations& ops)
{
    std::vector<DecryptAlgorithm> out;
    if (!hsm::is_rsa(type) || !(ops.decrypt || ops.unwrap))
        return out;
    for (const auto& i : decrypt_table)
        out.push_back(i.alg);
    return out;
}

std::optional<std::vector<std::uint8_t>> ecdsa_der_to_raw(std::span<const std::uint8_t> der, hsm::KeyType type)
{
    const std::size_t half = type == hsm::KeyType::ec_p256 ? 32 : type == hsm::KeyType::ec_p384 ? 48 : 66;
    const unsigned char* p = der.data();
    ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size()));
    if (sig == nullptr)
        return std::nullopt;
    std::vector<std::uint8_t> out(2 * half);
    const bool ok = BN_bn2binpad(ECDSA_SIG_get0_r(sig), out.data(), static_cast<int>(half)) == static_cast<int>(half) &&
                    BN_bn2binpad(ECDSA_SIG_get0_s(sig), out.data() + half, static_cast<int>(half)) ==
                        static_cast<int>(half);
    ECDSA_SIG_free(sig);
    if (!ok)
        return std::nullopt;
    return out;
}

std::optional<std::string> public_pem(std::span<const std::uint8_t> spki)
{
    auto pkey = parse_spki(spki);
    if (!pkey)
        return std::nullopt;
    BIO* bio = BIO_new(BIO_s_mem());
    std::optional<std::string> out;
    if (PEM_write_bio_PUBKEY(bio, pkey.get()) == 1) {
        char* data = nullptr;
        const long n = BIO_get_mem_data(bio, &data);
        out = std::string(data, static_cast<std::size_t>(n));
    }
    BIO_free(bio);
    return out;
}

std::optional<std::string> public_jwk(std::span<const std::uint8_t> spki, std::string_view kid,
                                      const std::vector<std::string>& key_ops)
{
    auto pkey = parse_spki(spki);
    if (!pkey)
        return std::nullopt;
    json j;
    if (EVP_PKEY_get_base_id(pkey.get()) == EVP_PKEY_RSA) {
        j = json{{"kty", "RSA"},
                 {"n", base64url(bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_N))},
                 {"e", base64url(bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_E))}};
    } else {
        char group[64] = {};
        std::size_t glen = 0;
        EVP_PKEY_get_utf8_string_param(pkey.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &glen);
        const std::string g(group, glen);
        const std::string crv = g == "prime256v1" ? "P-256" : g == "secp384r1" ? "P-384" : "P-521";
        const std::size_t half = crv == "P-256" ? 32 : crv == "P-384" ? 48 : 66;
        std::vector<std::uint8_t> point(1 + 2 * half);
        std::size_t plen = 0;
        if (EVP_PKEY_get_octet_string_param(pkey.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size(), &plen) !=
                1 ||
            plen != point.size())
            return std::nullopt;
        j = json{{"kty", "EC"},
                 {"crv", crv},
                 {"x", base64url(std::span(point).subspan(1, half))},
                 {"y", base64url(std::span(point).subspan(1 + half, half))}};
    }
    j["kid"] = std::string(kid);
    j["key_ops"] = key_ops;
    return j.dump() + "\n";
}

// ---- the service ---------------------------------------------------------------

KeySpec KeyVault::spec_of(const ObjectView& view) const
{
    return KeySpec::from_json(view.object.spec).value_or(KeySpec{});
}

Result<ObjectView> KeyVault::add_version(const Caller* caller, const VaultEntry& v, ObjectRow object,
                                         const KeySpec& spec, audit::Event& ev, bool create)
{
    const std::string label = "vaultfs-key:" + v.row.name + "/" + object.name;
    auto id = pairs_.create_key_pair(spec.type, label,
                                     hsm::KeyUsage{.sign = spec.ops.sign, .decrypt = spec.ops.decrypt || spec.ops.unwrap});
    if (!id)
        return core_.refuse(ev, id.error().code == hsm::Errc::mechanism_unsupported ? Errc::invalid_argument
                                                                                : Errc::key_unavailable,
                            id.error().code == hsm::Errc::mechanism_unsupported
                                ? id.error().message
                                : "the token cannot make the key: " + id.error().message);
    auto der = pairs_.public_key_der(*id);
    if (!der) {
        static_cast<void>(pairs_.destroy_key_pair(*id));
        return core_.refuse(ev, Errc::key_unavailable, der.error().message);
    }
    ObjectVersionRow row;
    row.created = now_micros();
    row.created_by = caller != nullptr ? caller->who.uid : 0;
    row.token_key = id->hex;
    row.public_der = std::move(*der);
    row.body = "{}";
    if (spec.expires_after)
        row.expires = row.created + spec.expires_after->count() * 1000000;
    ev.allowed = true;
    ev.result = "ok";
    auto w = core_.store().write([&](Store::Transaction& tx) -> Result<void> {
        if (create) {
            auto made = tx.insert_object(object);
            if (!made)
                return tl::unexpected(made.error());
            object.id = *made;
        }
        row.object = object.id;
        if (auto r = tx.insert_object_version(row); !r)
            return r;
        ev.version = row.number;
        return core_.record(ev);
    });
    if (!w) {
        // The token key belongs to no version: take it out again.
        static_cast<void>(pairs_.destroy_key_pair(*id));
        if (w.error().code == Errc::audit_unavailable)
            return tl::unexpected(w.error());
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    const Caller daemon{};
    return objects_.view_of(caller != nullptr ? *caller : daemon, v, std::move(object), std::move(row), false);
}

Result<ObjectView> KeyVault::create(const Caller& caller, std::string_view vault, std::string_view name, KeySpec spec)
{
    auto t = objects_.target(caller, vault, name, Permission::create, "key_create", true);
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "key_create", .caller = &caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    if (t->object)
        return core_.refuse(ev, Errc::already_exists, path + " exists in " + t->vault->row.name);
    if (!spec.ops.within(Operations::all_for(spec.type)))
        return core_.refuse(ev, Errc::invalid_argument,
                            "an " + std::string(hsm::to_string(spec.type)) + " key can only sign and verify");
    ObjectRow object{{}, t->vault->row.id, ObjectKind::key, std::string(name), now_micros(), caller.who.uid,
                     spec.to_json(), 1};
    return add_version(&caller, *t->vault, std::move(object), spec, ev, true);
}

Result<ObjectView> KeyVault::rotate(const Caller* caller, std::string_view vault, std::string_view name)
{
    auto t = objects_.target(caller, vault, name, Permission::rotate, "key_rotate", "rotation-policy");
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "key_rotate", .caller = caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    const KeySpec spec = KeySpec::from_json(t->object->spec).value_or(KeySpec{});
    return add_version(caller, *t->vault, std::move(*t->object), spec, ev, false);
}

Result<void> KeyVault::set_rotation(const Caller& caller, std::string_view vault, std::string_view name,
                                    const KeySpec& policy)
{
    auto t = objects_.target(caller, vault, name, Permission::rotate, "key_policy", false);
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "key_policy", .caller = &caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    KeySpec spec = KeySpec::from_json(t->object->spec).value_or(KeySpec{});
    spec.rotate_after = policy.rotate_after;
    spec.notify_before = policy.notify_before;
    spec.expires_after = policy.expires_after;
    ev.result = "ok";
    return core_.write_audited(ev, [&](Store::Transaction& tx) { return tx.update_object_spec(t->object->id, spec.to_json()); });
}

Result<std::vector<std::uint8_t>> KeyVault::public_key(const Caller& caller, const ObjectView& view)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = objects_.path_of(view.object.name);
    const Decided d = core_.decide(caller, **v, Permission::get, view.object.name);
    audit::Event ev{.op = "key_get", .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    ev.result = "ok";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return view.version.public_der;
}

Result<void> KeyVault::usable(const ObjectView& view, audit::Event& ev)
{
    const Micros now = now_micros();
    if (!view.version.enabled)
        return core_.refuse(ev, Errc::disabled, "version " + std::to_string(view.version.number) + " is disabled");
    if ((view.version.not_before && now < *view.version.not_before) ||
        (view.version.expires && now >= *view.version.expires))
        return core_.refuse(ev, Errc::not_valid_now,
                            "version " + std::to_string(view.version.number) + " is outside its validity");
    return {};
}

Result<std::vector<std::uint8_t>> KeyVault::sign(const Caller& caller, const ObjectView& view, SignAlgorithm alg,
                                                 std::span<const std::uint8_t> digest)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = objects_.path_of(view.object.name);
    const Decided d = core_.decide(caller, **v, Permission::sign, view.object.name);
    audit::Event ev{.op = "key_sign", .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number, .bytes = digest.size(), .attribute = to_string(alg)};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied, "no sign permission on " + path);
    const KeySpec spec = spec_of(view);
    if (!spec.ops.sign || !fits(alg, spec.type))
        return core_.refuse(ev, Errc::invalid_argument,
                            path + " (" + std::string(hsm::to_string(spec.type)) + ") does not sign " +
                                std::string(to_string(alg)));
    if (digest.size() != digest_size(alg))
        return core_.refuse(ev, Errc::invalid_argument,
                            std::string(to_string(alg)) + " signs a " + std::to_string(digest_size(alg)) +
                                "-byte digest, not " + std::to_string(digest.size()) + " bytes");
    if (auto r = usable(view, ev); !r)
        return tl::unexpected(r.error());
    auto sig = pairs_.sign(hsm::KeyId{view.version.token_key}, info(alg).mechanism, digest);
    if (!sig) {
        const Error e = Core::from_hsm(sig.error());
        return core_.refuse(ev, e.code, e.message);
    }
    ev.result = "ok";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return std::move(*sig);
}

Result<void> KeyVault::refuse_input(const Caller& caller, const ObjectView& view, std::string_view op,
                                    std::string_view alg, std::size_t bytes, std::size_t most)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = objects_.path_of(view.object.name);
    const Permission wanted = op == "key_sign" ? Permission::sign : op == "key_unwrap" ? Permission::unwrap
                                                                                       : Permission::decrypt;
    const Decided d = core_.decide(caller, **v, wanted, view.object.name);
    audit::Event ev{.op = op, .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number, .bytes = bytes, .attribute = alg};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    const std::string why = "more input than " + std::string(alg) + " takes (at most " + std::to_string(most) + " bytes)";
    ev.reason = why;
    return core_.refuse(ev, Errc::invalid_argument, why);
}

Result<hsm::SecureBuffer> KeyVault::decrypt(const Caller& caller, const ObjectView& view, DecryptAlgorithm alg,
                                            std::span<const std::uint8_t> data, bool unwrap)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = objects_.path_of(view.object.name);
    const Permission wanted = unwrap ? Permission::unwrap : Permission::decrypt;
    const Decided d = core_.decide(caller, **v, wanted, view.object.name);
    audit::Event ev{.op = unwrap ? "key_unwrap" : "key_decrypt", .caller = &caller, .vault = (*v)->row.name,
                    .secret = path, .version = view.version.number, .bytes = data.size(), .attribute = to_string(alg)};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied,
                            "no " + std::string(policy::to_string(wanted)) + " permission on " + path);
    const KeySpec spec = spec_of(view);
    if (!hsm::is_rsa(spec.type) || !(unwrap ? spec.ops.unwrap : spec.ops.decrypt))
        return core_.refuse(ev, Errc::invalid_argument,
                            path + " does not " + (unwrap ? "unwrap keys" : "decrypt") + " (its ops: " +
                                nlohmann::json(spec.ops.names()).dump() + ")");
    if (auto r = usable(view, ev); !r)
        return tl::unexpected(r.error());
    auto plain = pairs_.decrypt(hsm::KeyId{view.version.token_key}, info(alg).mechanism, data);
    if (!plain) {
        // Ciphertext that does not decrypt is bad input, not a broken store.
        const Error e = plain.error().code == hsm::Errc::authentication_failed
                            ? Error{Errc::invalid_argument, plain.error().message}
                            : Core::from_hsm(plain.error());
        return core_.refuse(ev, e.code, e.message);
    }
    ev.result = "ok";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return std::move(*plain);
}

Result<std::vector<std::pair<std::string, std::string>>> KeyVault::attributes(const Caller& caller,
                                                                              const ObjectView& view)
{
    const KeySpec spec = spec_of(view);
    std::string ops;
    for (const auto& o : spec.ops.names())
        ops += (ops.empty() ? "" : ",") + o;
    std::vector<std::pair<std::string, std::string>> extra{{"type", std::string(hsm::to_string(spec.type))},
                                                           {"ops", ops}};
    if (spec.rotate_after)
        extra.emplace_back("rotate_after", dur(*spec.rotate_after));
    if (spec.notify_before)
        extra.emplace_back("notify_before", dur(*spec.notify_before));
    if (spec.expires_after)
        extra.emplace_back("expires_after", dur(*spec.expires_after));
    return objects_.attributes(caller, view, std::move(extra));
}

Result<std::size_t> KeyVault::run_policies(Micros now)
{
    auto all = core_.store().all_objects();
    if (!all)
        return tl::unexpected(all.error());
    std::size_t done = 0;
    for (const auto& object : *all) {
        if (object.kind != ObjectKind::key)
            continue;
        const auto spec = KeySpec::from_json(object.spec);
        if (!spec)
            continue;
        auto current = core_.store().object_version(object.id, std::nullopt);
        if (!current || !*current)
            continue;
        auto v = core_.load_vault(object.vault);
        if (!v)
            continue;
        if (spec->rotate_after && now - (*current)->created >= spec->rotate_after->count() * 1000000) {
            if (auto r = rotate(nullptr, (*v)->row.name, object.name); r) {
                spdlog::info("key {}/{} rotated by its rotation policy: version {}", (*v)->row.name, object.name,
                             r->version.number);
                ++done;
                continue;
            } else {
                spdlog::error("rotating key {}/{} failed: {}", (*v)->row.name, object.name, r.error().message);
            }
        }
        if (spec->notify_before && (*current)->expires && (*current)->notified == 0 &&
            *(*current)->expires - now <= spec->notify_before->count() * 1000000) {
            ObjectVersionRow row = **current;
            row.notified = spec->notify_before->count() * 1000000;
            const std::string path = objects_.path_of(object.name);
            const std::string when = format_rfc3339(*row.expires);
            audit::Event ev{.op = "key_near_expiry", .vault = (*v)->row.name, .secret = path,
                            .version = row.number, .allowed = true, .rule = "rotation-policy", .result = "ok",
                            .reason = when};
            const auto mark = [&](Store::Transaction& tx) -> Result<void> {
                auto fresh = tx.object_version(object.id, row.number);
                if (!fresh)
                    return tl::unexpected(fresh.error());
                if (!*fresh)
                    return fail(Errc::not_found);
                (*fresh)->notified = row.notified;
                return tx.update_object_version(**fresh);
            };
            if (auto w = core_.write_audited(ev, mark); w) {
                spdlog::warn("key {}/{} version {} expires at {}", (*v)->row.name, object.name, row.number, when);
                ++done;
            }
        }
    }
    return done;
}

}  // namespace vaultfs::vault::keys
