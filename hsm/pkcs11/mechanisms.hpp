// mechanisms: what a token offers, and the constructions vaultfs builds on
// it. The choice is made once, at `vaultfs init` (or `token migrate`), from
// C_GetMechanismList / C_GetMechanismInfo, and recorded in vaultfs.conf
// (`token_seal`, `token_signature`); a later mount checks that the token
// still offers what the state was made with.
//
// DEK sealing — the KEK half of the envelope (docs/design.md §3). One of:
//
//   aes-gcm                  one AES-256 KEK; CKM_AES_GCM with a random
//                            96-bit IV and a 128-bit tag, the AAD as GCM's
//                            additional data. blob = iv(12) | ct(32) | tag(16)
//
//   aes-cbc-pad+hmac-sha256  for tokens without GCM (openCryptoki's soft
//                            token, many older HSMs): encrypt-then-MAC with
//                            two keys generated together in the token, so no
//                            key both encrypts and authenticates:
//                              E: AES-256, encrypt/decrypt only, CKA_ID = id
//                              M: 256-bit generic secret, sign/verify only,
//                                 CKA_ID = id | 'm'
//                            ct  = AES-256-CBC-PAD_E(dek) under a random IV
//                            mac = HMAC-SHA256_M("vaultfs-seal-cbc-hmac-v1" |
//                                  be64(len aad) | aad | iv | ct)
//                            blob = iv(16) | ct(48) | mac(32)
//                            Unsealing has the token check the MAC (C_Verify)
//                            before it decrypts anything, so a changed blob or
//                            AAD is refused without a padding oracle; the
//                            length prefix keeps AAD and IV apart.
//
// Audit signing (checkpoints, backups). One of:
//
//   ecdsa-p256               EC P-256 key, CKM_ECDSA over a SHA-256 digest;
//                            the signature is r | s (64 bytes)
//   rsa-pss-sha256           RSA-3072 key, CKM_RSA_PKCS_PSS with SHA-256,
//                            MGF1-SHA-256 and a 32-byte salt (384 bytes)
//
// A verifier needs no token and no setting: the public key says which.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/error.hpp"
#include "hsm/key_pairs.hpp"

namespace vaultfs::hsm {

enum class SealScheme { aes_gcm, aes_cbc_hmac };
enum class SignatureScheme { ecdsa_p256, rsa_pss_sha256 };

struct Schemes {
    SealScheme seal = SealScheme::aes_gcm;
    SignatureScheme signature = SignatureScheme::ecdsa_p256;
    bool operator==(const Schemes&) const = default;
};

std::string_view to_string(SealScheme s);
std::string_view to_string(SignatureScheme s);
std::optional<SealScheme> seal_scheme_from(std::string_view text);
std::optional<SignatureScheme> signature_scheme_from(std::string_view text);

// What C_GetTokenInfo and C_GetMechanismInfo said about one token.
struct TokenProfile {
    struct Mechanism {
        unsigned long min_bits = 0;
        unsigned long max_bits = 0;
        unsigned long flags = 0;  // CKF_ENCRYPT, CKF_SIGN, ...
    };
    std::string label;
    std::string manufacturer;
    std::string model;
    std::map<unsigned long, Mechanism> mechanisms;  // by CKM_ value

    // `mechanism` is offered with every one of `flags`, and (when `bits` is
    // not 0) for keys of that size.
    bool offers(unsigned long mechanism, unsigned long flags, unsigned long bits = 0) const;
    // "token 'L' (Manufacturer Model)", for messages.
    std::string name() const;
};

// The best constructions the token supports, plus one line per fallback
// taken, for the admin ("token 'X' (…) lacks CKM_AES_GCM; vaultfs will
// use …"). Errc::mechanism_unsupported, naming everything missing, when no
// construction fits.
struct Negotiated {
    Schemes schemes;
    std::vector<std::string> notes;
};
Result<Negotiated> negotiate(const TokenProfile& token);

// Succeeds when the token offers what `schemes` needs; otherwise says what
// it lacks (for a state made on another token, or a token that changed).
Result<void> check_schemes(const TokenProfile& token, const Schemes& schemes);

// Succeeds when the token can make a key pair of `type` and do everything
// `usage` implies with it (key create refuses before any object is made).
Result<void> check_key_pair(const TokenProfile& token, KeyType type, KeyUsage usage);

// A PKCS#11 mechanism's name ("CKM_AES_GCM"), or its number in hex.
std::string mechanism_name(unsigned long mechanism);

}  // namespace vaultfs::hsm
