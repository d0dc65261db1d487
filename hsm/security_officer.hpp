// SecurityOfficer: the one step of the key ceremony that needs the token's
// Security Officer (docs/hosts.md "Several hosts"): marking another host's
// transport key CKA_TRUSTED, so that this token will wrap KEKs for it.
//
// Only the SO can set CKA_TRUSTED, and a KEK of a shared store is
// CKA_WRAP_WITH_TRUSTED: so the user PIN the daemon holds can wrap a KEK for
// no key the SO did not take in. The SO PIN serves this one login; the
// caller wipes it (it lives in a SecureBuffer) and never stores it.
//
// PKCS#11 allows one login per application and token: a process logged in
// as the user (a daemon, an open Pkcs11KeyService) cannot log in as the SO.
// The CLI does, on its own, while the daemon goes on serving.
//
// Thread-safety: one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "hsm/error.hpp"
#include "hsm/secure_buffer.hpp"

namespace vaultfs::hsm {

class SecurityOfficer {
public:
    // Loads the module and logs in to the token labelled `token_label` as
    // its SO. Errc::pin_incorrect when the token rejects the PIN (tried
    // once, never again); Errc::device_error when a user of this process is
    // logged in to it.
    static Result<std::unique_ptr<SecurityOfficer>> login(
        const std::string& module_path, const std::vector<std::pair<std::string, std::string>>& environment,
        const std::string& token_label, const SecureBuffer& so_pin);
    // Logs out and closes the session.
    ~SecurityOfficer();
    SecurityOfficer(const SecurityOfficer&) = delete;
    SecurityOfficer& operator=(const SecurityOfficer&) = delete;

    // Stores `transport_public` (DER SubjectPublicKeyInfo, RSA >= 3072) as a
    // trusted wrapping key: a public token object under
    // Pkcs11KeyService::trusted_key_id, CKA_TRUSTED, wrap only, not
    // modifiable (so not copyable with another modulus). True when it was
    // made now; false when the token trusted that key already.
    // Errc::invalid_argument when another object holds its id.
    Result<bool> trust(std::span<const std::uint8_t> transport_public, const std::string& label);
    // Removes it again (a ceremony that failed after this step).
    Result<void> forget(std::span<const std::uint8_t> transport_public);

    struct Session;

private:
    explicit SecurityOfficer(std::unique_ptr<Session> session);
    std::unique_ptr<Session> session_;
};

}  // namespace vaultfs::hsm
