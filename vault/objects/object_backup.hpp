// ObjectBackup: keys and certificates in a vault's backup (docs/keys-and-certificates.md
// "Certificates and keys"), beside its secrets (vault/backup/backup.cpp).
//
// A backup holds each key and certificate with every version as stored:
// public halves, certificate chains and policies in the clear (they are
// public), an exportable certificate's private key still envelope-sealed,
// and a token key by its CKA_ID only. No token key is created backup-able:
// every one is non-extractable, so none is ever wrapped out of the token,
// and a backup restores a key (or a non-exportable certificate) only where
// the token still holds that CKA_ID -- Errc::key_unavailable elsewhere.
// Restoring into another vault re-binds sealed keys to it, as for secrets.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hsm/key_service.hpp"
#include "vault/core.hpp"

namespace vaultfs::vault {

class ObjectBackup {
public:
    ObjectBackup(Core& core, hsm::KeyService& keys) : core_(core), keys_(keys) {}

    // The vault's keys and certificates, as a JSON array. Needs `backup` on
    // each (a refusal is audited, "backup").
    Result<nlohmann::json> backup(const Caller& caller, const VaultEntry& vault);

    // The work a restore's transaction runs for `objects` (from a backup of
    // vault `source`) into `target`, after what needs the token: `restore`
    // checked on each (audited refusals), token keys found, sealed keys
    // re-bound. The work refuses a name already taken (Errc::already_exists)
    // and returns the restored names (".keys/NAME", ".certs/NAME").
    using Work = std::function<Result<std::vector<std::string>>(Store::Transaction&)>;
    Result<Work> plan_restore(const Caller& caller, const VaultEntry& target, VaultId source,
                              const nlohmann::json& objects);

private:
    Core& core_;
    hsm::KeyService& keys_;
};

}  // namespace vaultfs::vault
