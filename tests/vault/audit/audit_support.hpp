// Support for the audit unit tests: a real token's signing key, a key
// service that can be made to refuse signatures (fault injection), a clock
// the test moves, and helpers to read, edit and re-seal audit lines the way
// a forger without the token key would.
#pragma once

#include <catch2/catch.hpp>

#include <atomic>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/support/temp_token.hpp"
#include "vault/audit/format.hpp"
#include "vault/audit/log.hpp"
#include "vault/audit/verify.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit::testing {

using vaultfs::testing::TempDir;
using vaultfs::testing::TempToken;
using json = nlohmann::json;
using Lines = std::vector<std::string>;

// The token's key service, with signatures that can be switched off.
class FlakyKeys final : public hsm::KeyService {
public:
    explicit FlakyKeys(hsm::KeyService* real) : real_(*real) {}
    std::atomic<bool> refuse_signatures{false};

    hsm::Result<hsm::KeyId> create_kek(const std::string& l, hsm::KekReach r) override { return real_.create_kek(l, r); }
    hsm::Result<void> find_key(const hsm::KeyId& id) override { return real_.find_key(id); }
    hsm::Result<std::vector<std::uint8_t>> seal(const hsm::KeyId& k, const hsm::SecureBuffer& d,
                                                std::span<const std::uint8_t> a) override
    {
        return real_.seal(k, d, a);
    }
    hsm::Result<hsm::SecureBuffer> unseal(const hsm::KeyId& k, std::span<const std::uint8_t> s,
                                          std::span<const std::uint8_t> a) override
    {
        return real_.unseal(k, s, a);
    }
    hsm::Result<hsm::KeyId> create_signing_key(const std::string& l) override { return real_.create_signing_key(l); }
    hsm::Result<std::vector<std::uint8_t>> public_key_der(const hsm::KeyId& k) override { return real_.public_key_der(k); }
    hsm::Result<std::vector<std::uint8_t>> sign_digest(const hsm::KeyId& k,
                                                       std::span<const std::uint8_t, 32> d) override
    {
        if (refuse_signatures)
            return hsm::fail(hsm::Errc::device_error, "the token refuses (test)");
        return real_.sign_digest(k, d);
    }
    hsm::Result<void> ping() override { return real_.ping(); }

private:
    hsm::KeyService& real_;
};

// The token and its audit signing key, with the public half as PEM.
struct Signing {
    Signing() : keys(open_keys(token)), flaky(keys.get())
    {
        auto id = keys->create_signing_key("vaultfs-audit");
        REQUIRE(id);
        key = *id;
        auto der = keys->public_key_der(key);
        REQUIRE(der);
        auto p = public_key_pem(*der);
        REQUIRE(p);
        pem = *p;
    }
    Signer signer() { return Signer{&flaky, key}; }

    static std::unique_ptr<hsm::Pkcs11KeyService> open_keys(const TempToken& token)
    {
        auto k = token.open();
        if (!k)
            FAIL("cannot log in to the test token: " << k.error().message);
        return std::move(*k);
    }

    TempToken token;
    std::unique_ptr<hsm::Pkcs11KeyService> keys;
    FlakyKeys flaky;
    hsm::KeyId key;
    std::string pem;
};

// A clock the test moves; starts at a fixed, realistic time.
struct TestClock {
    std::shared_ptr<std::atomic<Micros>> now = std::make_shared<std::atomic<Micros>>(1'800'000'000'000'000);
    std::function<Micros()> fn() const
    {
        return [n = now] { return n->load(); };
    }
    void advance_seconds(double s) { *now += static_cast<Micros>(s * 1e6); }
};

inline Log::Options options_for(const std::string& path, Bound bound = {}, std::function<Micros()> clock = {})
{
    Log::Options o;
    o.path = path;
    o.bound = bound;
    o.clock = std::move(clock);
    o.reserve_bytes = 0;
    return o;
}

inline std::unique_ptr<Log> create_and_open(Signing& signing, const std::string& path, Store* anchor = nullptr,
                                            Bound bound = {}, std::function<Micros()> clock = {})
{
    auto created = Log::create(path, signing.signer(), bound, anchor);
    if (!created)
        FAIL("Log::create failed: " << created.error().message);
    auto log = Log::open(options_for(path, bound, std::move(clock)), signing.signer(), anchor);
    if (!log)
        FAIL("Log::open failed: " << log.error().message);
    return std::move(*log);
}

inline const Caller& root_caller()
{
    static const Caller c{policy::Subject{0, 0, {}}, 1};
    return c;
}

inline Event get_event(const Caller& who = root_caller(), std::string_view secret = "db-password")
{
    return Event{.op = "get",
                 .caller = &who,
                 .vault = "payments",
                 .secret = secret,
                 .version = 1,
                 .allowed = true,
                 .rule = "1: allow uid:0 *",
                 .result = "ok",
                 .bytes = 7};
}

inline void append_n(Log& log, int n, const Caller& who = root_caller())
{
    for (int i = 0; i < n; ++i) {
        auto r = log.append(get_event(who));
        if (!r)
            FAIL("append " << i << " failed: " << r.error().message);
    }
}

inline Lines read_lines(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    Lines lines;
    std::string line;
    while (std::getline(in, line))
        lines.push_back(line);
    return lines;
}

inline void write_lines(const std::string& path, const Lines& lines)
{
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    for (const auto& l : lines)
        out << l << '\n';
}

inline std::string read_all(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// A copy of `lines` at `path`, changed by `edit`.
template <class Edit>
std::string tampered_copy(const std::string& path, Lines lines, Edit&& edit)
{
    edit(lines);
    write_lines(path, lines);
    return path;
}

inline json fields(const std::string& line)
{
    auto r = parse(line);
    if (!r)
        FAIL("not a record: " << r.error() << "\n" << line);
    return r->fields;
}

inline std::string op_of(const std::string& line) { return fields(line).value("op", std::string()); }

inline std::size_t count_op(const Lines& lines, const std::string& op)
{
    std::size_t n = 0;
    for (const auto& l : lines)
        n += op_of(l) == op ? 1 : 0;
    return n;
}

// A record body with `f`'s fields, in their order, `prev` last (as the
// writer puts it).
inline std::string body_of(const json& f)
{
    Body b;
    for (const auto& [k, v] : f.items()) {
        if (k == "prev")
            continue;
        if (v.is_string())
            b.text(k, v.get<std::string>());
        else if (v.is_boolean())
            b.boolean(k, v.get<bool>());
        else if (v.is_number_unsigned())
            b.number(k, v.get<std::uint64_t>());
        else if (v.is_number_integer())
            b.integer(k, v.get<std::int64_t>());
        else
            b.text(k, "");
    }
    if (f.contains("prev"))
        b.text("prev", f["prev"].get<std::string>());
    return std::move(b).finish();
}

// What a forger without the token key can do: rewrite a record's fields and
// re-seal it unsigned, with a hash that matches its bytes. Lines from
// `from` on are re-linked: seq renumbered from the record before, prev set
// to the new hashes.
inline Lines forge(Lines lines, std::size_t from, const std::function<void(json&)>& edit = {})
{
    REQUIRE(from > 0);
    REQUIRE(from < lines.size());
    auto before = parse(lines[from - 1]);
    REQUIRE(before);
    std::uint64_t seq = before->seq;
    std::string prev = before->hash;
    for (std::size_t i = from; i < lines.size(); ++i) {
        json f = fields(lines[i]);
        if (edit)
            edit(f);
        f["seq"] = ++seq;
        f["prev"] = prev;
        // Rebuilt in the writer's own field order, so only what the forger
        // changed differs.
        const SealedLine sealed = seal(body_of(f));
        lines[i] = sealed.text;
        prev = sealed.hash;
    }
    return lines;
}

inline std::string joined(const std::vector<std::string>& v)
{
    std::string s;
    for (const auto& w : v)
        s += w + "\n";
    return s;
}

}  // namespace vaultfs::vault::audit::testing
