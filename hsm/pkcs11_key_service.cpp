#include "hsm/pkcs11_key_service.hpp"

#include "hsm/hex.hpp"

// GNU names only: the compatibility names are macros (`value`, `flags`...)
// that would rewrite unrelated C++ identifiers.
#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/rand.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <chrono>
#include <mutex>
#include <shared_mutex>
#include <optional>
#include <unordered_map>

namespace vaultfs::hsm {

namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr std::size_t gcm_iv_size = 12;
constexpr std::size_t gcm_tag_size = 16;
constexpr std::size_t cbc_iv_size = 16;
constexpr std::size_t cbc_ct_size = 48;  // a 32-byte DEK and a block of padding
constexpr std::size_t hmac_size = 32;
constexpr std::string_view cbc_hmac_context = "vaultfs-seal-cbc-hmac-v1";
constexpr std::size_t key_id_size = 16;
// DER of OID 1.2.840.10045.3.1.7 (prime256v1)
constexpr std::array<std::uint8_t, 10> p256_oid_der{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

// The MAC key beside an aes-cbc-pad+hmac-sha256 KEK: the KEK's CKA_ID and 'm'.
KeyId mac_key_of(const KeyId& kek) { return KeyId{kek.hex + "6d"}; }

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

bool session_lost(ck_rv_t rv)
{
    return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_USER_NOT_LOGGED_IN;
}

bool handle_stale(ck_rv_t rv) { return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID; }

// The outcome of a call made through a session: the session's own error,
// or "<what> failed: CKR_…" for a call the token refused.
Result<void> call_ok(const Result<ck_rv_t>& rv, const std::string& what)
{
    if (!rv)
        return tl::unexpected(rv.error());
    if (*rv != CKR_OK)
        return fail(Errc::device_error, what + " failed: " + rv_name(*rv));
    return {};
}

std::string trimmed_label(const unsigned char (&label)[32])
{
    std::string s(reinterpret_cast<const char*>(label), 32);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\0'))
        s.pop_back();
    return s;
}

std::string trimmed_text(const unsigned char* text, std::size_t size)
{
    std::string s(reinterpret_cast<const char*>(text), size);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\0'))
        s.pop_back();
    return s;
}

std::array<unsigned char, 32> padded_label(const std::string& label)
{
    std::array<unsigned char, 32> out;
    out.fill(' ');
    std::memcpy(out.data(), label.data(), std::min<std::size_t>(label.size(), out.size()));
    return out;
}

// A loaded and initialised module. One per module path per process.
class Module {
public:
    static Result<std::shared_ptr<Module>> load(const std::string& path,
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

    ~Module() { fn_->C_Finalize(nullptr); }
    // Moves on with every reinitialize(): object handles from before name
    // nothing (or another object) after, in every service sharing the module.
    std::atomic<std::uint64_t> generation{0};
    ck_function_list* operator->() const { return fn_; }

    // Finalizes and initialises the module again: the way back after the
    // token went away (a removed device, SoftHSM's directory vanishing).
    // REQUIRES: no other thread is inside the module.
    ck_rv_t reinitialize()
    {
        generation.fetch_add(1);
        fn_->C_Finalize(nullptr);
        ck_c_initialize_args args{};
        args.flags = CKF_OS_LOCKING_OK;
        return fn_->C_Initialize(&args);
    }

    // The slot holding the initialised token labelled `label`.
    Result<ck_slot_id_t> find_token(const std::string& label) const
    {
        auto slots = slot_list();
        if (!slots)
            return tl::unexpected(slots.error());
        for (const auto slot : *slots) {
            ck_token_info info{};
            if (fn_->C_GetTokenInfo(slot, &info) != CKR_OK)
                continue;
            if ((info.flags & CKF_TOKEN_INITIALIZED) && trimmed_label(info.label) == label)
                return slot;
        }
        return fail(Errc::token_not_found, "no initialised token labelled '" + label + "'");
    }

    Result<std::vector<ck_slot_id_t>> slot_list() const
    {
        unsigned long count = 0;
        if (const ck_rv_t rv = fn_->C_GetSlotList(1, nullptr, &count); rv != CKR_OK)
            return fail(Errc::device_error, "C_GetSlotList failed: " + rv_name(rv));
        std::vector<ck_slot_id_t> slots(count);
        if (const ck_rv_t rv = fn_->C_GetSlotList(1, slots.data(), &count); rv != CKR_OK)
            return fail(Errc::device_error, "C_GetSlotList failed: " + rv_name(rv));
        slots.resize(count);
        return slots;
    }

private:
    explicit Module(ck_function_list* fn) : fn_(fn) {}
    ck_function_list* fn_;
    std::vector<std::pair<std::string, std::string>> env_;  // as loaded
};

// Every answer that says the PIN itself is wrong: never presented again.
bool pin_problem(ck_rv_t rv)
{
    return rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_INVALID || rv == CKR_PIN_LEN_RANGE ||
           rv == CKR_PIN_EXPIRED;
}

Error login_error(ck_rv_t rv, const std::string& label)
{
    switch (rv) {
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
        return {Errc::pin_incorrect, "token '" + label + "' rejected the PIN (" + rv_name(rv) + "); not retrying"};
    case CKR_PIN_LOCKED:
        return {Errc::pin_locked, "token '" + label + "' has locked its user PIN (CKR_PIN_LOCKED)"};
    case CKR_USER_PIN_NOT_INITIALIZED:
        return {Errc::token_not_found, "token '" + label + "' has no user PIN set (CKR_USER_PIN_NOT_INITIALIZED)"};
    default:
        return {Errc::device_error, "login to token '" + label + "' failed: " + rv_name(rv)};
    }
}

ck_attribute attr(ck_attribute_type_t type, const void* value, unsigned long len)
{
    return ck_attribute{type, const_cast<void*>(value), len};
}

const unsigned char ck_true = 1;
const unsigned char ck_false = 0;
ck_attribute flag(ck_attribute_type_t type, bool on) { return attr(type, on ? &ck_true : &ck_false, 1); }

}  // namespace

struct Pkcs11KeyService::Impl {
    OpStats op_stats;
    std::shared_ptr<Module> module;
    ck_slot_id_t slot = 0;
    std::string module_path;
    std::string label;
    SecureBuffer pin;

    // Held shared by every operation, exclusively by reconnect(): PKCS#11
    // forbids C_Finalize while other threads are inside the module.
    std::shared_mutex module_mutex;
    std::mutex reconnect_mutex;
    std::chrono::steady_clock::time_point last_reconnect{};
    std::atomic<std::uint64_t> epoch{0};  // reconnects so far

    std::mutex pool_mutex;
    std::vector<ck_session_handle_t> idle;  // logged-in sessions nobody is using
    std::size_t open_sessions = 0;
    bool logged_in = false;
    bool pin_rejected = false;  // sticky: never present a rejected PIN again

    std::mutex handles_mutex;
    std::uint64_t handles_generation = 0;  // the module generation the handles are from
    std::unordered_map<std::string, ck_object_handle_t> handles;  // "class:idhex" -> handle

    TokenProfile profile;  // read once at open
    Schemes schemes;
    std::vector<std::string> notes;

    ~Impl()
    {
        std::lock_guard lock(pool_mutex);
        for (const auto s : idle)
            (*module)->C_CloseSession(s);
    }

    // After the token failed: drop every session and cached handle,
    // reinitialise the module and find the token again. At most once a
    // second; never presents a PIN that was rejected (open_session checks).
    // Returns true when the token is back.
    bool reconnect()
    {
        std::lock_guard once(reconnect_mutex);
        const auto now = std::chrono::steady_clock::now();
        if (now - last_reconnect < std::chrono::seconds(1))
            return false;
        last_reconnect = now;
        std::unique_lock exclusive(module_mutex);
        {
            std::lock_guard lock(pool_mutex);
            idle.clear();  // C_Finalize closes them
            open_sessions = 0;
            logged_in = false;
        }
        {
            std::lock_guard lock(handles_mutex);
            handles.clear();
        }
        epoch.fetch_add(1);
        if (module->reinitialize() != CKR_OK)
            return false;
        auto found = module->find_token(label);
        if (!found)
            return false;
        slot = *found;
        return true;
    }

    // Opens a session and, when the application is not logged in, logs in.
    Result<ck_session_handle_t> open_session()
    {
        {
            std::lock_guard lock(pool_mutex);
            if (pin_rejected)
                return tl::unexpected(login_error(CKR_PIN_INCORRECT, label));
        }
        ck_session_handle_t s = 0;
        ck_rv_t rv = (*module)->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
        if (rv != CKR_OK)
            return fail(Errc::device_error, "C_OpenSession on token '" + label + "' failed: " + rv_name(rv));
        std::lock_guard lock(pool_mutex);
        ++open_sessions;
        if (!logged_in) {
            rv = (*module)->C_Login(s, CKU_USER, pin.data(), pin.size());
            if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
                if (pin_problem(rv))
                    pin_rejected = true;
                (*module)->C_CloseSession(s);
                --open_sessions;
                return tl::unexpected(login_error(rv, label));
            }
            logged_in = true;
        }
        return s;
    }

    Result<ck_session_handle_t> acquire()
    {
        {
            std::lock_guard lock(pool_mutex);
            if (!idle.empty()) {
                const auto s = idle.back();
                idle.pop_back();
                return s;
            }
        }
        return open_session();
    }

    void release(ck_session_handle_t s)
    {
        std::lock_guard lock(pool_mutex);
        idle.push_back(s);
    }

    // Closes every idle session (after one was found lost).
    void drain_idle(ck_rv_t why)
    {
        std::vector<ck_session_handle_t> drained;
        {
            std::lock_guard lock(pool_mutex);
            drained.swap(idle);
        }
        for (const auto s : drained)
            discard(s, why);
    }

    void discard(ck_session_handle_t s, ck_rv_t why)
    {
        (*module)->C_CloseSession(s);
        std::lock_guard lock(pool_mutex);
        --open_sessions;
        if (why == CKR_USER_NOT_LOGGED_IN || open_sessions == 0)
            logged_in = false;
    }

    // Runs `op(session)` on a pooled session. A lost session is replaced and
    // the operation retried once.
    template <class Op>
    Result<ck_rv_t> with_session(Op&& op)
    {
        std::shared_lock inside(module_mutex);
        return with_session_held(op);
    }

    // REQUIRES: module_mutex held (shared).
    template <class Op>
    Result<ck_rv_t> with_session_held(Op&& op)
    {
        ck_rv_t rv = CKR_OK;
        // A lost session seldom goes alone (C_CloseAllSessions by libp11 on
        // the same module, a token that went away, a logout): the idle ones
        // go with it, and the third try runs on a freshly logged-in session.
        for (int attempt = 0; attempt < 3; ++attempt) {
            auto s = acquire();
            if (!s)
                return tl::unexpected(s.error());
            rv = op(*s);
            if (!session_lost(rv)) {
                release(*s);
                return rv;
            }
            discard(*s, rv);
            drain_idle(rv);
        }
        return rv;
    }

    Result<ck_object_handle_t> find_object(ck_object_class_t cls, const KeyId& id)
    {
        std::shared_lock inside(module_mutex);
        return find_object_held(cls, id);
    }

    // REQUIRES: module_mutex held (shared), so that no reconnect() can come
    // between finding a handle, caching it and using it: handle numbers from
    // before a reinitialisation may name another key after it.
    Result<ck_object_handle_t> find_object_held(ck_object_class_t cls, const KeyId& id)
    {
        const std::string cache_key = std::to_string(cls) + ":" + id.hex;
        {
            std::lock_guard lock(handles_mutex);
            // Another service on this module may have reinitialised it.
            if (const auto g = module->generation.load(); g != handles_generation) {
                handles.clear();
                handles_generation = g;
            }
            if (const auto it = handles.find(cache_key); it != handles.end())
                return it->second;
        }
        const auto raw = from_hex(id.hex);
        if (!raw || raw->empty())
            return fail(Errc::invalid_argument, "malformed key id '" + id.hex + "'");
        ck_object_handle_t found = 0;
        unsigned long count = 0;
        auto rv = with_session_held([&](ck_session_handle_t s) {
            ck_attribute tmpl[] = {attr(CKA_CLASS, &cls, sizeof cls), attr(CKA_ID, raw->data(), raw->size())};
            ck_rv_t r = (*module)->C_FindObjectsInit(s, tmpl, 2);
            if (r != CKR_OK)
                return r;
            r = (*module)->C_FindObjects(s, &found, 1, &count);
            (*module)->C_FindObjectsFinal(s);
            return r;
        });
        if (auto ok = call_ok(rv, "C_FindObjects"); !ok)
            return tl::unexpected(ok.error());
        if (count == 0)
            return fail(Errc::key_not_found, "no key with id " + id.hex + " in token '" + label + "'");
        std::lock_guard lock(handles_mutex);
        handles[cache_key] = found;
        return found;
    }

    void forget_object(ck_object_class_t cls, const KeyId& id)
    {
        std::lock_guard lock(handles_mutex);
        handles.erase(std::to_string(cls) + ":" + id.hex);
    }

    // Runs `op(session, handle)` against a key; a stale cached handle is
    // looked up again once.
    template <class Op>
    Result<ck_rv_t> with_key(ck_object_class_t cls, const KeyId& id, Op&& op)
    {
        auto rv = with_key_once(cls, id, op);
        // A key that is missing or a token that fails may mean the token
        // went away and came back: reconnect (rate-limited) and try once more.
        const bool token_trouble =
            (!rv && (rv.error().code == Errc::key_not_found || rv.error().code == Errc::device_error)) ||
            (rv && (*rv == CKR_DEVICE_ERROR || *rv == CKR_DEVICE_REMOVED || *rv == CKR_TOKEN_NOT_PRESENT ||
                    *rv == CKR_CRYPTOKI_NOT_INITIALIZED));
        if (token_trouble && reconnect())
            return with_key_once(cls, id, op);
        return rv;
    }

    template <class Op>
    Result<ck_rv_t> with_key_once(ck_object_class_t cls, const KeyId& id, Op& op)
    {
        std::shared_lock inside(module_mutex);
        for (int attempt = 0; attempt < 2; ++attempt) {
            auto h = find_object_held(cls, id);
            if (!h)
                return tl::unexpected(h.error());
            auto rv = with_session_held([&](ck_session_handle_t s) { return op(s, *h); });
            if (!rv || !handle_stale(*rv))
                return rv;
            forget_object(cls, id);
        }
        return fail(Errc::key_not_found, "key " + id.hex + " vanished from token '" + label + "'");
    }

    // Removes the object of class `cls` with this id; one already gone is
    // fine (and asks for no reconnect: a removal expects absence).
    Result<void> destroy_object(ck_object_class_t cls, const KeyId& id)
    {
        auto destroy = [&](ck_session_handle_t s, ck_object_handle_t h) { return (*module)->C_DestroyObject(s, h); };
        auto rv = with_key_once(cls, id, destroy);
        if (!rv && rv.error().code == Errc::key_not_found)
            return {};
        if (auto ok = call_ok(rv, "removing key " + id.hex); !ok)
            return ok;
        forget_object(cls, id);
        return {};
    }

    // Whether any object in the token, of any class, has this CKA_ID.
    Result<bool> id_in_use(const KeyId& id)
    {
        const auto raw = from_hex(id.hex);
        if (!raw || raw->empty())
            return fail(Errc::invalid_argument, "malformed key id '" + id.hex + "'");
        unsigned long count = 0;
        ck_object_handle_t found = 0;
        auto rv = with_session([&](ck_session_handle_t s) {
            ck_attribute tmpl[] = {attr(CKA_ID, raw->data(), raw->size())};
            ck_rv_t r = (*module)->C_FindObjectsInit(s, tmpl, 1);
            if (r != CKR_OK)
                return r;
            r = (*module)->C_FindObjects(s, &found, 1, &count);
            (*module)->C_FindObjectsFinal(s);
            return r;
        });
        if (auto ok = call_ok(rv, "C_FindObjects"); !ok)
            return tl::unexpected(ok.error());
        return count > 0;
    }

    // A random CKA_ID that no object in the token has yet, nor the MAC key
    // id made from it: an adopted token holds its owner's objects too, and
    // vaultfs never takes one of them for its own.
    Result<Bytes> new_key_id()
    {
        for (int attempt = 0; attempt < 4; ++attempt) {
            Bytes id(key_id_size);
            if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1)
                return fail(Errc::device_error, "RAND_bytes failed");
            bool free = true;
            for (const KeyId& k : {KeyId{to_hex(id)}, mac_key_of(KeyId{to_hex(id)})}) {
                auto taken = id_in_use(k);
                if (!taken)
                    return tl::unexpected(taken.error());
                free = free && !*taken;
            }
            if (free)
                return id;
        }
        return fail(Errc::device_error, "token '" + label + "' holds an object with every fresh id tried");
    }

    // Reads the token's description and mechanism list.
    Result<void> read_profile()
    {
        ck_token_info info{};
        if (const ck_rv_t rv = (*module)->C_GetTokenInfo(slot, &info); rv != CKR_OK)
            return fail(Errc::device_error, "C_GetTokenInfo on token '" + label + "' failed: " + rv_name(rv));
        profile.label = label;
        profile.manufacturer = trimmed_label(info.manufacturer_id);
        profile.model = trimmed_text(info.model, sizeof info.model);
        unsigned long count = 0;
        if (const ck_rv_t rv = (*module)->C_GetMechanismList(slot, nullptr, &count); rv != CKR_OK)
            return fail(Errc::device_error, "C_GetMechanismList on token '" + label + "' failed: " + rv_name(rv));
        std::vector<ck_mechanism_type_t> list(count);
        if (const ck_rv_t rv = (*module)->C_GetMechanismList(slot, list.data(), &count); rv != CKR_OK)
            return fail(Errc::device_error, "C_GetMechanismList on token '" + label + "' failed: " + rv_name(rv));
        list.resize(count);
        for (const auto m : list) {
            ck_mechanism_info mi{};
            if ((*module)->C_GetMechanismInfo(slot, m, &mi) == CKR_OK)
                profile.mechanisms[m] = TokenProfile::Mechanism{mi.min_key_size, mi.max_key_size, mi.flags};
        }
        return {};
    }
};

Pkcs11KeyService::Pkcs11KeyService(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pkcs11KeyService::~Pkcs11KeyService() = default;

Result<std::unique_ptr<Pkcs11KeyService>> Pkcs11KeyService::open(Pkcs11Config config)
{
    auto module = Module::load(config.module_path, config.environment);
    if (!module)
        return tl::unexpected(module.error());
    auto slot = (*module)->find_token(config.token_label);
    if (!slot)
        return tl::unexpected(slot.error());

    auto impl = std::make_unique<Impl>();
    impl->module = std::move(*module);
    impl->slot = *slot;
    impl->module_path = config.module_path;
    impl->label = config.token_label;
    impl->pin = std::move(config.pin);
    // Log in now, so that a wrong PIN stops start-up rather than a request.
    auto first = impl->open_session();
    if (!first)
        return tl::unexpected(first.error());
    impl->release(*first);
    if (auto r = impl->read_profile(); !r)
        return tl::unexpected(r.error());
    if (config.schemes) {
        if (auto r = check_schemes(impl->profile, *config.schemes); !r)
            return tl::unexpected(r.error());
        impl->schemes = *config.schemes;
    } else {
        auto chosen = negotiate(impl->profile);
        if (!chosen)
            return tl::unexpected(chosen.error());
        impl->schemes = chosen->schemes;
        impl->notes = std::move(chosen->notes);
    }
    return std::unique_ptr<Pkcs11KeyService>(new Pkcs11KeyService(std::move(impl)));
}

namespace {

// An AES-256 or generic-secret token key, sensitive, with exactly the
// usages given (SoftHSM defaults every usage flag to true). `wrappable`: it
// may leave the token wrapped (an AES-GCM KEK, for another host), never in
// the clear.
Result<void> generate_secret_key(Pkcs11KeyService::Impl& impl, ck_mechanism_type_t mechanism, ck_key_type_t type,
                                 const std::string& label, const Bytes& id, bool encrypt, bool sign, bool wrappable);

}  // namespace

Result<KeyId> Pkcs11KeyService::create_kek(const std::string& label)
{
    auto id = impl_->new_key_id();
    if (!id)
        return tl::unexpected(id.error());
    const KeyId kek{to_hex(*id)};
    if (auto r = create_kek_with_id(label, kek); !r)
        return tl::unexpected(r.error());
    return kek;
}

Result<void> Pkcs11KeyService::create_kek_with_id(const std::string& label, const KeyId& kek)
{
    auto id = from_hex(kek.hex);
    if (!id || id->size() != key_id_size)
        return fail(Errc::invalid_argument, "malformed KEK id '" + kek.hex + "'");
    std::vector<KeyId> wanted{kek};
    if (impl_->schemes.seal == SealScheme::aes_cbc_hmac)
        wanted.push_back(mac_key_of(kek));
    for (const KeyId& want : wanted) {
        auto taken = impl_->id_in_use(want);
        if (!taken)
            return tl::unexpected(taken.error());
        if (*taken)
            return fail(Errc::device_error,
                        impl_->profile.name() + " already holds an object with id " + want.hex +
                            " (this state's own keys, left from before a migration?); vaultfs will not share it — "
                            "remove it first (pkcs11-tool --delete-object --id " + want.hex + ") or use another token");
    }
    // An AES-GCM KEK can be wrapped for another host (wrap_kek); a CBC+HMAC
    // pair cannot be moved, so neither half leaves the token at all.
    const bool wrappable = impl_->schemes.seal == SealScheme::aes_gcm;
    if (auto r = generate_secret_key(*impl_, CKM_AES_KEY_GEN, CKK_AES, label, *id, true, false, wrappable); !r)
        return r;
    if (impl_->schemes.seal == SealScheme::aes_cbc_hmac) {
        auto mac = from_hex(mac_key_of(kek).hex);
        if (auto r = generate_secret_key(*impl_, CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, label + " (mac)", *mac,
                                         false, true, false);
            !r) {
            static_cast<void>(destroy_kek(kek));
            return r;
        }
    }
    return {};
}

Result<void> Pkcs11KeyService::destroy_kek(const KeyId& kek)
{
    std::vector<KeyId> ids{kek};
    if (impl_->schemes.seal == SealScheme::aes_cbc_hmac)
        ids.push_back(mac_key_of(kek));
    for (const KeyId& id : ids)
        if (auto r = impl_->destroy_object(CKO_SECRET_KEY, id); !r)
            return r;
    return {};
}

namespace {

Result<void> generate_secret_key(Pkcs11KeyService::Impl& impl, ck_mechanism_type_t mechanism, ck_key_type_t type,
                                 const std::string& label, const Bytes& id, bool encrypt, bool sign, bool wrappable)
{
    const ck_object_class_t cls = CKO_SECRET_KEY;
    const unsigned long len = 32;
    ck_attribute tmpl[] = {
        attr(CKA_CLASS, &cls, sizeof cls),
        attr(CKA_KEY_TYPE, &type, sizeof type),
        attr(CKA_VALUE_LEN, &len, sizeof len),
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id.data(), id.size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, true),
        flag(CKA_SENSITIVE, true),
        flag(CKA_EXTRACTABLE, wrappable),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_ENCRYPT, encrypt),
        flag(CKA_DECRYPT, encrypt),
        flag(CKA_WRAP, false),
        flag(CKA_UNWRAP, false),
        flag(CKA_SIGN, sign),
        flag(CKA_VERIFY, sign),
        flag(CKA_DERIVE, false),
    };
    ck_object_handle_t key = 0;
    auto rv = impl.with_session([&](ck_session_handle_t s) {
        ck_mechanism mech{mechanism, nullptr, 0};
        return (*impl.module)->C_GenerateKey(s, &mech, tmpl, std::size(tmpl), &key);
    });
    return call_ok(rv, "C_GenerateKey (" + mechanism_name(mechanism) + ") in " + impl.profile.name());
}

// What the MAC of an aes-cbc-pad+hmac-sha256 blob covers (mechanisms.hpp).
Bytes mac_input(std::span<const std::uint8_t> aad, std::span<const std::uint8_t> iv_and_ct)
{
    Bytes in(cbc_hmac_context.begin(), cbc_hmac_context.end());
    const std::uint64_t n = aad.size();
    for (int shift = 56; shift >= 0; shift -= 8)
        in.push_back(static_cast<std::uint8_t>(n >> shift));
    in.insert(in.end(), aad.begin(), aad.end());
    in.insert(in.end(), iv_and_ct.begin(), iv_and_ct.end());
    return in;
}

}  // namespace

Result<void> Pkcs11KeyService::find_key(const KeyId& id)
{
    auto secret = impl_->find_object(CKO_SECRET_KEY, id);
    if (secret) {
        if (impl_->schemes.seal == SealScheme::aes_cbc_hmac)
            if (auto mac = impl_->find_object(CKO_SECRET_KEY, mac_key_of(id)); !mac)
                return fail(mac.error().code, "KEK " + id.hex + " has no MAC key beside it in " + impl_->profile.name() +
                                                  " (token_seal = aes-cbc-pad+hmac-sha256)");
        return {};
    }
    if (secret.error().code != Errc::key_not_found)
        return tl::unexpected(secret.error());
    auto priv = impl_->find_object(CKO_PRIVATE_KEY, id);
    if (!priv)
        return tl::unexpected(priv.error());
    return {};
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::seal(const KeyId& kek, const SecureBuffer& dek,
                                                         std::span<const std::uint8_t> aad)
{
    OpStats::Timer timer(impl_->op_stats, TokenOp::seal);
    if (dek.size() != dek_size)
        return fail(Errc::invalid_argument, "a DEK must be 32 bytes");
    if (impl_->schemes.seal == SealScheme::aes_cbc_hmac)
        return seal_cbc_hmac(kek, dek, aad);
    Bytes blob(gcm_iv_size + dek_size + gcm_tag_size);
    if (RAND_bytes(blob.data(), gcm_iv_size) != 1)
        return fail(Errc::device_error, "RAND_bytes failed");
    auto rv = impl_->with_key(CKO_SECRET_KEY, kek, [&](ck_session_handle_t s, ck_object_handle_t key) {
        ck_gcm_params params{blob.data(), gcm_iv_size, gcm_iv_size * 8, const_cast<std::uint8_t*>(aad.data()),
                             aad.size(), gcm_tag_size * 8};
        ck_mechanism mech{CKM_AES_GCM, &params, sizeof params};
        ck_rv_t r = (*impl_->module)->C_EncryptInit(s, &mech, key);
        if (r != CKR_OK)
            return r;
        unsigned long out_len = blob.size() - gcm_iv_size;
        r = (*impl_->module)->C_Encrypt(s, const_cast<std::uint8_t*>(dek.data()), dek.size(),
                                        blob.data() + gcm_iv_size, &out_len);
        if (r == CKR_OK && out_len != dek_size + gcm_tag_size)
            r = CKR_GENERAL_ERROR;
        return r;
    });
    if (auto ok = call_ok(rv, "sealing a DEK with key " + kek.hex); !ok)
        return tl::unexpected(ok.error());
    return blob;
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::seal_cbc_hmac(const KeyId& kek, const SecureBuffer& dek,
                                                                  std::span<const std::uint8_t> aad)
{
    Bytes blob(cbc_iv_size + cbc_ct_size + hmac_size);
    if (RAND_bytes(blob.data(), cbc_iv_size) != 1)
        return fail(Errc::device_error, "RAND_bytes failed");
    auto rv = impl_->with_key(CKO_SECRET_KEY, kek, [&](ck_session_handle_t s, ck_object_handle_t key) {
        ck_mechanism mech{CKM_AES_CBC_PAD, blob.data(), cbc_iv_size};
        ck_rv_t r = (*impl_->module)->C_EncryptInit(s, &mech, key);
        if (r != CKR_OK)
            return r;
        unsigned long out_len = cbc_ct_size;
        r = (*impl_->module)->C_Encrypt(s, const_cast<std::uint8_t*>(dek.data()), dek.size(), blob.data() + cbc_iv_size,
                                        &out_len);
        if (r == CKR_OK && out_len != cbc_ct_size)
            r = CKR_GENERAL_ERROR;
        return r;
    });
    if (auto ok = call_ok(rv, "sealing a DEK with key " + kek.hex); !ok)
        return tl::unexpected(ok.error());
    Bytes in = mac_input(aad, std::span(blob.data(), cbc_iv_size + cbc_ct_size));
    rv = impl_->with_key(CKO_SECRET_KEY, mac_key_of(kek), [&](ck_session_handle_t s, ck_object_handle_t key) {
        ck_mechanism mech{CKM_SHA256_HMAC, nullptr, 0};
        ck_rv_t r = (*impl_->module)->C_SignInit(s, &mech, key);
        if (r != CKR_OK)
            return r;
        unsigned long len = hmac_size;
        r = (*impl_->module)->C_Sign(s, in.data(), in.size(), blob.data() + cbc_iv_size + cbc_ct_size, &len);
        if (r == CKR_OK && len != hmac_size)
            r = CKR_GENERAL_ERROR;
        return r;
    });
    if (auto ok = call_ok(rv, "authenticating a sealed DEK with key " + mac_key_of(kek).hex); !ok)
        return tl::unexpected(ok.error());
    return blob;
}

Result<SecureBuffer> Pkcs11KeyService::unseal(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                              std::span<const std::uint8_t> aad)
{
    OpStats::Timer timer(impl_->op_stats, TokenOp::unseal);
    if (impl_->schemes.seal == SealScheme::aes_cbc_hmac)
        return unseal_cbc_hmac(kek, sealed, aad);
    if (sealed.size() != gcm_iv_size + dek_size + gcm_tag_size)
        return fail(Errc::authentication_failed, "sealed DEK has the wrong length");
    auto out = SecureBuffer::allocate(dek_size + gcm_tag_size);
    if (!out)
        return tl::unexpected(out.error());
    unsigned long out_len = 0;
    auto rv = impl_->with_key(CKO_SECRET_KEY, kek, [&](ck_session_handle_t s, ck_object_handle_t key) {
        ck_gcm_params params{const_cast<std::uint8_t*>(sealed.data()), gcm_iv_size, gcm_iv_size * 8,
                             const_cast<std::uint8_t*>(aad.data()), aad.size(), gcm_tag_size * 8};
        ck_mechanism mech{CKM_AES_GCM, &params, sizeof params};
        ck_rv_t r = (*impl_->module)->C_DecryptInit(s, &mech, key);
        if (r != CKR_OK)
            return r;
        out_len = out->size();
        return (*impl_->module)->C_Decrypt(s, const_cast<std::uint8_t*>(sealed.data() + gcm_iv_size),
                                           sealed.size() - gcm_iv_size, out->data(), &out_len);
    });
    if (!rv)
        return tl::unexpected(rv.error());
    switch (*rv) {
    case CKR_OK:
        if (out_len != dek_size)
            return fail(Errc::authentication_failed, "unsealed DEK has the wrong length");
        if (auto r = out->resize(dek_size); !r)
            return tl::unexpected(r.error());
        return std::move(*out);
    // A bad tag: CKR_ENCRYPTED_DATA_INVALID by the standard. SoftHSM 2.6.1
    // answers CKR_GENERAL_ERROR, so that reads as a bad tag only on SoftHSM;
    // elsewhere it is the device failing.
    case CKR_GENERAL_ERROR:
        if (impl_->profile.manufacturer != "SoftHSM project")
            return fail(Errc::device_error, "unsealing a DEK with key " + kek.hex + " failed in " +
                                                impl_->profile.name() + ": CKR_GENERAL_ERROR");
        [[fallthrough]];
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
        return fail(Errc::authentication_failed,
                    "sealed DEK failed authentication under key " + kek.hex + " (" + rv_name(*rv) + ")");
    default:
        return fail(Errc::device_error, "unsealing a DEK with key " + kek.hex + " failed: " + rv_name(*rv));
    }
}

Result<SecureBuffer> Pkcs11KeyService::unseal_cbc_hmac(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                                       std::span<const std::uint8_t> aad)
{
    if (sealed.size() != cbc_iv_size + cbc_ct_size + hmac_size)
        return fail(Errc::authentication_failed, "sealed DEK has the wrong length");
    // The MAC first: nothing is decrypted until the token has checked it.
    Bytes in = mac_input(aad, sealed.first(cbc_iv_size + cbc_ct_size));
    auto rv = impl_->with_key(CKO_SECRET_KEY, mac_key_of(kek), [&](ck_session_handle_t s, ck_object_handle_t key) {
        ck_mechanism mech{CKM_SHA256_HMAC, nullptr, 0};
        ck_rv_t r = (*impl_->module)->C_VerifyInit(s, &mech, key);
        if (r != CKR_OK)
            return r;
        return (*impl_->module)->C_Verify(s, in.data(), in.size(),
                                          const_cast<std::uint8_t*>(sealed.data() + cbc_iv_size + cbc_ct_size),
                                          hmac_size);
    });
    if (!rv)
        return tl::unexpected(rv.error());
    if (*rv == CKR_SIGNATURE_INVALID || *rv == CKR_SIGNATURE_LEN_RANGE)
        return fail(Errc::authentication_failed,
                    "sealed DEK failed authentication under key " + kek.hex + " (" + rv_name(*rv) + ")");
    if (*rv != CKR_OK)
        return fail(Errc::device_error, "checking a sealed DEK with key " + mac_key_of(kek).hex + " failed: " +
                                            rv_name(*rv));
    auto out = SecureBuffer::allocate(cbc_ct_size);
    if (!out)
        return tl::unexpected(out.error());
    unsigned long out_len = 0;
    rv = impl_->with_key(CKO_SECRET_KEY, kek, [&](ck_session_handle_t s, ck_object_handle_t key) {
        ck_mechanism mech{CKM_AES_CBC_PAD, const_cast<std::uint8_t*>(sealed.data()), cbc_iv_size};
        ck_rv_t r = (*impl_->module)->C_DecryptInit(s, &mech, key);
        if (r != CKR_OK)
            return r;
        out_len = out->size();
        return (*impl_->module)->C_Decrypt(s, const_cast<std::uint8_t*>(sealed.data() + cbc_iv_size), cbc_ct_size,
                                           out->data(), &out_len);
    });
    if (auto ok = call_ok(rv, "unsealing a DEK with key " + kek.hex); !ok)
        return tl::unexpected(ok.error());
    if (out_len != dek_size)
        return fail(Errc::authentication_failed, "unsealed DEK has the wrong length");
    if (auto r = out->resize(dek_size); !r)
        return tl::unexpected(r.error());
    return std::move(*out);
}

Result<KeyId> Pkcs11KeyService::create_signing_key(const std::string& label)
{
    const bool ec = impl_->schemes.signature == SignatureScheme::ecdsa_p256;
    return generate_key_pair(ec ? KeyType::ec_p256 : KeyType::rsa_3072, label, KeyUsage{.sign = true});
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::sign_digest(const KeyId& key,
                                                                std::span<const std::uint8_t, 32> digest)
{
    if (impl_->schemes.signature == SignatureScheme::rsa_pss_sha256)
        return sign(key, Mechanism{Mechanism::Kind::rsa_pss, Digest::sha256}, digest);  // timed there
    OpStats::Timer timer(impl_->op_stats, TokenOp::sign);
    Bytes sig(64);
    auto rv = impl_->with_key(CKO_PRIVATE_KEY, key, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_mechanism mech{CKM_ECDSA, nullptr, 0};
        ck_rv_t r = (*impl_->module)->C_SignInit(s, &mech, h);
        if (r != CKR_OK)
            return r;
        unsigned long len = sig.size();
        r = (*impl_->module)->C_Sign(s, const_cast<std::uint8_t*>(digest.data()), digest.size(), sig.data(), &len);
        if (r == CKR_OK && len != sig.size())
            r = CKR_GENERAL_ERROR;
        return r;
    });
    if (auto ok = call_ok(rv, "signing with key " + key.hex); !ok)
        return tl::unexpected(ok.error());
    return sig;
}

Result<void> Pkcs11KeyService::ping()
{
    OpStats::Timer timer(impl_->op_stats, TokenOp::ping);
    const auto once = [&] {
        return impl_->with_session([&](ck_session_handle_t s) {
            ck_session_info info{};
            return (*impl_->module)->C_GetSessionInfo(s, &info);
        });
    };
    auto rv = once();
    if ((!rv || *rv != CKR_OK) && impl_->reconnect())
        rv = once();
    if (!rv)
        return tl::unexpected(rv.error());
    if (*rv != CKR_OK)
        return fail(Errc::device_error, "token '" + impl_->label + "' does not answer: " + rv_name(*rv));
    return {};
}

unsigned long Pkcs11KeyService::read_attribute_rv(const KeyId& id, unsigned long attribute_type)
{
    Bytes value(256);
    auto rv = impl_->with_key(CKO_SECRET_KEY, id, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_attribute a = attr(attribute_type, value.data(), value.size());
        return (*impl_->module)->C_GetAttributeValue(s, h, &a, 1);
    });
    OPENSSL_cleanse(value.data(), value.size());
    return rv ? *rv : CKR_GENERAL_ERROR;
}

Result<bool> Pkcs11KeyService::read_bool_attribute(const KeyId& id, unsigned long attribute_type)
{
    unsigned char value = 0;
    const auto read = [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_attribute a = attr(attribute_type, &value, 1);
        return (*impl_->module)->C_GetAttributeValue(s, h, &a, 1);
    };
    const bool secret = impl_->find_object(CKO_SECRET_KEY, id).has_value();
    auto rv = impl_->with_key(secret ? CKO_SECRET_KEY : CKO_PRIVATE_KEY, id, read);
    if (auto ok = call_ok(rv, "C_GetAttributeValue"); !ok)
        return tl::unexpected(ok.error());
    return value != 0;
}

// ---- application key pairs (KeyPairService) -------------------------------------

namespace {

struct Curve {
    KeyType type;
    std::vector<std::uint8_t> oid_der;
    const char* group;
    std::size_t field_bytes;
};

const std::vector<Curve>& curves()
{
    static const std::vector<Curve> all{
        {KeyType::ec_p256, {p256_oid_der.begin(), p256_oid_der.end()}, "prime256v1", 32},
        {KeyType::ec_p384, {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22}, "secp384r1", 48},
        {KeyType::ec_p521, {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23}, "secp521r1", 66},
    };
    return all;
}

// The DER DigestInfo prefix RSASSA-PKCS1-v1_5 puts before a digest.
Bytes digest_info_prefix(Digest d)
{
    switch (d) {
    case Digest::sha1:
        return {0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14};
    case Digest::sha256:
        return {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20};
    case Digest::sha384:
        return {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30};
    case Digest::sha512:
        return {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40};
    }
    return {};
}

ck_mechanism_type_t hash_mechanism(Digest d)
{
    switch (d) {
    case Digest::sha1:
        return CKM_SHA_1;
    case Digest::sha256:
        return CKM_SHA256;
    case Digest::sha384:
        return CKM_SHA384;
    case Digest::sha512:
        return CKM_SHA512;
    }
    return CKM_SHA256;
}

ck_rsa_pkcs_mgf_type_t mgf_of(Digest d)
{
    switch (d) {
    case Digest::sha1:
        return CKG_MGF1_SHA1;
    case Digest::sha256:
        return CKG_MGF1_SHA256;
    case Digest::sha384:
        return CKG_MGF1_SHA384;
    case Digest::sha512:
        return CKG_MGF1_SHA512;
    }
    return CKG_MGF1_SHA256;
}

struct PkeyFree {
    void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct PkeyCtxFree {
    void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
struct BldFree {
    void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); }
};
struct ParamFree {
    void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); }
};
struct BnFree {
    void operator()(BIGNUM* p) const { BN_free(p); }
};

// A public key from its parameters, as DER SubjectPublicKeyInfo.
Result<Bytes> spki_from(const char* type, OSSL_PARAM_BLD* bld)
{
    std::unique_ptr<OSSL_PARAM, ParamFree> params(OSSL_PARAM_BLD_to_param(bld));
    std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
    EVP_PKEY* raw = nullptr;
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1)
        return fail(Errc::device_error, std::string("the token's ") + type + " public key does not parse");
    std::unique_ptr<EVP_PKEY, PkeyFree> pkey(raw);
    const int len = i2d_PUBKEY(pkey.get(), nullptr);
    if (len <= 0)
        return fail(Errc::device_error, "cannot encode a public key");
    Bytes der(static_cast<std::size_t>(len));
    unsigned char* p = der.data();
    i2d_PUBKEY(pkey.get(), &p);
    return der;
}

// ECDSA r | s, as the token gives it, to the DER SEQUENCE OpenSSL reads.
Result<Bytes> ecdsa_der(const Bytes& raw)
{
    const std::size_t half = raw.size() / 2;
    ECDSA_SIG* sig = ECDSA_SIG_new();
    BIGNUM* r = BN_bin2bn(raw.data(), static_cast<int>(half), nullptr);
    BIGNUM* s = BN_bin2bn(raw.data() + half, static_cast<int>(half), nullptr);
    if (sig == nullptr || r == nullptr || s == nullptr || ECDSA_SIG_set0(sig, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(sig);
        return fail(Errc::device_error, "cannot encode an ECDSA signature");
    }
    const int len = i2d_ECDSA_SIG(sig, nullptr);
    Bytes der(static_cast<std::size_t>(std::max(len, 0)));
    unsigned char* p = der.data();
    i2d_ECDSA_SIG(sig, &p);
    ECDSA_SIG_free(sig);
    return der;
}

// C_DecryptInit and C_Decrypt of `data` with a private key into `out`
// (its size the room there is); `len` gets the length written.
Result<ck_rv_t> decrypt_with(Pkcs11KeyService::Impl& impl, const KeyId& key, ck_mechanism& mech,
                             std::span<const std::uint8_t> data, SecureBuffer& out, unsigned long& len)
{
    return impl.with_key(CKO_PRIVATE_KEY, key, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_rv_t r = (*impl.module)->C_DecryptInit(s, &mech, h);
        if (r != CKR_OK)
            return r;
        len = out.size();
        return (*impl.module)->C_Decrypt(s, const_cast<std::uint8_t*>(data.data()), data.size(), out.data(), &len);
    });
}

}  // namespace

std::optional<KeyType> key_type_from(std::string_view text)
{
    for (const KeyType t : {KeyType::rsa_2048, KeyType::rsa_3072, KeyType::rsa_4096, KeyType::ec_p256,
                            KeyType::ec_p384, KeyType::ec_p521})
        if (to_string(t) == text)
            return t;
    return std::nullopt;
}

std::string_view to_string(KeyType type)
{
    switch (type) {
    case KeyType::rsa_2048:
        return "rsa-2048";
    case KeyType::rsa_3072:
        return "rsa-3072";
    case KeyType::rsa_4096:
        return "rsa-4096";
    case KeyType::ec_p256:
        return "ec-p256";
    case KeyType::ec_p384:
        return "ec-p384";
    case KeyType::ec_p521:
        return "ec-p521";
    }
    return "?";
}

bool is_rsa(KeyType type) { return type == KeyType::rsa_2048 || type == KeyType::rsa_3072 || type == KeyType::rsa_4096; }

std::size_t digest_size(Digest d)
{
    switch (d) {
    case Digest::sha1:
        return 20;
    case Digest::sha256:
        return 32;
    case Digest::sha384:
        return 48;
    case Digest::sha512:
        return 64;
    }
    return 0;
}

Result<KeyId> Pkcs11KeyService::create_key_pair(KeyType type, const std::string& label, KeyUsage usage)
{
    if (auto r = check_key_pair(impl_->profile, type, usage); !r)
        return tl::unexpected(r.error());
    return generate_key_pair(type, label, usage);
}

Result<KeyId> Pkcs11KeyService::generate_key_pair(KeyType type, const std::string& label, KeyUsage usage)
{
    auto id = impl_->new_key_id();
    if (!id)
        return tl::unexpected(id.error());
    const bool rsa = is_rsa(type);
    const unsigned long bits = type == KeyType::rsa_2048 ? 2048 : type == KeyType::rsa_3072 ? 3072 : 4096;
    static const std::uint8_t f4[] = {0x01, 0x00, 0x01};
    const Curve* curve = nullptr;
    for (const auto& c : curves())
        if (c.type == type)
            curve = &c;
    std::vector<ck_attribute> pub{
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id->data(), id->size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, false),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_VERIFY, usage.sign),
        flag(CKA_ENCRYPT, rsa && usage.decrypt),
        flag(CKA_WRAP, rsa && usage.unwrap),
    };
    if (rsa) {
        pub.push_back(attr(CKA_MODULUS_BITS, &bits, sizeof bits));
        pub.push_back(attr(CKA_PUBLIC_EXPONENT, f4, sizeof f4));
    } else {
        pub.push_back(attr(CKA_EC_PARAMS, curve->oid_der.data(), curve->oid_der.size()));
        pub.push_back(flag(CKA_DERIVE, false));
    }
    ck_attribute priv[] = {
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id->data(), id->size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, true),
        flag(CKA_SENSITIVE, true),
        flag(CKA_EXTRACTABLE, false),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_SIGN, usage.sign),
        flag(CKA_SIGN_RECOVER, false),
        flag(CKA_DECRYPT, rsa && usage.decrypt),
        flag(CKA_UNWRAP, rsa && usage.unwrap),
        flag(CKA_DERIVE, false),
    };
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        ck_mechanism mech{rsa ? CKM_RSA_PKCS_KEY_PAIR_GEN : CKM_EC_KEY_PAIR_GEN, nullptr, 0};
        ck_object_handle_t pub_h = 0;
        ck_object_handle_t priv_h = 0;
        return (*impl_->module)->C_GenerateKeyPair(s, &mech, pub.data(), pub.size(), priv, std::size(priv), &pub_h,
                                                   &priv_h);
    });
    if (auto ok = call_ok(rv, "C_GenerateKeyPair (" + std::string(to_string(type)) + ")"); !ok)
        return tl::unexpected(ok.error());
    return KeyId{to_hex(*id)};
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::public_key_der(const KeyId& key)
{
    ck_key_type_t type = 0;
    Bytes a(1024), b(1024);
    unsigned long a_len = 0, b_len = 0;
    auto rv = impl_->with_key(CKO_PUBLIC_KEY, key, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_attribute t = attr(CKA_KEY_TYPE, &type, sizeof type);
        ck_rv_t r = (*impl_->module)->C_GetAttributeValue(s, h, &t, 1);
        if (r != CKR_OK)
            return r;
        ck_attribute both[2];
        if (type == CKK_RSA) {
            both[0] = attr(CKA_MODULUS, a.data(), a.size());
            both[1] = attr(CKA_PUBLIC_EXPONENT, b.data(), b.size());
        } else {
            both[0] = attr(CKA_EC_PARAMS, a.data(), a.size());
            both[1] = attr(CKA_EC_POINT, b.data(), b.size());
        }
        r = (*impl_->module)->C_GetAttributeValue(s, h, both, 2);
        a_len = both[0].value_len;
        b_len = both[1].value_len;
        return r;
    });
    if (auto ok = call_ok(rv, "reading the public key " + key.hex); !ok)
        return tl::unexpected(ok.error());
    a.resize(a_len);
    b.resize(b_len);
    std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
    if (type == CKK_RSA) {
        std::unique_ptr<BIGNUM, BnFree> n(BN_bin2bn(a.data(), static_cast<int>(a.size()), nullptr));
        std::unique_ptr<BIGNUM, BnFree> e(BN_bin2bn(b.data(), static_cast<int>(b.size()), nullptr));
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get());
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get());
        return spki_from("RSA", bld.get());
    }
    const Curve* curve = nullptr;
    for (const auto& c : curves())
        if (c.oid_der == a)
            curve = &c;
    if (curve == nullptr)
        return fail(Errc::device_error, "key " + key.hex + " is on a curve vaultfs does not know");
    // CKA_EC_POINT is a DER OCTET STRING around the point.
    Bytes point = b;
    if (b.size() > 2 && b[0] == 0x04) {
        std::size_t header = 2;
        if (b[1] == 0x81)
            header = 3;
        else if (b[1] == 0x82)
            header = 4;
        if (header < b.size() && b[header] == 0x04)
            point.assign(b.begin() + static_cast<std::ptrdiff_t>(header), b.end());
    }
    OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, curve->group, 0);
    OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
    return spki_from("EC", bld.get());
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::sign(const KeyId& key, Mechanism m,
                                                         std::span<const std::uint8_t> digest)
{
    OpStats::Timer timer(impl_->op_stats, TokenOp::sign);
    if (digest.size() != digest_size(m.digest))
        return fail(Errc::invalid_argument, "a " + std::to_string(digest_size(m.digest) * 8) +
                                                "-bit digest is " + std::to_string(digest_size(m.digest)) +
                                                " bytes, not " + std::to_string(digest.size()));
    Bytes input;
    ck_mechanism mech{};
    ck_rsa_pkcs_pss_params pss{hash_mechanism(m.digest), mgf_of(m.digest), digest_size(m.digest)};
    switch (m.kind) {
    case Mechanism::Kind::rsa_pkcs1_sign:
        input = digest_info_prefix(m.digest);
        mech = ck_mechanism{CKM_RSA_PKCS, nullptr, 0};
        break;
    case Mechanism::Kind::rsa_pss:
        mech = ck_mechanism{CKM_RSA_PKCS_PSS, &pss, sizeof pss};
        break;
    case Mechanism::Kind::ecdsa:
        mech = ck_mechanism{CKM_ECDSA, nullptr, 0};
        break;
    default:
        return fail(Errc::invalid_argument, "not a signing mechanism");
    }
    input.insert(input.end(), digest.begin(), digest.end());
    Bytes sig(1024);
    auto rv = impl_->with_key(CKO_PRIVATE_KEY, key, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_rv_t r = (*impl_->module)->C_SignInit(s, &mech, h);
        if (r != CKR_OK)
            return r;
        unsigned long len = sig.size();
        r = (*impl_->module)->C_Sign(s, input.data(), input.size(), sig.data(), &len);
        if (r == CKR_OK)
            sig.resize(len);
        return r;
    });
    if (rv && (*rv == CKR_KEY_FUNCTION_NOT_PERMITTED || *rv == CKR_KEY_TYPE_INCONSISTENT))
        return fail(Errc::not_permitted, "key " + key.hex + " may not sign that way (" + rv_name(*rv) + ")");
    if (auto ok = call_ok(rv, "signing with key " + key.hex); !ok)
        return tl::unexpected(ok.error());
    if (m.kind == Mechanism::Kind::ecdsa)
        return ecdsa_der(sig);
    return sig;
}

Result<SecureBuffer> Pkcs11KeyService::decrypt(const KeyId& key, Mechanism m, std::span<const std::uint8_t> data)
{
    OpStats::Timer timer(impl_->op_stats, TokenOp::decrypt);
    ck_mechanism mech{};
    ck_rsa_pkcs_oaep_params oaep{hash_mechanism(m.digest), mgf_of(m.digest), CKZ_DATA_SPECIFIED, nullptr, 0};
    if (m.kind == Mechanism::Kind::rsa_oaep)
        mech = ck_mechanism{CKM_RSA_PKCS_OAEP, &oaep, sizeof oaep};
    else if (m.kind == Mechanism::Kind::rsa_pkcs1_decrypt)
        mech = ck_mechanism{CKM_RSA_PKCS, nullptr, 0};
    else
        return fail(Errc::invalid_argument, "not a decryption mechanism");
    auto out = SecureBuffer::allocate(std::max<std::size_t>(data.size(), 16));
    if (!out)
        return tl::unexpected(out.error());
    unsigned long len = 0;
    auto rv = decrypt_with(*impl_, key, mech, data, *out, len);
    if (!rv)
        return tl::unexpected(rv.error());
    if (m.kind == Mechanism::Kind::rsa_oaep && m.digest != Digest::sha1 &&
        (*rv == CKR_ARGUMENTS_BAD || *rv == CKR_MECHANISM_PARAM_INVALID))
        return oaep_on_host(key, m.digest, data);
    switch (*rv) {
    case CKR_OK:
        if (auto r = out->resize(len); !r)
            return tl::unexpected(r.error());
        return std::move(*out);
    case CKR_KEY_FUNCTION_NOT_PERMITTED:
    case CKR_KEY_TYPE_INCONSISTENT:
        return fail(Errc::not_permitted, "key " + key.hex + " may not decrypt (" + rv_name(*rv) + ")");
    case CKR_MECHANISM_INVALID:
    case CKR_MECHANISM_PARAM_INVALID:
        return fail(Errc::invalid_argument, "the token does not offer that decryption (" + rv_name(*rv) + ")");
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_GENERAL_ERROR:
    case CKR_FUNCTION_FAILED:
        return fail(Errc::authentication_failed, "the ciphertext does not decrypt under key " + key.hex + " (" +
                                                     rv_name(*rv) + ")");
    default:
        return fail(Errc::device_error, "decrypting with key " + key.hex + " failed: " + rv_name(*rv));
    }
}

// OAEP with SHA-2 where the token offers OAEP with SHA-1 only (SoftHSM 2.6.1
// answers CKR_ARGUMENTS_BAD): the token does the private-key operation (raw
// RSA, CKM_RSA_X_509) and only the padding is removed here, in locked
// memory, by OpenSSL's constant-time OAEP check. The key never leaves the
// token either way.
Result<SecureBuffer> Pkcs11KeyService::oaep_on_host(const KeyId& key, Digest digest, std::span<const std::uint8_t> data)
{
    auto block = SecureBuffer::allocate(std::max<std::size_t>(data.size(), 16));
    if (!block)
        return tl::unexpected(block.error());
    unsigned long len = 0;
    ck_mechanism mech{CKM_RSA_X_509, nullptr, 0};
    auto rv = decrypt_with(*impl_, key, mech, data, *block, len);
    if (!rv)
        return tl::unexpected(rv.error());
    if (*rv != CKR_OK)
        return fail(*rv == CKR_ENCRYPTED_DATA_INVALID || *rv == CKR_ENCRYPTED_DATA_LEN_RANGE
                        ? Errc::authentication_failed
                        : Errc::device_error,
                    "decrypting with key " + key.hex + " failed: " + rv_name(*rv));
    const EVP_MD* md = digest == Digest::sha256 ? EVP_sha256() : digest == Digest::sha384 ? EVP_sha384() : EVP_sha512();
    auto out = SecureBuffer::allocate(len);
    if (!out)
        return tl::unexpected(out.error());
    // The only way to remove OAEP padding alone in OpenSSL 3 is this
    // function, deprecated with the low-level RSA API.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    const int n = RSA_padding_check_PKCS1_OAEP_mgf1(out->data(), static_cast<int>(out->size()), block->data(),
                                                    static_cast<int>(len), static_cast<int>(data.size()),
                                                    nullptr, 0, md, md);
#pragma GCC diagnostic pop
    if (n < 0)
        return fail(Errc::authentication_failed, "the ciphertext does not decrypt under key " + key.hex);
    if (auto r = out->resize(static_cast<std::size_t>(n)); !r)
        return tl::unexpected(r.error());
    return std::move(*out);
}

Result<void> Pkcs11KeyService::destroy_key_pair(const KeyId& key)
{
    for (const ck_object_class_t cls : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY})
        if (auto r = impl_->destroy_object(cls, key); !r)
            return r;
    return {};
}

std::uint64_t Pkcs11KeyService::connection_epoch() const { return impl_->epoch.load(); }
std::shared_lock<std::shared_mutex> Pkcs11KeyService::hold_module()
{
    return std::shared_lock<std::shared_mutex>(impl_->module_mutex);
}
const TokenProfile& Pkcs11KeyService::profile() const { return impl_->profile; }
const OpStats& Pkcs11KeyService::op_stats() const { return impl_->op_stats; }
const Schemes& Pkcs11KeyService::schemes() const { return impl_->schemes; }
const std::vector<std::string>& Pkcs11KeyService::negotiation_notes() const { return impl_->notes; }
const std::string& Pkcs11KeyService::module_path() const { return impl_->module_path; }
const std::string& Pkcs11KeyService::token_label() const { return impl_->label; }
const SecureBuffer& Pkcs11KeyService::pin() const { return impl_->pin; }


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

    auto padded = padded_label(label);
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

// ---- moving KEKs between hosts' tokens ------------------------------------------

Result<KeyId> Pkcs11KeyService::create_transport_key(const std::string& label)
{
    if (!impl_->profile.offers(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 3072) ||
        !impl_->profile.offers(CKM_RSA_PKCS_OAEP, CKF_UNWRAP) || !impl_->profile.offers(CKM_AES_KEY_WRAP_PAD, CKF_UNWRAP))
        return fail(Errc::mechanism_unsupported,
                    impl_->profile.name() + " cannot receive KEKs from other hosts: it needs CKM_RSA_PKCS_KEY_PAIR_GEN, "
                                            "CKM_RSA_PKCS_OAEP and CKM_AES_KEY_WRAP_PAD");
    return generate_key_pair(KeyType::rsa_3072, label, KeyUsage{.unwrap = true});
}

namespace {

// RSA-OAEP as SoftHSM2 2.6 takes it for C_WrapKey/C_UnwrapKey (SHA-1 only;
// OAEP's security rests on the hash as a random oracle, not on its
// collision resistance).
ck_rsa_pkcs_oaep_params transfer_oaep{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};

}  // namespace

Result<Pkcs11KeyService::WrappedKek> Pkcs11KeyService::wrap_kek(const KeyId& kek,
                                                                std::span<const std::uint8_t> transport_public)
{
    if (impl_->schemes.seal != SealScheme::aes_gcm)
        return fail(Errc::mechanism_unsupported,
                    "this state's KEKs are aes-cbc-pad+hmac-sha256 pairs; moving them between hosts is built only for "
                    "aes-gcm KEKs");
    const unsigned char* p = transport_public.data();
    std::unique_ptr<EVP_PKEY, PkeyFree> pkey(d2i_PUBKEY(nullptr, &p, static_cast<long>(transport_public.size())));
    if (!pkey || EVP_PKEY_get_base_id(pkey.get()) != EVP_PKEY_RSA || EVP_PKEY_get_bits(pkey.get()) < 3072)
        return fail(Errc::invalid_argument, "a transport key is an RSA public key of at least 3072 bits");
    BIGNUM* n_raw = nullptr;
    BIGNUM* e_raw = nullptr;
    EVP_PKEY_get_bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_N, &n_raw);
    EVP_PKEY_get_bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_E, &e_raw);
    std::unique_ptr<BIGNUM, BnFree> n(n_raw), e(e_raw);
    if (!n || !e)
        return fail(Errc::invalid_argument, "the transport key has no modulus or exponent");
    Bytes modulus(static_cast<std::size_t>(BN_num_bytes(n.get()))), exponent(static_cast<std::size_t>(BN_num_bytes(e.get())));
    BN_bn2bin(n.get(), modulus.data());
    BN_bn2bin(e.get(), exponent.data());

    WrappedKek out;
    auto rv = impl_->with_key(CKO_SECRET_KEY, kek, [&](ck_session_handle_t s, ck_object_handle_t kek_h) {
        auto& f = *impl_->module;
        const ck_object_class_t pub_class = CKO_PUBLIC_KEY;
        const ck_key_type_t rsa = CKK_RSA;
        ck_attribute pub_tmpl[] = {
            attr(CKA_CLASS, &pub_class, sizeof pub_class),
            attr(CKA_KEY_TYPE, &rsa, sizeof rsa),
            flag(CKA_TOKEN, false),
            attr(CKA_MODULUS, modulus.data(), modulus.size()),
            attr(CKA_PUBLIC_EXPONENT, exponent.data(), exponent.size()),
            flag(CKA_WRAP, true),
            flag(CKA_ENCRYPT, false),
            flag(CKA_VERIFY, false),
        };
        ck_object_handle_t pub_h = 0;
        ck_rv_t r = f->C_CreateObject(s, pub_tmpl, std::size(pub_tmpl), &pub_h);
        if (r != CKR_OK)
            return r;
        const ck_object_class_t secret = CKO_SECRET_KEY;
        const ck_key_type_t aes = CKK_AES;
        const unsigned long len = 32;
        ck_attribute eph_tmpl[] = {
            attr(CKA_CLASS, &secret, sizeof secret),
            attr(CKA_KEY_TYPE, &aes, sizeof aes),
            attr(CKA_VALUE_LEN, &len, sizeof len),
            flag(CKA_TOKEN, false),
            flag(CKA_PRIVATE, true),
            flag(CKA_SENSITIVE, true),
            flag(CKA_EXTRACTABLE, true),
            flag(CKA_WRAP, true),
            flag(CKA_ENCRYPT, false),
            flag(CKA_DECRYPT, false),
        };
        ck_object_handle_t eph_h = 0;
        ck_mechanism gen{CKM_AES_KEY_GEN, nullptr, 0};
        r = f->C_GenerateKey(s, &gen, eph_tmpl, std::size(eph_tmpl), &eph_h);
        if (r == CKR_OK) {
            ck_mechanism kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
            unsigned long kek_len = 64;
            out.wrapped_kek.resize(kek_len);
            r = f->C_WrapKey(s, &kwp, eph_h, kek_h, out.wrapped_kek.data(), &kek_len);
            out.wrapped_kek.resize(kek_len);
            if (r == CKR_OK) {
                ck_mechanism oaep{CKM_RSA_PKCS_OAEP, &transfer_oaep, sizeof transfer_oaep};
                unsigned long key_len = 1024;
                out.wrapped_key.resize(key_len);
                r = f->C_WrapKey(s, &oaep, pub_h, eph_h, out.wrapped_key.data(), &key_len);
                out.wrapped_key.resize(key_len);
            }
            f->C_DestroyObject(s, eph_h);
        }
        f->C_DestroyObject(s, pub_h);
        return r;
    });
    if (rv && *rv == CKR_KEY_UNEXTRACTABLE)
        return fail(Errc::invalid_argument,
                    "KEK " + kek.hex + " was made unextractable (by a vaultfs before several hosts): it cannot be "
                                       "wrapped for another host");
    if (auto ok = call_ok(rv, "wrapping KEK " + kek.hex + " for a transport key"); !ok)
        return tl::unexpected(ok.error());
    return out;
}

Result<void> Pkcs11KeyService::unwrap_kek(const KeyId& transport, const WrappedKek& wrapped, const KeyId& kek,
                                          const std::string& label)
{
    auto id = from_hex(kek.hex);
    if (!id || id->size() != key_id_size)
        return fail(Errc::invalid_argument, "malformed KEK id '" + kek.hex + "'");
    auto taken = impl_->id_in_use(kek);
    if (!taken)
        return tl::unexpected(taken.error());
    if (*taken)
        return fail(Errc::invalid_argument, impl_->profile.name() + " already holds a key with id " + kek.hex);
    auto rv = impl_->with_key(CKO_PRIVATE_KEY, transport, [&](ck_session_handle_t s, ck_object_handle_t priv_h) {
        auto& f = *impl_->module;
        const ck_object_class_t secret = CKO_SECRET_KEY;
        const ck_key_type_t aes = CKK_AES;
        ck_attribute eph_tmpl[] = {
            attr(CKA_CLASS, &secret, sizeof secret),
            attr(CKA_KEY_TYPE, &aes, sizeof aes),
            flag(CKA_TOKEN, false),
            flag(CKA_SENSITIVE, true),
            flag(CKA_EXTRACTABLE, false),
            flag(CKA_UNWRAP, true),
            flag(CKA_ENCRYPT, false),
            flag(CKA_DECRYPT, false),
        };
        ck_mechanism oaep{CKM_RSA_PKCS_OAEP, &transfer_oaep, sizeof transfer_oaep};
        ck_object_handle_t eph_h = 0;
        ck_rv_t r = f->C_UnwrapKey(s, &oaep, priv_h, const_cast<std::uint8_t*>(wrapped.wrapped_key.data()),
                                   wrapped.wrapped_key.size(), eph_tmpl, std::size(eph_tmpl), &eph_h);
        if (r != CKR_OK)
            return r;
        // No CKA_MODIFIABLE or CKA_VALUE_LEN: SoftHSM2 refuses either in an
        // unwrap template (CKR_ATTRIBUTE_READ_ONLY).
        ck_attribute kek_tmpl[] = {
            attr(CKA_CLASS, &secret, sizeof secret),
            attr(CKA_KEY_TYPE, &aes, sizeof aes),
            attr(CKA_LABEL, label.data(), label.size()),
            attr(CKA_ID, id->data(), id->size()),
            flag(CKA_TOKEN, true),
            flag(CKA_PRIVATE, true),
            flag(CKA_SENSITIVE, true),
            flag(CKA_EXTRACTABLE, true),
            flag(CKA_ENCRYPT, true),
            flag(CKA_DECRYPT, true),
            flag(CKA_WRAP, false),
            flag(CKA_UNWRAP, false),
            flag(CKA_SIGN, false),
            flag(CKA_VERIFY, false),
            flag(CKA_DERIVE, false),
        };
        ck_mechanism kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        ck_object_handle_t kek_h = 0;
        r = f->C_UnwrapKey(s, &kwp, eph_h, const_cast<std::uint8_t*>(wrapped.wrapped_kek.data()),
                           wrapped.wrapped_kek.size(), kek_tmpl, std::size(kek_tmpl), &kek_h);
        f->C_DestroyObject(s, eph_h);
        return r;
    });
    // SoftHSM2 answers a blob that does not open with CKR_GENERAL_ERROR.
    if (rv && (*rv == CKR_GENERAL_ERROR || *rv == CKR_WRAPPED_KEY_INVALID || *rv == CKR_ENCRYPTED_DATA_INVALID))
        return fail(Errc::authentication_failed, "the wrapped KEK " + kek.hex + " does not open with this host's transport key "
                                     "(a grant for another host, or altered)");
    return call_ok(rv, "unwrapping KEK " + kek.hex);
}

}  // namespace vaultfs::hsm
