// TokenEvp: libp11 over the same token as Pkcs11KeyService, for what libp11
// does well -- turning a token-held private key into an OpenSSL EVP_PKEY,
// so that OpenSSL itself signs X.509 certificates and CSRs with it
// (X509_sign, X509_REQ_sign) while the key stays in the token -- and
// storing a non-exportable key's certificate on the token beside it.
//
// - libp11 is initialised after the key service's own C_Initialize (libp11
//   accepts CKR_CRYPTOKI_ALREADY_INITIALIZED) and logs in only when the
//   application is not logged in already (login state is per process).
// - A libp11 context stays broken after the module's C_Finalize, which the
//   key service's reconnect does: when its connection_epoch() moves on, the
//   context is rebuilt. The old one is abandoned, never unloaded:
//   PKCS11_CTX_unload would C_Finalize the module under the key service.
//   PKCS11_logout is never called for the same reason.
// - Every call into libp11, signing included, runs under one mutex, and
//   holds off the key service's reconnect (Pkcs11KeyService::hold_module),
//   so the module is never finalized under libp11. REQUIRES: `use` makes no
//   key-service call (it would wait behind a reconnect that waits for it).
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <functional>
#include <memory>
#include <mutex>
#include <span>

#include "hsm/error.hpp"
#include "hsm/key_service.hpp"
#include "hsm/pkcs11/key_service.hpp"

struct PKCS11_token_st;  // libp11.h

namespace vaultfs::hsm {

class TokenEvp {
public:
    explicit TokenEvp(Pkcs11KeyService& keys);
    ~TokenEvp();
    TokenEvp(const TokenEvp&) = delete;
    TokenEvp& operator=(const TokenEvp&) = delete;

    // Runs `use` with an EVP_PKEY for the private half of `key` (valid only
    // during the call), under the mutex. Errc::key_not_found when libp11
    // sees no such key; the result of `use` otherwise.
    Result<void> with_private_key(const KeyId& key, const std::function<Result<void>(EVP_PKEY*)>& use);

    // Stores `cert` on the token as a certificate object with the key's
    // CKA_ID and `label`, so that token-aware software finds a
    // non-exportable key's certificate beside it.
    Result<void> store_certificate(const KeyId& key, X509* cert, const std::string& label);

    struct Context;

private:
    Result<Context*> context();  // REQUIRES: mutex_ held
    // Runs `work` on the token with the key's raw CKA_ID, under the mutex
    // and with reconnects held off.
    Result<void> on_token(const KeyId& key,
                          const std::function<Result<void>(PKCS11_token_st*, std::span<std::uint8_t>)>& work);

    Pkcs11KeyService& keys_;
    std::mutex mutex_;
    std::unique_ptr<Context> current_;
};

}  // namespace vaultfs::hsm
