// rekey: a vault moved to a new KEK, made now under today's rule
// (hsm::KekReach: never extractable on one host, extractable only under
// keys the Security Officer trusted on a shared store). It is the way off a
// KEK made under an older rule, and the KEK rotation Azure Key Vault's key
// rotation gives (`vaultfs vault rekey V`, and every `rekey_after_days`).
//
//   1. The new KEK's id and the old one's are recorded as this host's
//      `rekey_pending` setting; then the KEK is made in the token.
//   2. One transaction, holding the vault's row (no version can be sealed
//      under the old KEK meanwhile: Store::Transaction::require_vault_kek):
//      every sealed row of the vault -- each secret version's value, each
//      exportable certificate key -- is opened with its DEK and sealed again
//      under a new DEK, sealed by the new KEK and bound to its id. Values
//      exist only in locked memory meanwhile, never on disk. The vault
//      names the new KEK; its check value and its grants to the hosts this
//      token trusts are written, the old KEK's check value dropped, the
//      pending setting cleared, and the audit record (`vault_rekey`) written
//      before COMMIT.
//   3. The old KEK is destroyed in this token. The other hosts import the
//      new one and destroy the old one when the change feed shows them
//      that no vault uses it and its check value is gone
//      (hosts/enrolment.hpp, import_granted).
//
// A crash before 2 commits leaves the vault on its old KEK, and the new
// one is destroyed at the next start (recover); a crash after leaves it on
// the new KEK, and the old one is destroyed then. Either way every secret
// stays readable. A backup made before a rekey names the old KEK and can no
// longer be restored: take a new one.
//
// Thread-safety: every method may be called from any thread; rekeys are
// serialised.
#pragma once

#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"
#include "vault/core.hpp"
#include "vault/model/error.hpp"

namespace vaultfs::vault::hosts {
class Enrolment;
}

namespace vaultfs::vault::kek {

inline constexpr const char* pending_setting = "rekey_pending";

// Step 2's work, in `tx`: every sealed row of `vault` opened and sealed
// again under `kek` (already in the token), and the vault made to name it;
// Errc::busy when the vault's KEK is no longer `old_kek`. How many rows.
// (`vaultfs migrate --to` uses it alone: the state is offline there.)
Result<std::size_t> move_vault_to(Store::Transaction& tx, hsm::KeyService& keys, VaultId vault,
                                  const std::string& old_kek, const std::string& kek);
// A fresh random KEK id (16 bytes, hex), for create_kek_with_id.
Result<std::string> fresh_kek_id();

struct Rekeyed {
    std::string vault;
    std::string old_kek;
    std::string new_kek;
    std::size_t resealed = 0;  // rows sealed again (versions and certificate keys)
};

// Why a vault's KEK should be replaced, if it should.
struct Finding {
    std::string vault;
    std::string reason;
};

class Rekey {
public:
    // `reach`: what new KEKs may do (the state's store decides).
    // `enrolment`: a shared store's hosts (null on one host). `day_ms`: a
    // day of rekey_after_days (tests shorten it, as retention_day_ms).
    Rekey(Core& core, hsm::Pkcs11KeyService& keys, hsm::KekReach reach, hosts::Enrolment* enrolment,
          std::int64_t day_ms = 86400000);

    // `vault rekey V`. `caller` needs `manage` on V (null: the daemon's own
    // rotation round). On a shared store, refused (Errc::not_permitted,
    // naming them) while any enrolled host could not get the new KEK.
    Result<Rekeyed> rekey(const Caller* caller, std::string_view vault);

    // Finishes or undoes a rekey a crash interrupted (at start).
    Result<void> recover();

    // Every vault whose KEK is older than its rekey_after_days, rekeyed;
    // how many (the background round).
    Result<std::size_t> rotate_due(Micros now);

    // Vaults whose KEK the token lets out under any key (made before this
    // rule), or, on a shared store, cannot share: looked at now, kept for
    // findings().
    Result<std::vector<Finding>> inspect();
    std::vector<Finding> findings() const;

private:
    Result<void> check_hosts_reached();

    Core& core_;
    hsm::Pkcs11KeyService& keys_;
    const hsm::KekReach reach_;
    hosts::Enrolment* enrolment_;
    const std::int64_t day_ms_;
    std::mutex rekey_mutex_;  // one rekey at a time
    mutable std::mutex findings_mutex_;
    std::vector<Finding> findings_;
};

}  // namespace vaultfs::vault::kek
