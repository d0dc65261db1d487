#include "hsm/pkcs11/token_evp.hpp"

#include <libp11.h>

#include <cstring>
#include <mutex>
#include <vector>
#include <string>

#include "hsm/hex.hpp"

namespace vaultfs::hsm {

struct TokenEvp::Context {
    PKCS11_CTX* ctx = nullptr;
    PKCS11_SLOT* slots = nullptr;
    unsigned int nslots = 0;
    PKCS11_SLOT* slot = nullptr;
    std::uint64_t epoch = 0;
};

namespace {

// Contexts abandoned on purpose (see the header): releasing their slots or
// unloading them would finalize the module the key service is using. They
// stay reachable here until the process ends.
void abandon(std::unique_ptr<TokenEvp::Context> context)
{
    static std::mutex mutex;
    static auto* kept = new std::vector<std::unique_ptr<TokenEvp::Context>>();
    std::lock_guard lock(mutex);
    kept->push_back(std::move(context));
}

}  // namespace

TokenEvp::TokenEvp(Pkcs11KeyService& keys) : keys_(keys) {}

TokenEvp::~TokenEvp()
{
    if (current_)
        abandon(std::move(current_));
}

Result<TokenEvp::Context*> TokenEvp::context()
{
    const std::uint64_t epoch = keys_.connection_epoch();
    if (current_ && current_->epoch == epoch)
        return current_.get();
    if (current_)
        abandon(std::move(current_));  // a context from before a reconnect
    auto c = std::make_unique<Context>();
    c->epoch = epoch;
    c->ctx = PKCS11_CTX_new();
    if (c->ctx == nullptr)
        return fail(Errc::device_error, "libp11: PKCS11_CTX_new failed");
    if (PKCS11_CTX_load(c->ctx, keys_.module_path().c_str()) != 0)
        return fail(Errc::module_unavailable, "libp11 cannot load " + keys_.module_path());
    if (PKCS11_enumerate_slots(c->ctx, &c->slots, &c->nslots) != 0)
        return fail(Errc::device_error, "libp11: PKCS11_enumerate_slots failed");
    for (unsigned int i = 0; i < c->nslots; ++i) {
        PKCS11_SLOT* s = &c->slots[i];
        if (s->token != nullptr && s->token->initialized && s->token->label != nullptr &&
            keys_.token_label() == s->token->label) {
            c->slot = s;
            break;
        }
    }
    if (c->slot == nullptr)
        return fail(Errc::token_not_found, "libp11 sees no token labelled '" + keys_.token_label() + "'");
    // Read-write sessions, for storing certificates.
    if (PKCS11_open_session(c->slot, 1) != 0)
        return fail(Errc::device_error, "libp11 cannot open a session on token '" + keys_.token_label() + "'");
    int logged_in = 0;
    if (PKCS11_is_logged_in(c->slot, 0, &logged_in) != 0 || !logged_in) {
        const std::string pin(reinterpret_cast<const char*>(keys_.pin().data()), keys_.pin().size());
        const int rc = PKCS11_login(c->slot, 0, pin.c_str());
        if (rc != 0) {
            // The application may be logged in through the key service's
            // sessions while libp11's own view says otherwise.
            if (PKCS11_is_logged_in(c->slot, 0, &logged_in) != 0 || !logged_in)
                return fail(Errc::device_error, "libp11 cannot log in to token '" + keys_.token_label() + "'");
        }
    }
    current_ = std::move(c);
    return current_.get();
}

Result<void> TokenEvp::on_token(const KeyId& key,
                                const std::function<Result<void>(PKCS11_TOKEN*, std::span<std::uint8_t>)>& work)
{
    auto raw = from_hex(key.hex);
    if (!raw)
        return fail(Errc::invalid_argument, "malformed key id '" + key.hex + "'");
    std::lock_guard lock(mutex_);
    const auto held = keys_.hold_module();
    auto c = context();
    if (!c)
        return tl::unexpected(c.error());
    return work((*c)->slot->token, *raw);
}

Result<void> TokenEvp::with_private_key(const KeyId& key, const std::function<Result<void>(EVP_PKEY*)>& use)
{
    return on_token(key, [&](PKCS11_TOKEN* token, std::span<std::uint8_t> id) -> Result<void> {
        PKCS11_KEY* keys = nullptr;
        unsigned int count = 0;
        if (PKCS11_enumerate_keys(token, &keys, &count) != 0)
            return fail(Errc::device_error, "libp11: PKCS11_enumerate_keys failed");
        for (unsigned int i = 0; i < count; ++i) {
            if (keys[i].id_len != id.size() || std::memcmp(keys[i].id, id.data(), id.size()) != 0)
                continue;
            EVP_PKEY* pkey = PKCS11_get_private_key(&keys[i]);
            if (pkey == nullptr)
                return fail(Errc::device_error, "libp11 cannot make an EVP_PKEY of key " + key.hex);
            auto r = use(pkey);
            EVP_PKEY_free(pkey);
            return r;
        }
        return fail(Errc::key_not_found, "libp11 sees no private key with id " + key.hex);
    });
}

Result<void> TokenEvp::store_certificate(const KeyId& key, X509* cert, const std::string& label)
{
    return on_token(key, [&](PKCS11_TOKEN* token, std::span<std::uint8_t> id) -> Result<void> {
        std::string text = label;
        if (PKCS11_store_certificate(token, cert, text.data(), id.data(), id.size(), nullptr) != 0)
            return fail(Errc::device_error, "libp11 cannot store the certificate of key " + key.hex + " on the token");
        return {};
    });
}

}  // namespace vaultfs::hsm
