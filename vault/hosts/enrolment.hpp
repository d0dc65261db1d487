// enrolment: the key ceremony that lets another host serve a shared
// PostgreSQL store (README "Several hosts"), and the KEK transfers that
// keep every enrolled host's token holding every vault's KEK.
//
// 1. request (on the new host B): a transport key pair in B's token
//    (hsm: RSA-3072, private half unwrap-only and never extractable), a
//    hosts row (status "requested") with its public half and B's audit
//    signing key's, and a request document with a fingerprint to compare
//    out of band.
// 2. grant (on an enrolled host A, in its daemon): the request must match
//    B's row in the store (a tampered request does not), and its
//    fingerprint what the admin was told. Each vault KEK is wrapped for B's
//    transport key (AES-KWP under a fresh AES key, that under RSA-OAEP) and
//    stored as a kek_grants row; B becomes "enrolled"; A's audit records
//    it; the grant document, signed by A's audit key, names B's request.
// 3. accept (on B): the grant must be for B's own current request, signed
//    by the host the store says enrolled B, and not accepted before. Each
//    KEK is unwrapped into B's token and must open its check value (a
//    sealed block the KEK's creator stored), so a KEK is never taken on
//    trust.
//
// Every enrolment is signed: the granting host signs the new host's row
// (name, both public keys, who enrolled it) with its audit key, and each
// host keeps the audit keys of the hosts it granted or was granted by in
// STATE/trusted-hosts. A host wraps KEKs only for a row whose signatures
// lead back to a key it trusts, so that write access to the database alone
// does not make a host.
//
// Later vaults: whoever creates a KEK wraps it at once for every other
// enrolled host (wrap_for_hosts, in the vault's own transaction), and each
// daemon imports what was granted to it (import_granted) when it starts and
// whenever the change feed moves. No KEK is ever in the clear outside a token.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hsm/pkcs11_key_service.hpp"
#include "vault/error.hpp"
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
    // Step 2: the grant document for `request_text`. `expected` (if not
    // empty) must equal the request's fingerprint. `audit` records it.
    Result<std::string> grant(const std::string& request_text, const std::string& expected, audit::Log* audit);
    // Step 3: imports the granted KEKs; how many.
    Result<std::size_t> accept(const std::string& grant_text, audit::Log* audit);

    // Every KEK granted to this host that its token lacks, imported and
    // checked; how many (a daemon at start and on every feed change).
    Result<std::size_t> import_granted(audit::Log* audit);
    // In the transaction creating `kek`: its check value, and the KEK wrapped
    // for every other enrolled host.
    Result<void> wrap_for_hosts(Store::Transaction& tx, const hsm::KeyId& kek);

    Result<void> remove_host(const std::string& name, audit::Log* audit);

    // Whether `h`'s row was signed, at enrolment, by a host this one trusts
    // (itself, a host in the trust file, or one such a host enrolled): KEKs
    // are wrapped only for such hosts, never for a row someone wrote into
    // the database.
    Result<void> check_enrolment(const std::vector<HostRow>& hosts, const HostRow& h);

private:
    Result<void> import_one(const KekGrantRow& grant, const hsm::KeyId& transport);
    Result<std::vector<std::vector<std::uint8_t>>> trusted_keys();
    Result<void> trust(const std::vector<std::uint8_t>& signing_public);
    Result<std::vector<std::uint8_t>> make_check(const hsm::KeyId& kek);

    Store& store_;
    hsm::Pkcs11KeyService& keys_;
    const std::string host_;
    const hsm::KeyId signing_key_;
    const std::string trust_file_;
};

}  // namespace vaultfs::vault::hosts
