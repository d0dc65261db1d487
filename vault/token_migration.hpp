// token_migration: moving a state to another PKCS#11 token
// (`vaultfs token migrate`) — the path from the embedded SoftHSM2 token to a
// hardware HSM, or between any two tokens.
//
// What moves, and how:
// - KEKs. vaultfs's KEKs are never extractable (DESIGN §3), so no token can
//   wrap them out: every DEK is re-sealed instead. The target token makes a
//   KEK under the same CKA_ID as each source KEK (with the target's seal
//   construction, hsm/mechanisms.hpp); each sealed DEK is unsealed by the
//   source token into locked memory and sealed by the target at once, bound
//   to the same row. The rows' KEK ids, and every value's ciphertext, stay
//   as they are; only sealed DEKs change. No plaintext DEK leaves locked
//   memory, and no value is decrypted.
// - The audit signing key is replaced: the target makes a new one, and the
//   log records a `handover` signed by the old key and confirmed by the new
//   (audit/log.hpp), so `audit verify` with the new key checks the whole
//   chain.
// - Key pairs made in the source token (keys, non-exportable certificates)
//   can never leave it: a state that holds any is refused, naming them.
//
// All or nothing: the daemon must be stopped (the state lock is taken), and
// on any failure the database and audit file are put back as they were and
// the objects made in the target token are removed. The source token is not
// changed; its keys stay there until its owner removes them.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "vault/error.hpp"

namespace vaultfs::vault {

struct MigrationTarget {
    std::string module_path;
    std::string token_label;
    std::string pin_file;  // the target token's user PIN, mode 0600
    // Set before the target module loads and recorded as module_env
    // (SOFTHSM2_CONF for a SoftHSM2 target).
    std::vector<std::pair<std::string, std::string>> module_env;
};

// Returns what it did, one line per item, for the user.
Result<std::vector<std::string>> migrate_token(const std::string& state_dir, const MigrationTarget& to);

}  // namespace vaultfs::vault
