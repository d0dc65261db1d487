// Certificates: Azure Key Vault's certificates. Each version is a key pair
// and the certificate chain issued for it:
//
//   exportable       the key is made in software and kept only envelope-
//                    encrypted in the store (as a secret's value is: its own
//                    DEK, sealed by the vault's KEK), so key.pem and the
//                    bundles can be read by holders of `get`
//   not exportable   the key is made in the token (hsm/key_pairs.hpp) and
//                    signs through libp11 (hsm/pkcs11/token_evp.hpp); key.pem and the
//                    bundles do not exist (Errc::not_found)
//
// Issuers: `self` (self-signed), `V/CA` (another certificate of a vault,
// made with --ca: its key signs, which needs `sign` on it), or `unknown` (a
// CSR waits in csr.pem until `merge` brings the signed certificate).
//
// Files of a version (and of NAME, the version it stands for):
//   cert.pem chain.pem ca.pem status csr.pem       `get` or `certificates`
//   key.pem bundle.pem bundle.p12 (exportable)     `get`
//
// `create` makes, imports and merges; `rotate` renews. Every operation is
// audited (cert_create, cert_import, cert_merge, cert_renew, cert_get).
// Renewal makes a new version with a new key; NAME stands for it from the
// commit on, while NAME@N keeps what it had.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <chrono>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/key_pairs.hpp"
#include "hsm/key_service.hpp"
#include "hsm/secure_buffer.hpp"
#include "hsm/pkcs11/token_evp.hpp"
#include "vault/core.hpp"
#include "vault/objects/objects.hpp"

namespace vaultfs::vault::certificates {

// A certificate's policy: what each version is made with.
struct CertPolicy {
    std::string subject;  // "CN=web.example,O=Example"
    std::string sans;     // "DNS:web.example,IP:10.0.0.1"
    std::chrono::seconds validity{365 * 86400};
    hsm::KeyType key = hsm::KeyType::ec_p256;
    bool exportable = false;
    bool ca = false;
    std::string issuer = "self";  // "self", "unknown" or "VAULT/NAME"
    // Renewal by the background task: at this share of the validity, or
    // this long before not_after (one of them; neither: no auto-renewal).
    std::optional<int> renew_at_percent;
    std::optional<std::chrono::seconds> renew_before;

    std::string to_json() const;
    static std::optional<CertPolicy> from_json(std::string_view text);
};

enum class CertFile { cert, chain, ca, key, bundle, bundle_p12, csr, status };
// "cert.pem", "chain.pem", ...; nullopt for other names.
std::optional<CertFile> cert_file(std::string_view name);
std::string_view to_string(CertFile f);
// The files a version has (key and bundles only if exportable, csr.pem
// only while pending).
std::vector<CertFile> files_of(const ObjectView& view);
// "pending", "issued" or "failed".
std::string status_of(const ObjectView& view);

class Certificates {
public:
    Certificates(Core& core, hsm::KeyService& keys, hsm::KeyPairService& pairs, hsm::TokenEvp& evp)
        : core_(core), keys_(keys), pairs_(pairs), evp_(evp), objects_(core, ObjectKind::certificate)
    {
    }

    Objects& objects() { return objects_; }

    // Needs `create`. Errc::already_exists when the name is taken by a
    // secret, key or certificate; Errc::invalid_argument for a subject or
    // SAN that does not parse, or an issuer that is not a CA certificate.
    Result<ObjectView> create(const Caller& caller, std::string_view vault, std::string_view name, CertPolicy policy);
    // A new version issued now with the policy's key type (caller null: the
    // daemon's renewal). Needs `rotate`. Audited ("cert_renew").
    Result<ObjectView> renew(const Caller* caller, std::string_view vault, std::string_view name);
    // Completes a pending version with the certificate signed elsewhere
    // (PEM: leaf first, then its issuers). Errc::invalid_argument when it
    // is not for this version's key. Needs `create`. Audited ("cert_merge").
    Result<ObjectView> merge(const Caller& caller, std::string_view vault, std::string_view name,
                             std::string_view signed_pem);
    // PEM (key and chain) or PKCS#12 (with `password`): a new certificate,
    // or a new version of an existing one. The key is kept exportable.
    // Needs `create`. Audited ("cert_import").
    Result<ObjectView> import(const Caller& caller, std::string_view vault, std::string_view name,
                              std::span<const std::uint8_t> data, const std::string& password);

    // One file of a version, in locked memory. Errc::not_found for files it
    // does not have. Audited ("cert_get", the file as attribute).
    Result<hsm::SecureBuffer> read_file(const Caller& caller, const ObjectView& view, CertFile file);

    // subject, sans, issuer, exportable, key type, not_after, status, with
    // the attributes every object has.
    Result<std::vector<std::pair<std::string, std::string>>> attributes(const Caller& caller, const ObjectView& view);

    // The background task's round: renews every certificate whose policy
    // says it is due. Returns how many were renewed.
    Result<std::size_t> run_policies(Micros now);

private:
    // Makes a key and issues (or requests) a certificate for `policy`: the
    // new version's row, to commit; refusals are recorded as `ev`.
    Result<ObjectVersionRow> make_version(const Caller* caller, const VaultEntry& v, const std::string& name,
                              const CertPolicy& policy, audit::Event& ev);
    // Runs `use` with the private key of a version (software or token).
    Result<void> with_key(const VaultEntry& v, const ObjectRow& object, const ObjectVersionRow& version,
                          const std::function<Result<void>(EVP_PKEY*)>& use);
    // Seals a PKCS#8 key for `row` under the vault's KEK (fills row's
    // kek_id, nonce, sealed_key, sealed_dek and body.key_ref).
    Result<void> seal_key(const VaultEntry& v, const std::string& name, std::span<const std::uint8_t> der,
                          ObjectVersionRow& row);
    Result<hsm::SecureBuffer> unseal_key(const VaultEntry& v, const ObjectRow& object, const ObjectVersionRow& row);
    // A token key's issued certificate, stored on the token beside it
    // (libp11); a failure is logged, never fatal: the database holds it.
    void keep_on_token(const VaultEntry& v, const std::string& name, const ObjectVersionRow& row);
    Result<ObjectView> commit(const Caller* caller, const VaultEntry& v, std::optional<ObjectRow> object,
                              ObjectRow fresh, ObjectVersionRow row, audit::Event& ev);

    Core& core_;
    hsm::KeyService& keys_;
    hsm::KeyPairService& pairs_;
    hsm::TokenEvp& evp_;
    Objects objects_;
};

}  // namespace vaultfs::vault::certificates
