#include "vault/hosts/enrolment.hpp"

#include <openssl/rand.h>
#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hsm/hex.hpp"
#include "vault/audit/log.hpp"
#include "vault/signing.hpp"
#include "vault/types.hpp"

namespace vaultfs::vault::hosts {

using nlohmann::json;

namespace {

constexpr const char* request_kind = "vaultfs join request v1";
constexpr const char* grant_kind = "vaultfs join grant v1";

std::array<std::uint8_t, 32> sha256(const std::string& text)
{
    std::array<std::uint8_t, 32> d{};
    SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), d.data());
    return d;
}

std::vector<std::uint8_t> unhex(const json& j, const char* key)
{
    if (!j.contains(key) || !j[key].is_string())
        return {};
    auto v = hsm::from_hex(j[key].get<std::string>());
    return v ? *v : std::vector<std::uint8_t>();
}

// What a KEK's check value seals: a block of zeros bound to the KEK's id.
std::vector<std::uint8_t> check_aad(const hsm::KeyId& kek)
{
    const std::string s = "vaultfs kek check\n" + kek.hex;
    return std::vector<std::uint8_t>(s.begin(), s.end());
}

// The grant's signed text: everything but the signature, canonical.
std::string grant_body(const json& g)
{
    json body = g;
    body.erase("signature");
    return body.dump();
}

// What a host's enrolment signature covers.
std::array<std::uint8_t, 32> enrolment_digest(const std::string& name, const std::vector<std::uint8_t>& transport,
                                              const std::vector<std::uint8_t>& signing, const std::string& by)
{
    return sha256("vaultfs host enrolment v1\n" + name + "\n" + hsm::to_hex(transport) + "\n" + hsm::to_hex(signing) +
                  "\n" + by);
}

void record(audit::Log* log, std::string_view op, std::string_view host, std::string_view result,
            std::string_view reason)
{
    if (log == nullptr)
        return;
    audit::Event ev{.op = op, .allowed = result == "ok", .rule = "admin", .result = result, .reason = reason,
                    .attribute = host};
    if (auto r = log->append(ev); !r)
        spdlog::error("audit: cannot record {} of host {}: {}", op, host, r.error().message);
}

}  // namespace

std::string Request::fingerprint() const
{
    const auto d = sha256(std::string(request_kind) + "\n" + host + "\n" + hsm::to_hex(transport_public) + "\n" +
                          hsm::to_hex(signing_public) + "\n" + nonce);
    const std::string hex = hsm::to_hex(d);
    std::string out;
    for (std::size_t i = 0; i < hex.size(); i += 8) {
        if (!out.empty())
            out += '-';
        out += hex.substr(i, 8);
    }
    return out;
}

std::string Request::render() const
{
    return json{{"kind", request_kind},
                {"host", host},
                {"transport_public", hsm::to_hex(transport_public)},
                {"signing_public", hsm::to_hex(signing_public)},
                {"nonce", nonce},
                {"fingerprint", fingerprint()}}
        .dump();
}

Result<Request> parse_request(const std::string& text)
{
    const json j = json::parse(text, nullptr, false);
    if (!j.is_object() || j.value("kind", "") != request_kind)
        return fail(Errc::invalid_argument, "not a vaultfs join request (made by `vaultfs join request`)");
    Request r{j.value("host", ""), unhex(j, "transport_public"), unhex(j, "signing_public"), j.value("nonce", "")};
    if (r.host.empty() || r.transport_public.empty() || r.signing_public.empty() || r.nonce.size() != 32)
        return fail(Errc::invalid_argument, "the join request is incomplete");
    // The fingerprint inside is what its maker printed; the one that counts
    // is recomputed, and a request edited on the way no longer matches it.
    if (j.value("fingerprint", "") != r.fingerprint())
        return fail(Errc::invalid_argument, "the join request was altered: its fingerprint does not match its content");
    return r;
}

Enrolment::Enrolment(Store& store, hsm::Pkcs11KeyService& keys, std::string host, hsm::KeyId signing_key,
                     std::string trust_file)
    : store_(store),
      keys_(keys),
      host_(std::move(host)),
      signing_key_(std::move(signing_key)),
      trust_file_(std::move(trust_file))
{
}

Result<std::vector<std::vector<std::uint8_t>>> Enrolment::trusted_keys()
{
    std::vector<std::vector<std::uint8_t>> keys;
    auto own = keys_.public_key_der(signing_key_);
    if (!own)
        return fail(Errc::key_unavailable, "the token does not give the audit key: " + own.error().message);
    keys.push_back(*own);
    std::ifstream in(trust_file_);
    std::string line;
    while (std::getline(in, line)) {
        const auto hex = line.substr(0, line.find(' '));
        if (auto der = hsm::from_hex(hex); der && !der->empty())
            keys.push_back(*der);
    }
    return keys;
}

Result<void> Enrolment::trust(const std::vector<std::uint8_t>& signing_public)
{
    auto known = trusted_keys();
    if (!known)
        return tl::unexpected(known.error());
    if (std::find(known->begin(), known->end(), signing_public) != known->end())
        return {};
    std::ofstream out(trust_file_, std::ios::app);
    out << hsm::to_hex(signing_public) << "\n";
    out.flush();
    if (!out)
        return fail(Errc::storage, "cannot write " + trust_file_);
    ::chmod(trust_file_.c_str(), 0600);
    return {};
}

Result<void> Enrolment::check_enrolment(const std::vector<HostRow>& hosts, const HostRow& h)
{
    auto trusted = trusted_keys();
    if (!trusted)
        return tl::unexpected(trusted.error());
    const HostRow* cur = &h;
    for (std::size_t step = 0; step <= hosts.size(); ++step) {
        const std::string by = cur->enrolled_by.value_or("");
        const HostRow* granter = nullptr;
        for (const auto& other : hosts)
            if (other.name == by)
                granter = &other;
        if (granter == nullptr || cur->enrolment_sig.empty())
            break;
        auto pem = public_key_pem(granter->signing_public);
        if (!pem)
            break;
        const SignatureVerifier verifier(*pem);
        if (!verifier.usable() ||
            !verifier.verify(enrolment_digest(cur->name, cur->transport_public, cur->signing_public, by),
                             cur->enrolment_sig))
            break;
        if (std::find(trusted->begin(), trusted->end(), granter->signing_public) != trusted->end())
            return {};
        if (granter == cur)
            break;  // a root this host does not trust
        cur = granter;
    }
    return fail(Errc::integrity, "host '" + h.name + "' has no enrolment signed by a host this one trusts "
                                 "(a row written into the database directly?): no KEK is wrapped for it");
}

Result<Request> Enrolment::register_host(const std::string& status)
{
    if (!store_.shared())
        return fail(Errc::invalid_argument, "hosts enrol only in a PostgreSQL store");
    if (auto existing = store_.host_by_name(host_); !existing)
        return tl::unexpected(existing.error());
    else if (*existing)
        return fail(Errc::already_exists, "the store already has a host named '" + host_ +
                                              "'; give this one another name (--host), or `vaultfs host remove` it");
    auto transport = keys_.create_transport_key("vaultfs-transport " + host_);
    if (!transport)
        return fail(Errc::key_unavailable, "cannot make the transport key: " + transport.error().message);
    auto transport_public = keys_.public_key_der(*transport);
    auto signing_public = keys_.public_key_der(signing_key_);
    if (!transport_public || !signing_public)
        return fail(Errc::key_unavailable, "the token does not give the public keys");
    std::array<std::uint8_t, 16> nonce{};
    if (RAND_bytes(nonce.data(), nonce.size()) != 1)
        return fail(Errc::storage, "RAND_bytes failed");
    Request req{host_, *transport_public, *signing_public, hsm::to_hex(nonce)};
    const Micros now = now_micros();
    HostRow row{0,
                host_,
                status,
                transport->hex,
                *transport_public,
                *signing_public,
                now,
                status == "enrolled" ? std::optional<Micros>(now) : std::nullopt,
                status == "enrolled" ? std::optional<std::string>(host_) : std::nullopt,
                {}};
    if (status == "enrolled") {
        auto sig = keys_.sign_digest(signing_key_,
                                     enrolment_digest(host_, *transport_public, *signing_public, host_));
        if (!sig)
            return fail(Errc::key_unavailable, "cannot sign this host's enrolment: " + sig.error().message);
        row.enrolment_sig = *sig;
    }
    std::int64_t id = 0;
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        auto made = tx.insert_host(row);
        if (!made)
            return tl::unexpected(made.error());
        id = *made;
        return {};
    });
    if (!w) {
        (void)keys_.destroy_key_pair(*transport);
        return tl::unexpected(w.error());
    }
    if (auto r = store_.refresh_host(); !r)
        return tl::unexpected(r.error());
    auto w2 = store_.write([&](Store::Transaction& tx) { return tx.set_setting(request_setting, req.fingerprint()); });
    if (!w2)
        return tl::unexpected(w2.error());
    return req;
}

Result<std::vector<std::uint8_t>> Enrolment::make_check(const hsm::KeyId& kek)
{
    auto zeros = hsm::SecureBuffer::allocate(32);
    if (!zeros)
        return fail(Errc::out_of_memory, "the locked heap is exhausted");
    auto sealed = keys_.seal(kek, *zeros, check_aad(kek));
    if (!sealed)
        return fail(Errc::key_unavailable, "cannot seal KEK " + kek.hex + "'s check value: " + sealed.error().message);
    return *sealed;
}

Result<void> Enrolment::wrap_for_hosts(Store::Transaction& tx, const hsm::KeyId& kek)
{
    auto check = make_check(kek);
    if (!check)
        return tl::unexpected(check.error());
    if (auto r = tx.put_kek_check(kek.hex, *check); !r)
        return r;
    auto hosts = tx.hosts();
    if (!hosts)
        return tl::unexpected(hosts.error());
    for (const auto& h : *hosts) {
        if (h.status != "enrolled" || h.id == tx.host())
            continue;
        if (auto r = check_enrolment(*hosts, h); !r) {
            spdlog::error("{}", r.error().message);
            continue;
        }
        auto wrapped = keys_.wrap_kek(kek, h.transport_public);
        if (!wrapped)
            return fail(Errc::key_unavailable,
                        "cannot wrap KEK " + kek.hex + " for host " + h.name + ": " + wrapped.error().message);
        if (auto r = tx.put_kek_grant(KekGrantRow{kek.hex, h.id, wrapped->wrapped_key, wrapped->wrapped_kek, host_,
                                                  now_micros()});
            !r)
            return r;
    }
    return {};
}

Result<std::string> Enrolment::grant(const std::string& request_text, const std::string& expected, audit::Log* audit)
{
    const auto refuse = [&](const std::string& who, Error e) -> Result<std::string> {
        record(audit, "host_grant", who, result_name(e.code), e.message);
        return tl::unexpected(std::move(e));
    };
    auto req = parse_request(request_text);
    if (!req)
        return refuse("", req.error());
    if (!expected.empty() && expected != req->fingerprint())
        return refuse(req->host, Error{Errc::invalid_argument, "the request's fingerprint is " + req->fingerprint() +
                                                                   ", not the " + expected + " you were given"});
    auto row = store_.host_by_name(req->host);
    if (!row)
        return refuse(req->host, row.error());
    if (!*row)
        return refuse(req->host, Error{Errc::not_found, "no host '" + req->host + "' asked to join this store"});
    if ((*row)->transport_public != req->transport_public || (*row)->signing_public != req->signing_public)
        return refuse(req->host, Error{Errc::invalid_argument,
                                       "the request's keys are not the ones host '" + req->host +
                                           "' registered in the store: it was tampered with, or is for another store"});
    // A second grant for the same request is harmless (it wraps the same
    // KEKs again), but a host never grants itself.
    if ((*row)->name == host_)
        return refuse(req->host, Error{Errc::invalid_argument, "a host does not grant itself"});

    json keks = json::array();
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        auto ids = tx.vault_kek_ids();
        if (!ids)
            return tl::unexpected(ids.error());
        keks = json::array();
        for (const auto& id : *ids) {
            const hsm::KeyId kek{id};
            auto check = tx.kek_check(id);
            if (!check)
                return tl::unexpected(check.error());
            if (!*check) {  // a vault from before checks (a migrated store)
                auto made = make_check(kek);
                if (!made)
                    return tl::unexpected(made.error());
                if (auto r = tx.put_kek_check(id, *made); !r)
                    return r;
            }
            auto wrapped = keys_.wrap_kek(kek, req->transport_public);
            if (!wrapped)
                return fail(Errc::key_unavailable, "cannot wrap KEK " + id + ": " + wrapped.error().message);
            if (auto r = tx.put_kek_grant(
                    KekGrantRow{id, (*row)->id, wrapped->wrapped_key, wrapped->wrapped_kek, host_, now_micros()});
                !r)
                return r;
            keks.push_back({{"kek_id", id},
                            {"wrapped_key", hsm::to_hex(wrapped->wrapped_key)},
                            {"wrapped_kek", hsm::to_hex(wrapped->wrapped_kek)}});
        }
        auto sig = keys_.sign_digest(signing_key_, enrolment_digest(req->host, req->transport_public,
                                                                     req->signing_public, host_));
        if (!sig)
            return fail(Errc::key_unavailable, "cannot sign the enrolment: " + sig.error().message);
        return tx.enrol_host((*row)->id, now_micros(), host_, *sig);
    });
    if (!w)
        return refuse(req->host, w.error());
    json g{{"kind", grant_kind},
           {"host", req->host},
           {"request", req->fingerprint()},
           {"granted_by", host_},
           {"time", now_micros()},
           {"keks", keks}};
    const auto digest = sha256(grant_body(g));
    auto sig = keys_.sign_digest(signing_key_, digest);
    if (!sig)
        return refuse(req->host, Error{Errc::key_unavailable, "cannot sign the grant: " + sig.error().message});
    g["signature"] = hsm::to_hex(*sig);
    if (auto r = trust(req->signing_public); !r)
        return refuse(req->host, r.error());
    record(audit, "host_grant", req->host, "ok", std::to_string(keks.size()) + " KEKs wrapped for it");
    return g.dump();
}

Result<void> Enrolment::import_one(const KekGrantRow& grant, const hsm::KeyId& transport)
{
    const hsm::KeyId kek{grant.kek_id};
    auto check = store_.kek_check(grant.kek_id);
    if (!check)
        return tl::unexpected(check.error());
    if (!*check)
        return fail(Errc::integrity, "KEK " + grant.kek_id + " has no check value in the store; it is not taken");
    if (auto r = keys_.unwrap_kek(transport,
                                  hsm::Pkcs11KeyService::WrappedKek{grant.wrapped_key, grant.wrapped_kek}, kek,
                                  "vaultfs-kek (from " + grant.granted_by + ")");
        !r)
        return fail(r.error().code == hsm::Errc::authentication_failed ? Errc::integrity : Errc::key_unavailable,
                    r.error().message);
    // The KEK must be the one that sealed the store's check value.
    auto opened = keys_.unseal(kek, **check, check_aad(kek));
    if (!opened) {
        (void)keys_.destroy_kek(kek);
        return fail(Errc::integrity, "the KEK granted as " + grant.kek_id + " does not open its check value: refused");
    }
    return {};
}

Result<std::size_t> Enrolment::accept(const std::string& grant_text, audit::Log* audit)
{
    const auto refuse = [&](Error e) -> Result<std::size_t> {
        record(audit, "host_accept", host_, result_name(e.code), e.message);
        return tl::unexpected(std::move(e));
    };
    const json g = json::parse(grant_text, nullptr, false);
    if (!g.is_object() || g.value("kind", "") != grant_kind || !g.contains("keks") || !g["keks"].is_array())
        return refuse(Error{Errc::invalid_argument, "not a vaultfs join grant (made by `vaultfs join grant`)"});
    if (g.value("host", "") != host_)
        return refuse(Error{Errc::invalid_argument,
                            "the grant is for host '" + g.value("host", "") + "', this is '" + host_ + "'"});
    auto mine = store_.setting(request_setting);
    if (!mine)
        return refuse(mine.error());
    if (!*mine || g.value("request", "") != **mine)
        return refuse(Error{Errc::invalid_argument,
                            "the grant answers request " + g.value("request", "") + ", not this host's current one (" +
                                mine->value_or("none") + "): an old or replayed grant"});
    auto done = store_.setting(accepted_setting);
    if (!done)
        return refuse(done.error());
    if (*done && **done == **mine)
        return refuse(Error{Errc::already_exists, "this grant was accepted already: a replayed grant"});
    auto me = store_.host_by_name(host_);
    if (!me || !*me)
        return refuse(Error{Errc::not_found, "this host is not in the store"});
    const std::string by = g.value("granted_by", "");
    if ((*me)->status != "enrolled" || (*me)->enrolled_by.value_or("") != by)
        return refuse(Error{Errc::invalid_argument, "the store does not say that '" + by + "' enrolled this host"});
    auto granter = store_.host_by_name(by);
    if (!granter || !*granter || (*granter)->status != "enrolled")
        return refuse(Error{Errc::not_found, "the granting host '" + by + "' is not enrolled in the store"});
    auto pem = public_key_pem((*granter)->signing_public);
    if (!pem)
        return refuse(pem.error());
    const SignatureVerifier verifier(*pem);
    const auto sig = unhex(g, "signature");
    if (!verifier.usable() || !verifier.verify(sha256(grant_body(g)), sig))
        return refuse(Error{Errc::integrity, "the grant's signature is not " + by + "'s: altered, or forged"});

    std::size_t imported = 0;
    for (const auto& k : g["keks"]) {
        const KekGrantRow row{k.value("kek_id", ""), (*me)->id, unhex(k, "wrapped_key"), unhex(k, "wrapped_kek"), by,
                              0};
        if (keys_.find_key(hsm::KeyId{row.kek_id}))
            continue;  // already here (imported from the store meanwhile)
        if (auto r = import_one(row, hsm::KeyId{(*me)->transport_key}); !r)
            return refuse(r.error());
        ++imported;
    }
    if (auto r = store_.write([&](Store::Transaction& tx) { return tx.set_setting(accepted_setting, **mine); }); !r)
        return refuse(r.error());
    if (auto r = trust((*granter)->signing_public); !r)
        return refuse(r.error());
    record(audit, "host_accept", host_, "ok", std::to_string(imported) + " KEKs imported, granted by " + by);
    return imported;
}

Result<std::size_t> Enrolment::import_granted(audit::Log* audit)
{
    if (store_.host_id() == 0)
        return 0;
    auto me = store_.host_by_name(host_);
    if (!me)
        return tl::unexpected(me.error());
    if (!*me)
        return 0;
    // Only once this host has accepted a grant (checked its signature), or
    // is the store's first: before, nothing in the store is taken on trust.
    if ((*me)->enrolled_by.value_or("") != host_) {
        auto accepted = store_.setting(accepted_setting);
        if (!accepted)
            return tl::unexpected(accepted.error());
        if (!*accepted)
            return 0;
    }
    auto grants = store_.kek_grants_for(store_.host_id());
    if (!grants)
        return tl::unexpected(grants.error());
    std::size_t imported = 0;
    for (const auto& g : *grants) {
        if (keys_.find_key(hsm::KeyId{g.kek_id}))
            continue;
        if (auto r = import_one(g, hsm::KeyId{(*me)->transport_key}); !r) {
            record(audit, "kek_import", host_, result_name(r.error().code), r.error().message);
            return tl::unexpected(r.error());
        }
        record(audit, "kek_import", host_, "ok", "KEK " + g.kek_id + " granted by " + g.granted_by);
        ++imported;
    }
    return imported;
}

Result<void> Enrolment::remove_host(const std::string& name, audit::Log* audit)
{
    if (name == host_)
        return fail(Errc::invalid_argument, "a host does not remove itself; run `vaultfs host remove` on another");
    auto row = store_.host_by_name(name);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row)
        return fail(Errc::not_found, "no host '" + name + "' in the store");
    auto w = store_.write([&](Store::Transaction& tx) { return tx.remove_host((*row)->id); });
    record(audit, "host_remove", name, w ? "ok" : result_name(w.error().code), w ? "" : w.error().message);
    return w;
}

}  // namespace vaultfs::vault::hosts
