#include "hsm/pkcs11/session.hpp"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>

namespace vaultfs::hsm::p11 {

std::string rv_name(ck_rv_t rv)
{
    static const std::map<ck_rv_t, const char*> names{
        {CKR_OK, "CKR_OK"},
        {CKR_HOST_MEMORY, "CKR_HOST_MEMORY"},
        {CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID"},
        {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
        {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"},
        {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
        {CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE"},
        {CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"},
        {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
        {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY"},
        {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
        {CKR_ENCRYPTED_DATA_INVALID, "CKR_ENCRYPTED_DATA_INVALID"},
        {CKR_ENCRYPTED_DATA_LEN_RANGE, "CKR_ENCRYPTED_DATA_LEN_RANGE"},
        {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"},
        {CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED"},
        {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
        {CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"},
        {CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"},
        {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
        {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
        {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
        {CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED"},
        {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
        {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
        {CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED"},
        {CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN"},
        {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
        {CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED"},
        {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
        {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
        {CKR_CRYPTOKI_ALREADY_INITIALIZED, "CKR_CRYPTOKI_ALREADY_INITIALIZED"},
    };
    const auto it = names.find(rv);
    if (it != names.end())
        return it->second;
    char buf[32];
    std::snprintf(buf, sizeof buf, "CKR_0x%lx", rv);
    return buf;
}

Result<std::shared_ptr<Module>> Module::load(const std::string& path,
                                              const std::vector<std::pair<std::string, std::string>>& env)
{
    static std::mutex registry_mutex;
    static std::map<std::string, std::weak_ptr<Module>> registry;
    std::lock_guard lock(registry_mutex);
    if (auto existing = registry[path].lock()) {
        // A module is initialised once per process, with the environment
        // it had then (SoftHSM2 reads one SOFTHSM2_CONF): a second
        // configuration of it cannot be reached from this process.
        if (existing->env_ != env)
            return fail(Errc::module_unavailable,
                        path + " is already in use in this process with another module environment; one process "
                               "reaches one configuration of a module (SoftHSM2 reads one SOFTHSM2_CONF), so move "
                               "between two tokens of one module only when they share it");
        return existing;
    }

    for (const auto& [name, value] : env)
        ::setenv(name.c_str(), value.c_str(), 1);

    // Never dlclosed: modules keep process-wide state and atexit hooks.
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
        return fail(Errc::module_unavailable, "cannot load PKCS#11 module " + path + ": " + ::dlerror());
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle, "C_GetFunctionList"));
    if (get_list == nullptr)
        return fail(Errc::module_unavailable, path + " is not a PKCS#11 module (no C_GetFunctionList)");
    ck_function_list* fn = nullptr;
    if (const ck_rv_t rv = get_list(&fn); rv != CKR_OK || fn == nullptr)
        return fail(Errc::module_unavailable, path + ": C_GetFunctionList failed: " + rv_name(rv));

    ck_c_initialize_args args{};
    args.flags = CKF_OS_LOCKING_OK;
    if (const ck_rv_t rv = fn->C_Initialize(&args); rv != CKR_OK)
        return fail(Errc::module_unavailable, path + ": C_Initialize failed: " + rv_name(rv));
    auto module = std::shared_ptr<Module>(new Module(fn));
    module->env_ = env;
    registry[path] = module;
    return module;
}

}  // namespace vaultfs::hsm::p11
