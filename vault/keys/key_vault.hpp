// KeyVault: Azure Key Vault's keys. Each version is a key pair generated in
// the token (hsm/key_pairs.hpp): its private half is sensitive and never
// extractable, and its CKA_ID is stored with the version it belongs to, so
// a version names exactly one token key. The database holds the public half
// and the key's spec, nothing secret.
//
//   V/.keys/NAME           the version NAME stands for (highest enabled)
//   V/.keys/NAME@N         version N
//
// Permissions (policy.hpp): `create` makes a key, `rotate` gives it a new
// version, `get` reads its public half, `sign`, `decrypt` and `unwrap` use
// its private half, `set` changes enabled / not_before / expires. Every
// operation is audited (ops key_create, key_rotate, key_get, key_sign,
// key_decrypt, key_unwrap, key_near_expiry). A disabled version, or one
// outside not_before..expires, does nothing (Errc::disabled,
// Errc::not_valid_now). Encrypting, wrapping and verifying need only the
// public half; do them locally (openssl pkeyutl / dgst with public.pem).
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/key_pairs.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/core.hpp"
#include "vault/objects/objects.hpp"

namespace vaultfs::vault::keys {

// A key's allowed operations, as Azure names them (key_ops).
struct Operations {
    bool sign = false, verify = false, encrypt = false, decrypt = false, wrap = false, unwrap = false;
    // "sign,verify,..." (Azure's wrapKey / unwrapKey are spelled wrapkey,
    // unwrapkey); nullopt naming the first unknown one in `bad`.
    static std::optional<Operations> parse(std::string_view text, std::string* bad = nullptr);
    // What a key type can do at all: RSA all six, EC sign and verify.
    static Operations all_for(hsm::KeyType type);
    std::vector<std::string> names() const;
    bool within(const Operations& allowed) const;
};

struct KeySpec {
    hsm::KeyType type = hsm::KeyType::ec_p256;
    Operations ops;
    // Rotation policy, run by the daemon's background task.
    std::optional<std::chrono::seconds> rotate_after;   // a new version when the current one is this old
    std::optional<std::chrono::seconds> notify_before;  // a near-expiry event this long before expires
    std::optional<std::chrono::seconds> expires_after;  // each new version's expires = created + this
    std::string to_json() const;
    static std::optional<KeySpec> from_json(std::string_view text);
};

// Signing algorithms (JWA names) over digests, as Azure signs.
enum class SignAlgorithm { RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512 };
enum class DecryptAlgorithm { RSA_OAEP, RSA_OAEP_256, RSA1_5 };
std::optional<SignAlgorithm> sign_algorithm(std::string_view name);
std::optional<DecryptAlgorithm> decrypt_algorithm(std::string_view name);
std::string_view to_string(SignAlgorithm a);
std::string_view to_string(DecryptAlgorithm a);
// The algorithms a key of `type` with `ops` offers (the filesystem lists
// one file per algorithm).
std::vector<SignAlgorithm> sign_algorithms(hsm::KeyType type, const Operations& ops);
std::vector<DecryptAlgorithm> decrypt_algorithms(hsm::KeyType type, const Operations& ops);
// The digest size an algorithm signs (32, 48 or 64 bytes).
std::size_t digest_size(SignAlgorithm a);

// ECDSA signatures: DER (what openssl dgst -verify reads) to JOSE's r | s.
std::optional<std::vector<std::uint8_t>> ecdsa_der_to_raw(std::span<const std::uint8_t> der, hsm::KeyType type);
// A SubjectPublicKeyInfo as PEM, and as a JWK (with `kid`, `key_ops`).
std::optional<std::string> public_pem(std::span<const std::uint8_t> spki);
std::optional<std::string> public_jwk(std::span<const std::uint8_t> spki, std::string_view kid,
                                      const std::vector<std::string>& key_ops);

class KeyVault {
public:
    KeyVault(Core& core, hsm::KeyPairService& pairs) : core_(core), pairs_(pairs), objects_(core, ObjectKind::key) {}

    Objects& objects() { return objects_; }
    KeySpec spec_of(const ObjectView& view) const;

    // Needs `create`. Errc::already_exists when the name is taken by a key
    // or a certificate; Errc::invalid_argument for operations the type
    // cannot do. Audited ("key_create").
    Result<ObjectView> create(const Caller& caller, std::string_view vault, std::string_view name, KeySpec spec);
    // Needs `rotate` (or is the daemon's rotation policy: caller null).
    // A new version of the same type and operations. Audited ("key_rotate").
    Result<ObjectView> rotate(const Caller* caller, std::string_view vault, std::string_view name);
    // Replaces the rotation policy (rotate_after, notify_before,
    // expires_after). Needs `rotate`. Audited ("key_policy").
    Result<void> set_rotation(const Caller& caller, std::string_view vault, std::string_view name,
                              const KeySpec& policy);

    // The public half. Needs `get`. Audited ("key_get").
    Result<std::vector<std::uint8_t>> public_key(const Caller& caller, const ObjectView& view);
    // Signs a digest with the version's private half (DER for ECDSA).
    // Needs `sign` and the key's `sign` operation. Errc::invalid_argument
    // for an algorithm the key does not offer or a digest of the wrong
    // size. Audited ("key_sign").
    Result<std::vector<std::uint8_t>> sign(const Caller& caller, const ObjectView& view, SignAlgorithm alg,
                                           std::span<const std::uint8_t> digest);
    // Decrypts (`unwrap` false: needs `decrypt` and the key's decrypt
    // operation) or unwraps a key (needs `unwrap` and unwrapkey). The result
    // is in locked memory. Errc::integrity when the ciphertext does not
    // decrypt under this version. Audited ("key_decrypt" / "key_unwrap").
    Result<hsm::SecureBuffer> decrypt(const Caller& caller, const ObjectView& view, DecryptAlgorithm alg,
                                      std::span<const std::uint8_t> data, bool unwrap);

    // An operation file given more input than its operation takes (`most`
    // bytes): refused with Errc::invalid_argument and audited as the
    // operation's record ("key_sign", "key_decrypt" or "key_unwrap"), with
    // the bytes given. `alg` names the algorithm, as the file does.
    Result<void> refuse_input(const Caller& caller, const ObjectView& view, std::string_view op, std::string_view alg,
                              std::size_t bytes, std::size_t most);

    // type, ops, rotation policy, with the attributes every object has.
    Result<std::vector<std::pair<std::string, std::string>>> attributes(const Caller& caller, const ObjectView& view);

    // The background task's round: rotates keys whose rotation policy says
    // so, and records a near-expiry event (audit and log) once per version
    // whose expiry is within its notify_before. Returns what it did.
    Result<std::size_t> run_policies(Micros now);

private:
    // A version's private half may be used now, or the refusal recorded as `ev`.
    Result<void> usable(const ObjectView& view, audit::Event& ev);
    Result<ObjectView> add_version(const Caller* caller, const VaultEntry& v, ObjectRow object, const KeySpec& spec,
                                   audit::Event& ev, bool create);

    Core& core_;
    hsm::KeyPairService& pairs_;
    Objects objects_;
};

}  // namespace vaultfs::vault::keys
