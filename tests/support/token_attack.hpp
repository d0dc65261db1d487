// Test support: an attacker who holds a token's user PIN (a root shell, a
// backup of the state directory, a stolen PIN file) and tries to take
// vaultfs's keys out of the token with plain PKCS#11 calls (issue 33). Used
// by the hsm unit tests in-process and, through tests/support/p11_attack.cpp,
// by the integration tests against a daemon's real token (SoftHSM2 and
// openCryptoki).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace vaultfs::testing {

struct TokenAccess {
    std::string module;
    std::string label;
    std::string pin;
    // Set in this process's environment before the module loads.
    std::vector<std::pair<std::string, std::string>> environment;
};

// What one key in the token did under attack. Every rv is the PKCS#11
// return value (CKR_OK = 0: the attack worked).
struct KeyUnderAttack {
    std::string id;     // CKA_ID, hex
    std::string label;  // CKA_LABEL
    unsigned long cls = 0;   // CKO_SECRET_KEY or CKO_PRIVATE_KEY
    unsigned long value_rv = 0;     // C_GetAttributeValue(CKA_VALUE, or an RSA key's CKA_PRIVATE_EXPONENT)
    // C_WrapKey under an AES key the attacker made (session object,
    // CKA_SENSITIVE false, CKA_WRAP true): AES-KWP, else AES-KW, else AES-CBC-PAD.
    unsigned long wrap_aes_rv = 0;
    // C_WrapKey under an RSA public key the attacker imported (session
    // object, CKA_WRAP true), RSA-OAEP: secret keys only (0 for others).
    unsigned long wrap_rsa_rv = 0;
    // What the attacker got, when a wrap worked: the key's length in the
    // clear (the AES-KWP blob opened with the attacker's own key), or the
    // wrapped blob's (AES-KW, AES-CBC-PAD: not opened here).
    std::size_t recovered_bytes = 0;
};

// Logs in with the user PIN and attacks every secret and private key the
// token holds. Throws std::runtime_error if the module cannot be used.
std::vector<KeyUnderAttack> attack_every_key(const TokenAccess& token);

// The user PIN tries to make a key CKA_TRUSTED: an RSA public key of its
// own with CKA_TRUSTED true, and a copy of each trusted key with another
// modulus. The return values (CKR_OK: the attack worked).
struct TrustAttack {
    unsigned long own_key_rv = 0;
    std::vector<unsigned long> copy_rvs;  // one per trusted key in the token
};
TrustAttack attack_trust(const TokenAccess& token);

// With the receiving host's PIN: unwraps `wrapped` (a KEK grant from the
// store) with the transport private key whose CKA_ID is `transport_id` (hex)
// into a key the attacker can read (CKA_SENSITIVE false, CKA_EXTRACTABLE
// true, no CKA_WRAP_WITH_TRUSTED). Returns the C_UnwrapKey return value,
// and the value's read if it worked.
struct UnwrapAttack {
    unsigned long unwrap_rv = 0;
    unsigned long value_rv = 0;
};
UnwrapAttack attack_unwrap(const TokenAccess& token, const std::string& transport_id, const std::vector<unsigned char>& wrapped);

// What a vaultfs before 0.2 made: replaces the secret key with CKA_ID
// `kek_id` (hex) by a new AES-256 KEK under the same id and label,
// extractable under any key (CKA_EXTRACTABLE true, no
// CKA_WRAP_WITH_TRUSTED). Only for a vault that holds nothing yet (the old
// key's sealed rows would not open). The C_GenerateKey return value.
unsigned long plant_exposed_kek(const TokenAccess& token, const std::string& kek_id);

}  // namespace vaultfs::testing
