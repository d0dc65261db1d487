// hsm errors: why a key-service call failed, as a value. The reason is kept
// (unlike a bare bool) so that the daemon can tell a wrong PIN from a missing
// token from a tampered blob.
#pragma once

#include <string>
#include <utility>

#include <tl/expected.hpp>

namespace vaultfs::hsm {

enum class Errc {
    module_unavailable,     // the PKCS#11 module could not be loaded or initialised
    token_not_found,        // no token with the configured label
    pin_incorrect,          // the token rejected the PIN; never retried
    pin_locked,             // the token has locked the user PIN
    key_not_found,          // no key object with that id
    authentication_failed,  // a sealed blob failed its check (GCM tag or MAC) (tampered or wrong AAD)
    device_error,           // any other failure of the token
    out_of_secure_memory,   // the locked heap is exhausted or missing
    invalid_argument,
    not_permitted,          // the key may not do that (its usage flags)
    mechanism_unsupported,  // the token lacks a mechanism vaultfs needs (hsm/pkcs11/mechanisms.hpp)
};

struct Error {
    Errc code;
    std::string message;  // one line; never contains key material or plaintext
};

template <class T>
using Result = tl::expected<T, Error>;

inline tl::unexpected<Error> fail(Errc code, std::string message)
{
    return tl::unexpected<Error>(Error{code, std::move(message)});
}

}  // namespace vaultfs::hsm
