// token_migration: moving a state to another PKCS#11 token
// (`vaultfs token migrate`) — the path from the embedded SoftHSM2 token to a
// hardware HSM, or between any two tokens.
//
// What moves, and how:
// - KEKs. vaultfs's KEKs are never extractable (docs/design.md §3), so no token can
//   wrap them out: every DEK is re-sealed instead. The target token makes a
//   KEK under the same CKA_ID as each source KEK (with the target's seal
//   construction, hsm/pkcs11/mechanisms.hpp); each sealed DEK is unsealed by the
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
// All or nothing: the daemon must be stopped (the state lock is taken). The
// transaction that re-seals the DEKs also records how to undo it (the old
// sealed DEKs in an undo table, the old vaultfs.conf, audit length, signing
// key and anchor), and STATE/token-migration.pending marks the state until
// the migration is finished. A failure after that commit is rolled back at
// once; a crash leaves the marker, and the state refuses to open until
// `vaultfs token migrate --roll-back` puts it back. Objects made in the
// target token are removed on failure. The source token is not changed.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "vault/model/error.hpp"

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

// Puts back a state whose migration was interrupted (see above).
Result<std::vector<std::string>> roll_back_token_migration(const std::string& state_dir);

// Errc::busy, saying what to run, while an interrupted migration marks the
// state (State::open refuses it then).
Result<void> check_no_pending_migration(const std::string& state_dir);

}  // namespace vaultfs::vault
