// enrolment: the key ceremony that lets another host serve a shared
// PostgreSQL store (docs/hosts.md "Several hosts"), and the KEK transfers that
// keep every enrolled host's token holding every vault's KEK.
//
// A shared store's KEKs are CKA_WRAP_WITH_TRUSTED (hsm/key_service.hpp,
// KekReach): a token wraps one only under a key its Security Officer marked
// CKA_TRUSTED. So the ceremony has an SO step on each side, run by the CLI
// (hsm/security_officer.hpp), never by a daemon, with an SO PIN that is
// used once and never kept:
//
// 1. request (on the new host B): a transport key pair in B's token
//    (RSA-3072, private half unwrap-only, never extractable, with an unwrap
//    template that keeps every KEK it unwraps sensitive), a hosts row
//    (status "requested") with its public half and B's audit signing key's,
//    and a request document with a fingerprint to compare out of band.
// 2. grant (on an enrolled host A): the admin gives the fingerprint they
//    compared (required; a wrong one is refused without saying the right
//    one); A's SO trusts B's transport key in A's token; then A's daemon
//    checks the request against B's row in the store, wraps each vault KEK
//    for B (RSA-OAEP under the trusted key) as kek_grants rows, marks B
//    "enrolled" and signs its row; the grant document, signed by A's audit
//    key, names B's request.
// 3. accept (on B): the grant must be for B's own current request, signed
//    by the host the store says enrolled B, and not accepted before. Each
//    KEK is unwrapped into B's token and must open its check value (a
//    sealed block the KEK's creator stored), so a KEK is never taken on
//    trust. Then B's SO trusts the transport keys of the hosts enrolled
//    before it (peers_to_trust), so that B can hand its own vaults to them.
//
// Every enrolment is signed: the granting host signs the new host's row
// (name, both public keys, who enrolled it) with its audit key, and each
// host keeps the audit keys of the hosts it granted or was granted by, and
// of those its granter vouched for in the signed grant, in
// STATE/trusted-hosts. A host wraps KEKs only for a row whose signatures
// lead back to a key it trusts, so that write access to the database alone
// does not make a host.
//
// Later vaults: whoever creates a KEK wraps it at once for every enrolled
// host its token trusts (wrap_for_hosts, in the vault's own transaction).
// Every daemon, when it starts and whenever the change feed moves, imports
// what was granted to it (import_granted), destroys the KEKs a rekey
// replaced, and wraps what it holds for trusted hosts that
// lack it (grant_missing): since each host trusts the hosts enrolled
// before it and is trusted by the host that granted it, every KEK reaches
// every host. No KEK is ever in the clear outside a token.
//
// Each token's trusted keys are audited (`host_trust`, `host_untrust`) when
// the daemon first sees them, and published as the host's
// `trusted_transport_keys` setting, so that any host can tell who can hand
// a KEK to whom (unreached_hosts).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"
#include "vault/model/error.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit {
class Log;
}

namespace vaultfs::vault::hosts {

struct Request {
    std::string host;
    std::vector<std::uint8_t> transport_public;  // SubjectPublicKeyInfo DER
    std::vector<std::uint8_t> signing_public;    // the host's audit signing key's
    std::string nonce;                           // hex, 16 random bytes
    // SHA-256 over all of the above, as 8 groups of 8 hex digits.
    std::string fingerprint() const;
    std::string render() const;  // one JSON document
};
Result<Request> parse_request(const std::string& text);

// The request's fingerprint as this host recorded it (settings), and
// whether a grant for it was accepted already.
inline constexpr const char* request_setting = "join_request";
inline constexpr const char* accepted_setting = "join_accepted";
// In the state directory: the audit keys of the hosts this one trusts.
inline constexpr const char* trust_file_name = "trusted-hosts";
// This host's setting: the ids of the transport keys its token trusts, as
// last audited (a JSON array).
inline constexpr const char* trusted_keys_setting = "trusted_transport_keys";

// The label of another host's transport key, trusted in this token.
std::string trusted_key_label(const std::string& host);

// A host's own view of the ceremony: its store, its token, its name.
class Enrolment {
public:
    // `trust_file`: the state directory's list of other hosts' audit keys
    // this host trusts (it granted them, or they granted it).
    Enrolment(Store& store, hsm::Pkcs11KeyService& keys, std::string host, hsm::KeyId signing_key,
              std::string trust_file);

    // Step 1 on a host not yet in the store. `status` "requested", or
    // "enrolled" for the first host of a store (init, migrate), which
    // needs no grant.
    Result<Request> register_host(const std::string& status);
    // Step 2: the grant document for `request_text`. `expected` must equal
    // the request's fingerprint (Errc::invalid_argument otherwise, without
    // the right one), and this token must trust the request's transport key
    // (Errc::not_permitted: the SO step was not done). With `check_only`,
    // everything that needs no SO is checked and nothing is made (the CLI
    // asks before it logs the SO in). `audit` records it.
    Result<std::string> grant(const std::string& request_text, const std::string& expected, audit::Log* audit,
                              bool check_only = false);
    // Step 3: imports the granted KEKs; how many.
    Result<std::size_t> accept(const std::string& grant_text, audit::Log* audit);

    // The enrolled hosts (with their transport keys) that this token does
    // not trust yet, among those whose enrolment checks: what the SO trusts
    // after accept (`only`: that host alone, or none if it does not check).
    Result<std::vector<HostRow>> peers_to_trust(const std::string& only = {});
    // Records in the audit each trusted key the token gained or lost since
    // last time, and publishes the list (trusted_keys_setting). `gone`:
    // hosts no longer in the store whose keys it may name.
    Result<void> audit_trust(audit::Log* audit, const std::vector<HostRow>& gone = {});
    // The enrolled hosts that a KEK this host makes now would not reach:
    // neither this token trusts them, nor (through the published lists)
    // any host that it reaches.
    Result<std::vector<std::string>> unreached_hosts();

    // Every KEK granted to this host that its token lacks, imported and
    // checked; how many (a daemon at start and on every feed change).
    // Grants of KEKs a rekey replaced (no vault uses them, and their check
    // value is gone) are dropped first, the KEK destroyed in this token
    // (`kek_retire`).
    Result<std::size_t> import_granted(audit::Log* audit);
    // Each vault KEK this token holds, wrapped for each enrolled host it
    // trusts that has no grant of it yet (`kek_grant`); how many.
    Result<std::size_t> grant_missing(audit::Log* audit);
    // In the transaction creating `kek`: its check value, and the KEK wrapped
    // for every other enrolled host this token trusts (the others get it
    // from a host that trusts them: grant_missing).
    Result<void> wrap_for_hosts(Store::Transaction& tx, const hsm::KeyId& kek);

    // Removes the host's row (and so its grants), and its trusted key from
    // this token.
    Result<void> remove_host(const std::string& name, audit::Log* audit);

    // Whether `h`'s row was signed, at enrolment, by a host this one trusts
    // (itself, a host in the trust file, or one such a host enrolled): KEKs
    // are wrapped only for such hosts, never for a row someone wrote into
    // the database.
    Result<void> check_enrolment(const std::vector<HostRow>& hosts, const HostRow& h);

private:
    Result<void> import_one(const KekGrantRow& grant, const hsm::KeyId& transport);
    // The audit keys whose enrolment signatures this host believes
    // (its own and STATE/trusted-hosts), and adding one.
    Result<std::vector<std::vector<std::uint8_t>>> trusted_signers();
    Result<void> trust_signer(const std::vector<std::uint8_t>& signing_public);
    Result<std::vector<std::uint8_t>> make_check(const hsm::KeyId& kek);
    // This host's row, once it takes part: the store's first, or it accepted
    // a grant (before that, nothing in the store is taken on trust).
    Result<std::optional<HostRow>> member();
    // The enrolled hosts other than this one whose enrolment checks.
    Result<std::vector<HostRow>> verified_peers(const std::vector<HostRow>& hosts);

    Store& store_;
    hsm::Pkcs11KeyService& keys_;
    const std::string host_;
    const hsm::KeyId signing_key_;
    const std::string trust_file_;
};

}  // namespace vaultfs::vault::hosts
