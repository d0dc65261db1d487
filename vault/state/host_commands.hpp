// The several-hosts commands that work on a state directory directly (the
// daemon stopped, or not needed): `vaultfs migrate --to`, `vaultfs join
// accept`, `vaultfs host list`, and the Security Officer's steps of the
// ceremony (`join grant`, `join accept`, `host trust`), which run in the
// CLI's own process: a daemon is logged in to the token as its user and
// PKCS#11 allows one login per process. `join request` is init_state with a
// store and `join`; the grant itself and `host remove` run in an enrolled
// host's daemon (fs/control/objects.cpp), which records them in its audit
// trail.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "hsm/secure_buffer.hpp"
#include "vault/model/error.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::hosts {

// Copies the state's SQLite store into an empty PostgreSQL database at
// `url` (vault/store/copy.hpp), registers this host as its first, enrolled
// one under `host` (empty: the system's host name), and points vaultfs.conf
// at it. The SQLite file is left as it was, no longer used. Returns what
// it did, one line per item.
Result<std::vector<std::string>> migrate_store(const std::string& state_dir, const std::string& url,
                                               const std::string& host);

// Step 3 of the ceremony on this (new) host: how many KEKs it imported,
// and the hosts its token should trust now (trust_hosts).
struct Accepted {
    std::size_t imported = 0;
    std::vector<HostRow> to_trust;
};
Result<Accepted> accept_grant(const std::string& state_dir, const std::string& grant_text);

// A Security Officer PIN from a file owned by this user, mode 0600 or 0400.
Result<hsm::SecureBuffer> read_so_pin(const std::string& path);

// The enrolled hosts (all, or the one named) whose enrolment this host can
// verify and whose transport keys its token does not trust yet. Reads the
// store and the token (with the user PIN) without the state's lock: the
// daemon may be serving.
Result<std::vector<HostRow>> untrusted_hosts(const std::string& state_dir, const std::string& only);

// The SO step: each host's transport key trusted in the state's token.
// One line per host, for the admin.
Result<std::vector<std::string>> trust_hosts(const std::string& state_dir, const std::vector<HostRow>& hosts,
                                             const hsm::SecureBuffer& so_pin);

// `join grant`'s SO step around the daemon's grant: the request's transport
// key trusted, then `grant()` run (the daemon wraps the KEKs); if that
// fails, the key trusted just now is taken back.
Result<std::string> grant_with_trust(const std::string& state_dir, const std::string& request_text,
                                     const hsm::SecureBuffer& so_pin, const std::function<Result<std::string>()>& grant);

// The store's hosts (needs no token).
Result<std::vector<HostRow>> list_hosts(const std::string& state_dir);

}  // namespace vaultfs::vault::hosts
