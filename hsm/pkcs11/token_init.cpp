// initialise_token: a new token in a module's free slot, with its SO and
// user PINs (vaultfs init with the embedded SoftHSM2).
#include "hsm/pkcs11/key_service.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <algorithm>
#include <array>
#include <optional>

#include "hsm/pkcs11/session.hpp"

namespace vaultfs::hsm {

using p11::Module;

Result<void> initialise_token(const std::string& module_path,
                              const std::vector<std::pair<std::string, std::string>>& environment,
                              const std::string& label, const SecureBuffer& so_pin, const SecureBuffer& user_pin)
{
    auto module = Module::load(module_path, environment);
    if (!module)
        return tl::unexpected(module.error());
    auto& fn = **module;
    if ((*module)->find_token(label))
        return fail(Errc::device_error, "a token labelled '" + label + "' already exists");

    auto slots = (*module)->slot_list();
    if (!slots)
        return tl::unexpected(slots.error());
    std::optional<ck_slot_id_t> free_slot;
    for (const auto slot : *slots) {
        ck_token_info info{};
        if (fn->C_GetTokenInfo(slot, &info) == CKR_OK && !(info.flags & CKF_TOKEN_INITIALIZED)) {
            free_slot = slot;
            break;
        }
    }
    if (!free_slot)
        return fail(Errc::token_not_found, "module " + module_path + " offers no free slot for a new token");

    auto padded = p11::padded_label(label);
    if (const ck_rv_t rv = fn->C_InitToken(*free_slot, const_cast<std::uint8_t*>(so_pin.data()), so_pin.size(),
                                           padded.data());
        rv != CKR_OK)
        return fail(Errc::device_error, "C_InitToken failed: " + rv_name(rv));

    // SoftHSM moves a freshly initialised token to a new slot id.
    auto slot = (*module)->find_token(label);
    if (!slot)
        return tl::unexpected(slot.error());
    ck_session_handle_t s = 0;
    if (const ck_rv_t rv = fn->C_OpenSession(*slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
        rv != CKR_OK)
        return fail(Errc::device_error, "C_OpenSession failed: " + rv_name(rv));
    ck_rv_t rv = fn->C_Login(s, CKU_SO, const_cast<std::uint8_t*>(so_pin.data()), so_pin.size());
    if (rv == CKR_OK) {
        rv = fn->C_InitPIN(s, const_cast<std::uint8_t*>(user_pin.data()), user_pin.size());
        fn->C_Logout(s);
    }
    fn->C_CloseSession(s);
    if (rv != CKR_OK)
        return fail(Errc::device_error, "setting the user PIN failed: " + rv_name(rv));
    return {};
}

}  // namespace vaultfs::hsm
