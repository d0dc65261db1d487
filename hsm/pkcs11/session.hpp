// pkcs11_session: what every part of the PKCS#11 key service shares -- the
// module (dlopened and initialised once per process), the pool of
// logged-in sessions with its retry and reconnect rules, the object handle
// cache, and the small helpers for templates and return values.
//
// Internal to hsm/: only the key service's own files include it
// (pkcs11_key_service.cpp, kek_transfer.cpp). The contract of each part is
// the one pkcs11_key_service.hpp states for the service as a whole.
#pragma once

// GNU names only: the compatibility names are macros (`value`, `flags`...)
// that would rewrite unrelated C++ identifiers.
#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <openssl/rand.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "hsm/hex.hpp"
#include "hsm/pkcs11/key_service.hpp"

namespace vaultfs::hsm {

namespace p11 {

using Bytes = std::vector<std::uint8_t>;

// Every CKA_ID vaultfs makes is 16 random bytes.
constexpr std::size_t key_id_size = 16;

// The MAC key beside an aes-cbc-pad+hmac-sha256 KEK: the KEK's CKA_ID and 'm'.
inline KeyId mac_key_of(const KeyId& kek) { return KeyId{kek.hex + "6d"}; }

// "CKR_PIN_INCORRECT", or "CKR_0x..." for a value without a name here.
std::string rv_name(ck_rv_t rv);

inline bool session_lost(ck_rv_t rv)
{
    return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_USER_NOT_LOGGED_IN;
}

inline bool handle_stale(ck_rv_t rv) { return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID; }

// The outcome of a call made through a session: the session's own error,
// or "<what> failed: CKR_…" for a call the token refused.
inline Result<void> call_ok(const Result<ck_rv_t>& rv, const std::string& what)
{
    if (!rv)
        return tl::unexpected(rv.error());
    if (*rv != CKR_OK)
        return fail(Errc::device_error, what + " failed: " + rv_name(*rv));
    return {};
}

inline std::string trimmed_label(const unsigned char (&label)[32])
{
    std::string s(reinterpret_cast<const char*>(label), 32);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\0'))
        s.pop_back();
    return s;
}

inline std::string trimmed_text(const unsigned char* text, std::size_t size)
{
    std::string s(reinterpret_cast<const char*>(text), size);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\0'))
        s.pop_back();
    return s;
}

inline std::array<unsigned char, 32> padded_label(const std::string& label)
{
    std::array<unsigned char, 32> out;
    out.fill(' ');
    std::memcpy(out.data(), label.data(), std::min<std::size_t>(label.size(), out.size()));
    return out;
}

// A loaded and initialised module. One per module path per process.
class Module {
public:
    // Loads and initialises the module at `path` once per process (later
    // calls get the same one), with `env` set first. Errc::module_unavailable
    // when it cannot be loaded, or is loaded already with another environment.
    static Result<std::shared_ptr<Module>> load(const std::string& path,
                                                const std::vector<std::pair<std::string, std::string>>& env);

    ~Module() { fn_->C_Finalize(nullptr); }
    // Moves on with every reinitialize(): object handles from before name
    // nothing (or another object) after, in every service sharing the module.
    std::atomic<std::uint64_t> generation{0};
    ck_function_list* operator->() const { return fn_; }
    ck_function_list& functions() const { return *fn_; }

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
inline bool pin_problem(ck_rv_t rv)
{
    return rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_INVALID || rv == CKR_PIN_LEN_RANGE ||
           rv == CKR_PIN_EXPIRED;
}

inline Error login_error(ck_rv_t rv, const std::string& label)
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

inline ck_attribute attr(ck_attribute_type_t type, const void* value, unsigned long len)
{
    return ck_attribute{type, const_cast<void*>(value), len};
}

// The first object the template matches, or 0 (found), in one search.
inline ck_rv_t find_first(const ck_function_list& f, ck_session_handle_t s, ck_attribute* tmpl, unsigned long count,
                          ck_object_handle_t& found)
{
    found = 0;
    ck_rv_t r = f.C_FindObjectsInit(s, tmpl, count);
    if (r != CKR_OK)
        return r;
    unsigned long n = 0;
    r = f.C_FindObjects(s, &found, 1, &n);
    f.C_FindObjectsFinal(s);
    if (n == 0)
        found = 0;
    return r;
}

// DER SubjectPublicKeyInfo of the RSA key (modulus, exponent), big-endian
// as tokens hold them (pkcs11_key_service.cpp).
Result<Bytes> rsa_spki(const Bytes& modulus, const Bytes& exponent);

// What every KEK unwrapped with a transport key must be: the private
// half's CKA_UNWRAP_TEMPLATE, and a part of every unwrap template vaultfs
// passes (kek_transfer.cpp). The token refuses an unwrap whose template
// differs in any of these.
const std::vector<ck_attribute>& unwrapped_kek_attributes();

inline const unsigned char ck_true = 1;
inline const unsigned char ck_false = 0;
inline ck_attribute flag(ck_attribute_type_t type, bool on) { return attr(type, on ? &ck_true : &ck_false, 1); }

}  // namespace p11

using p11::attr;
using p11::Bytes;
using p11::call_ok;
using p11::flag;
using p11::handle_stale;
using p11::key_id_size;
using p11::login_error;
using p11::mac_key_of;
using p11::pin_problem;
using p11::rv_name;
using p11::session_lost;
using p11::trimmed_label;
using p11::trimmed_text;

struct Pkcs11KeyService::Impl {
    using Module = p11::Module;
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
    // Moves on with every fresh login: a token may number its private
    // objects anew after a logout (openCryptoki does: a handle from before
    // may name another key after), so handles from before are dropped.
    std::atomic<std::uint64_t> logins{0};
    std::unordered_map<std::string, ck_object_handle_t> handles;  // "class:idhex" -> handle

    TokenProfile profile;  // read once at open

    // check_trusted_wrapping()'s answer, once known (kek_transfer.cpp).
    std::mutex trusted_wrapping_mutex;
    std::optional<Result<void>> trusted_wrapping;
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
            if (rv == CKR_OK) {
                logins.fetch_add(1);
                std::lock_guard handles_lock(handles_mutex);
                handles.clear();
            }
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
    Result<ck_object_handle_t> find_object_held(ck_object_class_t cls, const KeyId& id, bool* cached = nullptr)
    {
        const std::string cache_key = std::to_string(cls) + ":" + id.hex;
        if (cached != nullptr)
            *cached = false;
        {
            std::lock_guard lock(handles_mutex);
            // Another service on this module may have reinitialised it.
            if (const auto g = module->generation.load(); g != handles_generation) {
                handles.clear();
                handles_generation = g;
            }
            if (const auto it = handles.find(cache_key); it != handles.end()) {
                if (cached != nullptr)
                    *cached = true;
                return it->second;
            }
        }
        const auto raw = from_hex(id.hex);
        if (!raw || raw->empty())
            return fail(Errc::invalid_argument, "malformed key id '" + id.hex + "'");
        ck_object_handle_t found = 0;
        auto rv = with_session_held([&](ck_session_handle_t s) {
            ck_attribute tmpl[] = {attr(CKA_CLASS, &cls, sizeof cls), attr(CKA_ID, raw->data(), raw->size())};
            return p11::find_first(module->functions(), s, tmpl, 2, found);
        });
        if (auto ok = call_ok(rv, "C_FindObjects"); !ok)
            return tl::unexpected(ok.error());
        if (found == 0)
            return fail(Errc::key_not_found, "no key with id " + id.hex + " in token '" + label + "'");
        std::lock_guard lock(handles_mutex);
        handles[cache_key] = found;
        return found;
    }

    // Whether `h` is the object of class `cls` with CKA_ID `id`.
    bool names_key(ck_session_handle_t s, ck_object_handle_t h, ck_object_class_t cls, const Bytes& id)
    {
        ck_object_class_t got_class = 0;
        std::array<std::uint8_t, 64> got_id{};
        ck_attribute a[] = {attr(CKA_CLASS, &got_class, sizeof got_class), attr(CKA_ID, got_id.data(), got_id.size())};
        return (*module)->C_GetAttributeValue(s, h, a, 2) == CKR_OK && got_class == cls && a[1].value_len == id.size() &&
               std::equal(id.begin(), id.end(), got_id.begin());
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
        const auto raw_id = from_hex(id.hex);
        for (int attempt = 0; attempt < 2; ++attempt) {
            const std::uint64_t login = logins.load();
            bool cached = false;
            auto h = find_object_held(cls, id, &cached);
            if (!h)
                return tl::unexpected(h.error());
            auto rv = with_session_held([&](ck_session_handle_t s) {
                // A fresh login since the handle was found: it may name
                // another object now, so it is looked up again.
                if (logins.load() != login)
                    return CKR_OBJECT_HANDLE_INVALID;
                // A cached handle must still name this key: a token may
                // number its objects anew while we hold one (openCryptoki
                // does when another session changes the token), and a seal
                // under another key would be lost for good.
                if (cached && (!raw_id || !names_key(s, *h, cls, *raw_id)))
                    return CKR_OBJECT_HANDLE_INVALID;
                return op(s, *h);
            });
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
        ck_object_handle_t found = 0;
        auto rv = with_session([&](ck_session_handle_t s) {
            ck_attribute tmpl[] = {attr(CKA_ID, raw->data(), raw->size())};
            return p11::find_first(module->functions(), s, tmpl, 1, found);
        });
        if (auto ok = call_ok(rv, "C_FindObjects"); !ok)
            return tl::unexpected(ok.error());
        return found != 0;
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

}  // namespace vaultfs::hsm
