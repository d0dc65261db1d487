#include "vault/hosts/enrolment.hpp"

#include <openssl/rand.h>
#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include <sys/stat.h>

#include <algorithm>
#include <map>
#include <set>
#include <array>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hsm/hex.hpp"
#include "vault/audit/log.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault::hosts {

using nlohmann::json;

namespace {

constexpr const char* request_kind = "vaultfs join request v1";
// v2: each KEK wrapped with RSA-OAEP under the trusted transport key alone
// (v1 wrapped an AES key that wrapped the KEK, under any key).
constexpr const char* grant_kind = "vaultfs join grant v2";

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

Result<std::vector<std::vector<std::uint8_t>>> Enrolment::trusted_signers()
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

Result<void> Enrolment::trust_signer(const std::vector<std::uint8_t>& signing_public)
{
    auto known = trusted_signers();
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
    auto trusted = trusted_signers();
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

Result<std::vector<HostRow>> Enrolment::verified_peers(const std::vector<HostRow>& hosts)
{
    std::vector<HostRow> out;
    for (const auto& h : hosts) {
        if (h.status != "enrolled" || h.name == host_)
            continue;
        if (auto r = check_enrolment(hosts, h); !r) {
            spdlog::error("{}", r.error().message);
            continue;
        }
        out.push_back(h);
    }
    return out;
}

Result<void> Enrolment::wrap_for_hosts(Store::Transaction& tx, const hsm::KeyId& kek)
{
    auto check = make_check(kek);
    if (!check)
        return tl::unexpected(check.error());
    if (auto r = tx.put_kek_check(kek.hex, *check); !r)
        return r;
    // This host's own row, unwrapped: it made the KEK (nothing to hand it;
    // and when no vault uses the KEK any more, it goes here as everywhere).
    if (auto r = tx.put_kek_grant(KekGrantRow{kek.hex, tx.host(), {}, {}, host_, now_micros()}); !r)
        return r;
    auto hosts = tx.hosts();
    if (!hosts)
        return tl::unexpected(hosts.error());
    auto peers = verified_peers(*hosts);
    if (!peers)
        return tl::unexpected(peers.error());
    for (const auto& h : *peers) {
        auto trusted = keys_.trusts(h.transport_public);
        if (!trusted)
            return fail(Errc::key_unavailable, "cannot look for host " + h.name + "'s trusted key: " +
                                                   trusted.error().message);
        if (!*trusted) {
            spdlog::info("KEK {} is not wrapped for host {} here: this token does not trust its transport key; a "
                         "host that trusts it hands it on",
                         kek.hex, h.name);
            continue;
        }
        auto wrapped = keys_.wrap_kek(kek, h.transport_public);
        if (!wrapped)
            return fail(Errc::key_unavailable,
                        "cannot wrap KEK " + kek.hex + " for host " + h.name + ": " + wrapped.error().message);
        if (auto r = tx.put_kek_grant(KekGrantRow{kek.hex, h.id, {}, *wrapped, host_, now_micros()}); !r)
            return r;
    }
    return {};
}

Result<std::string> Enrolment::grant(const std::string& request_text, const std::string& expected, audit::Log* audit,
                                     bool check_only)
{
    const auto refuse = [&](const std::string& who, Error e) -> Result<std::string> {
        record(audit, "host_grant", who, result_name(e.code), e.message);
        return tl::unexpected(std::move(e));
    };
    auto req = parse_request(request_text);
    if (!req)
        return refuse("", req.error());
    // The comparison out of band is the ceremony's point: it cannot be
    // skipped, and a mismatch does not say what would have matched.
    if (expected.empty())
        return refuse(req->host, Error{Errc::invalid_argument,
                                       "no fingerprint given: compare the one the new host printed with its admin, "
                                       "out of band, and pass it with --fingerprint"});
    if (expected != req->fingerprint())
        return refuse(req->host, Error{Errc::invalid_argument,
                                       "the request's fingerprint is not the one you were given: refused (the "
                                       "request was altered, or the fingerprint mistyped; compare again with the new "
                                       "host's admin)"});
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
    if (auto r = keys_.check_trusted_wrapping(); !r)
        return refuse(req->host, Error{Errc::not_permitted, r.error().message + ": this host cannot share KEKs"});
    if (check_only)
        return std::string();
    auto trusted = keys_.trusts(req->transport_public);
    if (!trusted)
        return refuse(req->host, Error{Errc::key_unavailable, trusted.error().message});
    if (!*trusted)
        return refuse(req->host, Error{Errc::not_permitted,
                                       "this token's Security Officer has not trusted host '" + req->host +
                                           "''s transport key: `vaultfs join grant` does that with the SO PIN"});
    if (auto r = audit_trust(audit); !r)
        spdlog::error("auditing the token's trusted keys: {}", r.error().message);

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
            if (auto r = tx.put_kek_grant(KekGrantRow{id, (*row)->id, {}, *wrapped, host_, now_micros()}); !r)
                return r;
            keks.push_back({{"kek_id", id}, {"wrapped_kek", hsm::to_hex(*wrapped)}});
        }
        auto sig = keys_.sign_digest(signing_key_, enrolment_digest(req->host, req->transport_public,
                                                                     req->signing_public, host_));
        if (!sig)
            return fail(Errc::key_unavailable, "cannot sign the enrolment: " + sig.error().message);
        return tx.enrol_host((*row)->id, now_micros(), host_, *sig);
    });
    if (!w)
        return refuse(req->host, w.error());
    // The hosts this one vouches for (it checked their enrolment): the new
    // host believes their enrolments too, through this signed document.
    json vouched = json::array();
    if (auto hosts = store_.hosts(); hosts)
        if (auto peers = verified_peers(*hosts); peers)
            for (const auto& p : *peers)
                if (p.name != req->host)
                    vouched.push_back({{"host", p.name}, {"signing_public", hsm::to_hex(p.signing_public)}});
    json g{{"kind", grant_kind},
           {"host", req->host},
           {"request", req->fingerprint()},
           {"granted_by", host_},
           {"time", now_micros()},
           {"keks", keks},
           {"vouched", vouched}};
    const auto digest = sha256(grant_body(g));
    auto sig = keys_.sign_digest(signing_key_, digest);
    if (!sig)
        return refuse(req->host, Error{Errc::key_unavailable, "cannot sign the grant: " + sig.error().message});
    g["signature"] = hsm::to_hex(*sig);
    if (auto r = trust_signer(req->signing_public); !r)
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
    if (!grant.wrapped_key.empty())
        return fail(Errc::integrity, "KEK " + grant.kek_id + " was granted by a vaultfs before trusted wrapping (by " +
                                         grant.granted_by + "), under any key: it is not taken; `vaultfs vault "
                                         "rekey` on a host that has it makes a new KEK and grants it anew");
    if (auto r = keys_.unwrap_kek(transport, grant.wrapped_kek, kek, "vaultfs-kek (from " + grant.granted_by + ")");
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
    if (g.is_object() && g.value("kind", "") == "vaultfs join grant v1")
        return refuse(Error{Errc::invalid_argument, "the grant was made by an older vaultfs (its KEKs wrapped under any "
                                                    "key): upgrade the granting host and grant again"});
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
        const KekGrantRow row{k.value("kek_id", ""), (*me)->id, {}, unhex(k, "wrapped_kek"), by, 0};
        if (keys_.find_key(hsm::KeyId{row.kek_id}))
            continue;  // already here (imported from the store meanwhile)
        if (auto r = import_one(row, hsm::KeyId{(*me)->transport_key}); !r)
            return refuse(r.error());
        ++imported;
    }
    if (auto r = store_.write([&](Store::Transaction& tx) { return tx.set_setting(accepted_setting, **mine); }); !r)
        return refuse(r.error());
    if (auto r = trust_signer((*granter)->signing_public); !r)
        return refuse(r.error());
    if (g.contains("vouched") && g["vouched"].is_array())
        for (const auto& v : g["vouched"])
            if (v.is_object())
                if (auto key = unhex(v, "signing_public"); !key.empty())
                    if (auto r = trust_signer(key); !r)
                        return refuse(r.error());
    record(audit, "host_accept", host_, "ok", std::to_string(imported) + " KEKs imported, granted by " + by);
    return imported;
}

Result<std::size_t> Enrolment::import_granted(audit::Log* audit)
{
    auto me = member();
    if (!me)
        return tl::unexpected(me.error());
    if (!*me)
        return 0;
    auto grants = store_.kek_grants_for(store_.host_id());
    if (!grants)
        return tl::unexpected(grants.error());
    auto vaults = store_.vaults();
    if (!vaults)
        return tl::unexpected(vaults.error());
    std::set<std::string> in_use;
    for (const auto& v : *vaults)
        in_use.insert(v.kek_id);
    std::size_t imported = 0;
    for (const auto& g : *grants) {
        if (!in_use.contains(g.kek_id)) {
            // A rekey replaced it (no vault uses it, and the rekey dropped
            // its check value): not needed anywhere, so not kept here. A
            // removed vault's KEK stays, for the backups made of it.
            auto check = store_.kek_check(g.kek_id);
            if (!check)
                return tl::unexpected(check.error());
            if (*check)
                continue;
            std::string problem;
            if (auto r = keys_.destroy_kek(hsm::KeyId{g.kek_id}); !r)
                problem = r.error().message;
            else if (auto w = store_.write([&](Store::Transaction& tx) { return tx.delete_kek_grant(g.kek_id, g.host); });
                     !w)
                problem = w.error().message;
            record(audit, "kek_retire", host_, problem.empty() ? "ok" : "EIO",
                   "KEK " + g.kek_id + " is used by no vault" +
                       (problem.empty() ? ": destroyed in this token" : ": " + problem));
            continue;
        }
        if (g.wrapped_kek.empty() || keys_.find_key(hsm::KeyId{g.kek_id}))
            continue;  // made here, or here already
        if (auto r = import_one(g, hsm::KeyId{(*me)->transport_key}); !r) {
            record(audit, "kek_import", host_, result_name(r.error().code), r.error().message);
            return tl::unexpected(r.error());
        }
        record(audit, "kek_import", host_, "ok", "KEK " + g.kek_id + " granted by " + g.granted_by);
        ++imported;
    }
    return imported;
}

Result<std::optional<HostRow>> Enrolment::member()
{
    if (store_.host_id() == 0)
        return std::optional<HostRow>();
    auto me = store_.host_by_name(host_);
    if (!me || !*me)
        return me;
    // Only once this host has accepted a grant (checked its signature), or
    // is the store's first: before, nothing in the store is taken on trust.
    if ((*me)->enrolled_by.value_or("") != host_) {
        auto accepted = store_.setting(accepted_setting);
        if (!accepted)
            return tl::unexpected(accepted.error());
        if (!*accepted)
            return std::optional<HostRow>();
    }
    return me;
}

Result<std::size_t> Enrolment::grant_missing(audit::Log* audit)
{
    auto me = member();
    if (!me)
        return tl::unexpected(me.error());
    if (!*me)
        return 0;
    auto missing = store_.missing_grants();
    if (!missing)
        return tl::unexpected(missing.error());
    if (missing->empty())
        return 0;
    auto hosts = store_.hosts();
    if (!hosts)
        return tl::unexpected(hosts.error());
    auto peers = verified_peers(*hosts);
    if (!peers)
        return tl::unexpected(peers.error());
    std::size_t granted = 0;
    for (const auto& m : *missing) {
        const auto peer = std::find_if(peers->begin(), peers->end(), [&](const HostRow& h) { return h.id == m.host; });
        if (peer == peers->end() || !keys_.find_key(hsm::KeyId{m.kek_id}))
            continue;
        auto trusted = keys_.trusts(peer->transport_public);
        if (!trusted || !*trusted)
            continue;
        auto wrapped = keys_.wrap_kek(hsm::KeyId{m.kek_id}, peer->transport_public);
        Result<void> w = wrapped ? store_.write([&](Store::Transaction& tx) {
            return tx.put_kek_grant(KekGrantRow{m.kek_id, peer->id, {}, *wrapped, host_, now_micros()});
        })
                                 : fail(Errc::key_unavailable, wrapped.error().message);
        record(audit, "kek_grant", peer->name, w ? "ok" : result_name(w.error().code),
               "KEK " + m.kek_id + (w ? " wrapped for it" : ": " + w.error().message));
        if (w)
            ++granted;
    }
    return granted;
}

Result<std::vector<HostRow>> Enrolment::peers_to_trust(const std::string& only)
{
    auto hosts = store_.hosts();
    if (!hosts)
        return tl::unexpected(hosts.error());
    auto peers = verified_peers(*hosts);
    if (!peers)
        return tl::unexpected(peers.error());
    if (!only.empty() &&
        std::none_of(peers->begin(), peers->end(), [&](const HostRow& h) { return h.name == only; }))
        return fail(Errc::integrity, "host '" + only + "' has no enrolment signed by a host this one trusts: it is "
                                     "not trusted here");
    std::vector<HostRow> out;
    for (auto& h : *peers) {
        if (!only.empty() && h.name != only)
            continue;
        auto trusted = keys_.trusts(h.transport_public);
        if (!trusted)
            return fail(Errc::key_unavailable, trusted.error().message);
        if (!*trusted)
            out.push_back(std::move(h));
    }
    return out;
}

std::string trusted_key_label(const std::string& host) { return "vaultfs-trusted " + host; }

Result<void> Enrolment::audit_trust(audit::Log* audit, const std::vector<HostRow>& gone)
{
    auto keys = keys_.trusted_keys();
    if (!keys)
        return fail(Errc::key_unavailable, "cannot list the token's trusted keys: " + keys.error().message);
    auto seen_text = store_.setting(trusted_keys_setting);
    if (!seen_text)
        return tl::unexpected(seen_text.error());
    std::set<std::string> seen;
    if (*seen_text) {
        const json j = json::parse(**seen_text, nullptr, false);
        if (j.is_array())
            for (const auto& id : j)
                if (id.is_string())
                    seen.insert(id.get<std::string>());
    }
    auto hosts = store_.hosts();
    if (!hosts)
        return tl::unexpected(hosts.error());
    hosts->insert(hosts->end(), gone.begin(), gone.end());
    const auto host_of = [&](const hsm::KeyId& id) -> std::string {
        for (const auto& h : *hosts)
            if (hsm::Pkcs11KeyService::trusted_key_id(h.transport_public) == id)
                return h.name;
        return {};
    };
    json now = json::array();
    std::set<std::string> current;
    for (const auto& k : *keys) {
        now.push_back(k.id.hex);
        current.insert(k.id.hex);
        if (seen.contains(k.id.hex))
            continue;
        const std::string host = host_of(k.id);
        record(audit, "host_trust", host.empty() ? "unknown" : host, "ok",
               "transport key " + k.id.hex + " ('" + k.label + "') marked trusted by the token's Security Officer" +
                   (host.empty() ? std::string("; no host in the store has it, so no KEK is wrapped for it") : ""));
    }
    for (const auto& id : seen)
        if (!current.contains(id)) {
            const std::string host = host_of(hsm::KeyId{id});
            record(audit, "host_untrust", host.empty() ? "unknown" : host, "ok",
                   "transport key " + id + " is no longer trusted in this token");
        }
    if (current == seen && *seen_text)
        return {};
    return store_.write([&](Store::Transaction& tx) { return tx.set_setting(trusted_keys_setting, now.dump()); });
}

Result<std::vector<std::string>> Enrolment::unreached_hosts()
{
    auto hosts = store_.hosts();
    if (!hosts)
        return tl::unexpected(hosts.error());
    auto peers = verified_peers(*hosts);
    if (!peers)
        return tl::unexpected(peers.error());
    auto published = store_.setting_by_host(trusted_keys_setting);
    if (!published)
        return tl::unexpected(published.error());
    // Who trusts whom: each host's published list; this token's own, read now.
    std::map<std::int64_t, std::set<std::string>> trusts;
    for (const auto& [host, text] : *published) {
        const json j = json::parse(text, nullptr, false);
        if (j.is_array())
            for (const auto& id : j)
                if (id.is_string())
                    trusts[host].insert(id.get<std::string>());
    }
    auto own = keys_.trusted_keys();
    if (!own)
        return fail(Errc::key_unavailable, own.error().message);
    trusts[store_.host_id()].clear();
    for (const auto& k : *own)
        trusts[store_.host_id()].insert(k.id.hex);
    std::set<std::int64_t> reached{store_.host_id()};
    for (bool grew = true; grew;) {
        grew = false;
        for (const auto& p : *peers)
            if (!reached.contains(p.id))
                for (const auto from : reached)
                    if (trusts[from].contains(hsm::Pkcs11KeyService::trusted_key_id(p.transport_public).hex)) {
                        reached.insert(p.id);
                        grew = true;
                        break;
                    }
    }
    std::vector<std::string> out;
    for (const auto& p : *peers)
        if (!reached.contains(p.id))
            out.push_back(p.name);
    return out;
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
    if (!w)
        return w;
    // Its transport key is trusted here no more (a token of its own, or
    // whoever holds it, gets no KEK from this one again).
    if (auto r = keys_.forget_trusted_key((*row)->transport_public); !r)
        spdlog::error("removing host {}'s trusted key from the token: {}", name, r.error().message);
    if (auto r = audit_trust(audit, {**row}); !r)
        spdlog::error("auditing the token's trusted keys: {}", r.error().message);
    return w;
}

}  // namespace vaultfs::vault::hosts
