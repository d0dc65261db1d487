#include "hsm/pkcs11_key_service.hpp"

#include "hsm/hex.hpp"

// GNU names only: the compatibility names are macros (`value`, `flags`...)
// that would rewrite unrelated C++ identifiers.
#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
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
constexpr std::size_t key_id_size = 16;
// DER of OID 1.2.840.10045.3.1.7 (prime256v1)
constexpr std::array<std::uint8_t, 10> p256_oid_der{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

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
        if (auto existing = registry[path].lock())
            return existing;

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
        registry[path] = module;
        return module;
    }

    ~Module() { fn_->C_Finalize(nullptr); }
    ck_function_list* operator->() const { return fn_; }

    // Finalizes and initialises the module again: the way back after the
    // token went away (a removed device, SoftHSM's directory vanishing).
    // REQUIRES: no other thread is inside the module.
    ck_rv_t reinitialize()
    {
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
    std::shared_ptr<Module> module;
    ck_slot_id_t slot = 0;
    std::string label;
    SecureBuffer pin;

    // Held shared by every operation, exclusively by reconnect(): PKCS#11
    // forbids C_Finalize while other threads are inside the module.
    std::shared_mutex module_mutex;
    std::mutex reconnect_mutex;
    std::chrono::steady_clock::time_point last_reconnect{};

    std::mutex pool_mutex;
    std::vector<ck_session_handle_t> idle;  // logged-in sessions nobody is using
    std::size_t open_sessions = 0;
    bool logged_in = false;
    bool pin_rejected = false;  // sticky: never present a rejected PIN again

    std::mutex handles_mutex;
    std::unordered_map<std::string, ck_object_handle_t> handles;  // "class:idhex" -> handle

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
        for (int attempt = 0; attempt < 2; ++attempt) {
            auto s = acquire();
            if (!s)
                return tl::unexpected(s.error());
            rv = op(*s);
            if (!session_lost(rv)) {
                release(*s);
                return rv;
            }
            discard(*s, rv);
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

    Result<Bytes> new_key_id()
    {
        Bytes id(key_id_size);
        if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1)
            return fail(Errc::device_error, "RAND_bytes failed");
        return id;
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
    impl->label = config.token_label;
    impl->pin = std::move(config.pin);
    // Log in now, so that a wrong PIN stops start-up rather than a request.
    auto first = impl->open_session();
    if (!first)
        return tl::unexpected(first.error());
    impl->release(*first);
    return std::unique_ptr<Pkcs11KeyService>(new Pkcs11KeyService(std::move(impl)));
}

Result<KeyId> Pkcs11KeyService::create_kek(const std::string& label)
{
    auto id = impl_->new_key_id();
    if (!id)
        return tl::unexpected(id.error());
    const ck_object_class_t cls = CKO_SECRET_KEY;
    const ck_key_type_t type = CKK_AES;
    const unsigned long len = 32;
    ck_attribute tmpl[] = {
        attr(CKA_CLASS, &cls, sizeof cls),
        attr(CKA_KEY_TYPE, &type, sizeof type),
        attr(CKA_VALUE_LEN, &len, sizeof len),
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id->data(), id->size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, true),
        flag(CKA_SENSITIVE, true),
        flag(CKA_EXTRACTABLE, false),
        flag(CKA_MODIFIABLE, false),
        // Every usage flag explicitly: SoftHSM defaults them all to true.
        flag(CKA_ENCRYPT, true),
        flag(CKA_DECRYPT, true),
        flag(CKA_WRAP, false),
        flag(CKA_UNWRAP, false),
        flag(CKA_SIGN, false),
        flag(CKA_VERIFY, false),
        flag(CKA_DERIVE, false),
    };
    ck_object_handle_t key = 0;
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        ck_mechanism mech{CKM_AES_KEY_GEN, nullptr, 0};
        return (*impl_->module)->C_GenerateKey(s, &mech, tmpl, std::size(tmpl), &key);
    });
    if (auto ok = call_ok(rv, "C_GenerateKey (AES-256 KEK)"); !ok)
        return tl::unexpected(ok.error());
    return KeyId{to_hex(*id)};
}

Result<void> Pkcs11KeyService::find_key(const KeyId& id)
{
    auto secret = impl_->find_object(CKO_SECRET_KEY, id);
    if (secret)
        return {};
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
    if (dek.size() != dek_size)
        return fail(Errc::invalid_argument, "a DEK must be 32 bytes");
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

Result<SecureBuffer> Pkcs11KeyService::unseal(const KeyId& kek, std::span<const std::uint8_t> sealed,
                                              std::span<const std::uint8_t> aad)
{
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
    // SoftHSM 2.6.1 reports a bad GCM tag as CKR_GENERAL_ERROR.
    case CKR_GENERAL_ERROR:
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
        return fail(Errc::authentication_failed,
                    "sealed DEK failed authentication under key " + kek.hex + " (" + rv_name(*rv) + ")");
    default:
        return fail(Errc::device_error, "unsealing a DEK with key " + kek.hex + " failed: " + rv_name(*rv));
    }
}

Result<KeyId> Pkcs11KeyService::create_signing_key(const std::string& label)
{
    auto id = impl_->new_key_id();
    if (!id)
        return tl::unexpected(id.error());
    ck_attribute pub[] = {
        attr(CKA_EC_PARAMS, p256_oid_der.data(), p256_oid_der.size()),
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id->data(), id->size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, false),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_VERIFY, true),
        flag(CKA_ENCRYPT, false),
        flag(CKA_WRAP, false),
        flag(CKA_DERIVE, false),
    };
    ck_attribute priv[] = {
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id->data(), id->size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, true),
        flag(CKA_SENSITIVE, true),
        flag(CKA_EXTRACTABLE, false),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_SIGN, true),
        flag(CKA_SIGN_RECOVER, false),
        flag(CKA_DECRYPT, false),
        flag(CKA_UNWRAP, false),
        flag(CKA_DERIVE, false),
    };
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        ck_mechanism mech{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
        ck_object_handle_t pub_h = 0;
        ck_object_handle_t priv_h = 0;
        return (*impl_->module)->C_GenerateKeyPair(s, &mech, pub, std::size(pub), priv, std::size(priv), &pub_h,
                                                   &priv_h);
    });
    if (auto ok = call_ok(rv, "C_GenerateKeyPair (EC P-256)"); !ok)
        return tl::unexpected(ok.error());
    return KeyId{to_hex(*id)};
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::public_point(const KeyId& key)
{
    Bytes der(128);
    unsigned long len = 0;
    auto rv = impl_->with_key(CKO_PUBLIC_KEY, key, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_attribute a = attr(CKA_EC_POINT, der.data(), der.size());
        const ck_rv_t r = (*impl_->module)->C_GetAttributeValue(s, h, &a, 1);
        len = a.value_len;
        return r;
    });
    if (auto ok = call_ok(rv, "reading the public point of " + key.hex); !ok)
        return tl::unexpected(ok.error());
    der.resize(len);
    // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
    if (der.size() == 67 && der[0] == 0x04 && der[1] == 0x41 && der[2] == 0x04)
        return Bytes(der.begin() + 2, der.end());
    if (der.size() == 65 && der[0] == 0x04)
        return der;
    return fail(Errc::device_error, "unexpected CKA_EC_POINT encoding for key " + key.hex);
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::sign_digest(const KeyId& key,
                                                                std::span<const std::uint8_t, 32> digest)
{
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
    auto rv = impl_->with_key(CKO_SECRET_KEY, id, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_attribute a = attr(attribute_type, &value, 1);
        return (*impl_->module)->C_GetAttributeValue(s, h, &a, 1);
    });
    if (auto ok = call_ok(rv, "C_GetAttributeValue"); !ok)
        return tl::unexpected(ok.error());
    return value != 0;
}

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

}  // namespace vaultfs::hsm
