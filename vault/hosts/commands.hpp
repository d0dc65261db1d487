// The several-hosts commands that work on a state directory directly (the
// daemon stopped, or not needed): `vaultfs migrate --to`, `vaultfs join
// accept`, `vaultfs host list`. `join request` is init_state with a store
// and `join`; `join grant` and `host remove` run in an enrolled host's
// daemon (fs/control_hosts.cpp), which records them in its audit trail.
#pragma once

#include <string>
#include <vector>

#include "vault/error.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::hosts {

// Copies the state's SQLite store into an empty PostgreSQL database at
// `url` (vault/store/copy.hpp), registers this host as its first, enrolled
// one under `host` (empty: the system's host name), and points vaultfs.conf
// at it. The SQLite file is left as it was, no longer used. Returns what
// it did, one line per item.
Result<std::vector<std::string>> migrate_store(const std::string& state_dir, const std::string& url,
                                               const std::string& host);

// Step 3 of the ceremony on this (new) host; how many KEKs it imported.
Result<std::size_t> accept_grant(const std::string& state_dir, const std::string& grant_text);

// The store's hosts (needs no token).
Result<std::vector<HostRow>> list_hosts(const std::string& state_dir);

}  // namespace vaultfs::vault::hosts
