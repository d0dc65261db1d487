// Pkcs11KeyService: KeyService and KeyPairService over a PKCS#11 module
// reached directly through its function list (libp11 has no symmetric-key
// API, and 0.4.12 generates RSA keys only; token_evp.hpp uses libp11 for
// what it does well, EVP_PKEYs for OpenSSL).
//
// - The module is dlopened once per process and C_Initialize is called once
//   with CKF_OS_LOCKING_OK; C_Finalize runs when the last service using it is
//   destroyed.
// - Sessions are pooled: a worker borrows one logged-in session for the
//   length of one operation, so no session is shared between threads and no
//   request pays for a login. The pool keeps at least one session open,
//   because closing a token's last session logs the application out.
// - A session found lost (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
//   CKR_USER_NOT_LOGGED_IN) is dropped with every idle one (they seldom go
//   alone: libp11's C_CloseAllSessions on the same module, a logout), and
//   the operation retried on fresh, freshly logged-in sessions.
// - A PIN the token rejects is never presented again by this object: every
//   later call fails with Errc::pin_incorrect without touching the token (a
//   real HSM locks after a few wrong tries).
// - Object handles are cached by CKA_ID and looked up again once if the token
//   says a cached handle is no longer valid.
#pragma once

#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "hsm/key_pairs.hpp"
#include "hsm/key_service.hpp"
#include "hsm/pkcs11/mechanisms.hpp"
#include "hsm/op_stats.hpp"

namespace vaultfs::hsm {

struct Pkcs11Config {
    std::string module_path;  // e.g. /usr/lib/softhsm/libsofthsm2.so
    std::string token_label;  // CKA_LABEL of the token, e.g. "vaultfs"
    SecureBuffer pin;         // user PIN, in locked memory
    // Variables the module reads at C_Initialize (SOFTHSM2_CONF for SoftHSM);
    // set in this process's environment before the module is initialised.
    std::vector<std::pair<std::string, std::string>> environment;
    // The constructions to use (mechanisms.hpp): a state's recorded choice,
    // which open() checks the token offers; nullopt to negotiate the best
    // the token has (init, token migrate).
    std::optional<Schemes> schemes;
};

class Pkcs11KeyService final : public KeyService, public KeyPairService {
public:
    // Loads the module, finds the token, logs in once and reads what the
    // token offers. Errors: module_unavailable, token_not_found,
    // pin_incorrect, pin_locked, mechanism_unsupported, device_error — each
    // with a one-line message naming what failed.
    static Result<std::unique_ptr<Pkcs11KeyService>> open(Pkcs11Config config);

    ~Pkcs11KeyService() override;
    Pkcs11KeyService(const Pkcs11KeyService&) = delete;
    Pkcs11KeyService& operator=(const Pkcs11KeyService&) = delete;

    Result<KeyId> create_kek(const std::string& label, KekReach reach) override;
    Result<void> find_key(const KeyId& id) override;
    Result<std::vector<std::uint8_t>> seal(const KeyId& kek, const SecureBuffer& dek,
                                           std::span<const std::uint8_t> aad) override;
    Result<SecureBuffer> unseal(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                std::span<const std::uint8_t> aad) override;
    Result<KeyId> create_signing_key(const std::string& label) override;
    Result<std::vector<std::uint8_t>> sign_digest(const KeyId& key,
                                                  std::span<const std::uint8_t, 32> digest) override;
    Result<void> ping() override;

    // KeyPairService.
    Result<KeyId> create_key_pair(KeyType type, const std::string& label, KeyUsage usage) override;
    Result<std::vector<std::uint8_t>> public_key_der(const KeyId& key) override;
    Result<std::vector<std::uint8_t>> sign(const KeyId& key, Mechanism mechanism,
                                           std::span<const std::uint8_t> digest) override;
    Result<SecureBuffer> decrypt(const KeyId& key, Mechanism mechanism, std::span<const std::uint8_t> data) override;
    Result<void> destroy_key_pair(const KeyId& key) override;
    std::uint64_t connection_epoch() const override;

    // A KEK (and its MAC key) under a given id, for moving a state from
    // another token with its rows unchanged (vault/state/token_migration.hpp).
    // Fails if the token already holds a key with that id.
    Result<void> create_kek_with_id(const std::string& label, const KeyId& kek, KekReach reach);
    // Removes a KEK and its MAC key; a key already gone is fine.
    Result<void> destroy_kek(const KeyId& kek);

    // What a KEK in the token lets out, read back from its attributes:
    // a KEK of any other kind than vaultfs makes today (`any_wrapping_key`:
    // made by a vaultfs before 0.2, or by hand) needs `vaultfs vault rekey`.
    enum class KekExposure {
        none,              // not extractable: it never leaves the token
        trusted_only,      // extractable only under a key the SO trusted
        any_wrapping_key,  // extractable under any key a PIN holder makes
    };
    Result<KekExposure> kek_exposure(const KeyId& kek);

    // ---- moving KEKs between hosts' tokens (hsm/pkcs11/kek_transfer.cpp) -----------
    // docs/hosts.md "Several hosts". A KEK moves only wrapped (RSA-OAEP) under the
    // receiving host's transport key, and only where this token's Security
    // Officer made that key CKA_TRUSTED (security_officer.hpp): the user PIN
    // alone wraps a KEK for nobody.
    //
    // Whether the token refuses to wrap a CKA_WRAP_WITH_TRUSTED key under a
    // key nobody trusted: tried once with session keys of its own (a key
    // without the attribute must wrap, the one with it must be refused with
    // CKR_KEY_NOT_WRAPPABLE), then remembered. Errc::not_permitted, naming
    // what the token did, when it does not enforce it (openCryptoki before
    // 3.16): such a token serves one host, and never shares a KEK.
    Result<void> check_trusted_wrapping();

    // A host's transport key: RSA-3072, its private half only unwraps (never
    // decrypts, signs or leaves the token) and carries a CKA_UNWRAP_TEMPLATE
    // that every key unwrapped with it must take: sensitive, extractable
    // only under a trusted key, never a wrapping, unwrapping or deriving key.
    // So a PIN holder who unwraps a grant gets nothing they can read. Its
    // public half only wraps.
    Result<KeyId> create_transport_key(const std::string& label);
    // The CKA_ID under which a token keeps another host's transport key as a
    // trusted wrapping key: the first 16 bytes of SHA-256 over its DER.
    static KeyId trusted_key_id(std::span<const std::uint8_t> transport_public);
    // Whether this token holds `transport_public` (DER SubjectPublicKeyInfo)
    // as a key its Security Officer trusted.
    Result<bool> trusts(std::span<const std::uint8_t> transport_public);
    // `kek` wrapped with RSA-OAEP (SHA-1, MGF1-SHA-1: SoftHSM2 2.6 takes no
    // other OAEP hash for wrapping) under the trusted copy of
    // `transport_public`. Errc::not_permitted when this token does not trust
    // that key, or the KEK may not leave (made for one host);
    // Errc::invalid_argument for anything but an RSA key of 3072 bits or more.
    Result<std::vector<std::uint8_t>> wrap_kek(const KeyId& kek, std::span<const std::uint8_t> transport_public);
    // Unwraps into this token, as a token KEK with id `kek` and the
    // attributes of KekReach::trusted_tokens: Errc::invalid_argument when
    // the token already holds that id, Errc::authentication_failed when the
    // blob does not open with `transport`.
    Result<void> unwrap_kek(const KeyId& transport, std::span<const std::uint8_t> wrapped, const KeyId& kek,
                            const std::string& label);
    // The public keys the Security Officer marked trusted in this token.
    struct TrustedKey {
        KeyId id;
        std::string label;
        std::vector<std::uint8_t> spki;  // DER SubjectPublicKeyInfo
    };
    Result<std::vector<TrustedKey>> trusted_keys();
    // Removes the trusted copy of `transport_public` (its host was removed);
    // one already gone is fine. Takes trust away, so needs no SO.
    Result<void> forget_trusted_key(std::span<const std::uint8_t> transport_public);

    // What the token said it offers, and the constructions in use (with the
    // fallbacks negotiation took, for the admin).
    const TokenProfile& profile() const;
    // Operations asked of the token and their latency (metrics).
    const OpStats& op_stats() const;
    const Schemes& schemes() const;
    const std::vector<std::string>& negotiation_notes() const;

    // Holds off a reconnect (which finalizes the module) while libp11 works
    // on the same module: token_evp.hpp takes it around every libp11 call.
    std::shared_lock<std::shared_mutex> hold_module();

    // What libp11 (token_evp.hpp) needs to reach the same token.
    const std::string& module_path() const;
    const std::string& token_label() const;
    const SecureBuffer& pin() const;

    // Test seam: reads one attribute of a key (e.g. CKA_VALUE). Returns the
    // PKCS#11 return value; a sensitive key must answer
    // CKR_ATTRIBUTE_SENSITIVE for CKA_VALUE.
    unsigned long read_attribute_rv(const KeyId& id, unsigned long attribute_type);
    // Test seam: reads a CK_BBOOL attribute of a key.
    Result<bool> read_bool_attribute(const KeyId& id, unsigned long attribute_type);

    struct Impl;

private:
    explicit Pkcs11KeyService(std::unique_ptr<Impl> impl);
    Result<std::vector<std::uint8_t>> seal_cbc_hmac(const KeyId& kek, const SecureBuffer& dek,
                                                    std::span<const std::uint8_t> aad);
    Result<SecureBuffer> unseal_cbc_hmac(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                         std::span<const std::uint8_t> aad);
    // create_key_pair without the check against the token's mechanisms
    // (the audit signing key's construction was checked at open).
    Result<KeyId> generate_key_pair(KeyType type, const std::string& label, KeyUsage usage);
    Result<SecureBuffer> oaep_on_host(const KeyId& key, Digest digest, std::span<const std::uint8_t> data);
    std::unique_ptr<Impl> impl_;
};

// Initialises a new token labelled `label`, with the security officer PIN
// and the user PIN, in the module's first free slot. For the embedded
// SoftHSM2 default only (SoftHSM always offers a free slot): a token an admin
// already has is adopted as it is and never initialised. Fails with
// Errc::device_error if a token with that label already exists.
Result<void> initialise_token(const std::string& module_path,
                              const std::vector<std::pair<std::string, std::string>>& environment,
                              const std::string& label, const SecureBuffer& so_pin, const SecureBuffer& user_pin);

}  // namespace vaultfs::hsm
