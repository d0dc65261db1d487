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

namespace {

using p11::Module;

constexpr std::size_t gcm_iv_size = 12;
constexpr std::size_t gcm_tag_size = 16;
constexpr std::size_t cbc_iv_size = 16;
constexpr std::size_t cbc_ct_size = 48;  // a 32-byte DEK and a block of padding
constexpr std::size_t hmac_size = 32;
constexpr std::string_view cbc_hmac_context = "vaultfs-seal-cbc-hmac-v1";

}  // namespace

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
// usages given (SoftHSM defaults every usage flag to true). `reach` says
// whether it may ever leave the token, and then only wrapped under a key
// the Security Officer trusted (key_service.hpp).
Result<void> generate_secret_key(Pkcs11KeyService::Impl& impl, ck_mechanism_type_t mechanism, ck_key_type_t type,
                                 const std::string& label, const Bytes& id, bool encrypt, bool sign, KekReach reach);

}  // namespace

Result<KeyId> Pkcs11KeyService::create_kek(const std::string& label, KekReach reach)
{
    auto id = impl_->new_key_id();
    if (!id)
        return tl::unexpected(id.error());
    const KeyId kek{to_hex(*id)};
    if (auto r = create_kek_with_id(label, kek, reach); !r)
        return tl::unexpected(r.error());
    return kek;
}

Result<void> Pkcs11KeyService::create_kek_with_id(const std::string& label, const KeyId& kek, KekReach reach)
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
    // Only an AES-GCM KEK is ever wrapped for another host (wrap_kek): a
    // CBC+HMAC pair cannot be moved, so neither half leaves the token at all.
    if (impl_->schemes.seal != SealScheme::aes_gcm)
        reach = KekReach::this_token;
    if (reach == KekReach::trusted_tokens)
        if (auto r = check_trusted_wrapping(); !r)
            return r;
    if (auto r = generate_secret_key(*impl_, CKM_AES_KEY_GEN, CKK_AES, label, *id, true, false, reach); !r)
        return r;
    if (impl_->schemes.seal == SealScheme::aes_cbc_hmac) {
        auto mac = from_hex(mac_key_of(kek).hex);
        if (auto r = generate_secret_key(*impl_, CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, label + " (mac)", *mac,
                                         false, true, KekReach::this_token);
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
                                 const std::string& label, const Bytes& id, bool encrypt, bool sign, KekReach reach)
{
    const bool movable = reach == KekReach::trusted_tokens;
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
        flag(CKA_EXTRACTABLE, movable),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_ENCRYPT, encrypt),
        flag(CKA_DECRYPT, encrypt),
        flag(CKA_WRAP, false),
        flag(CKA_UNWRAP, false),
        flag(CKA_SIGN, sign),
        flag(CKA_VERIFY, sign),
        flag(CKA_DERIVE, false),
        // Last, and only when set: a token that does not know the attribute
        // still makes the one-host kind.
        flag(CKA_WRAP_WITH_TRUSTED, true),
    };
    ck_object_handle_t key = 0;
    auto rv = impl.with_session([&](ck_session_handle_t s) {
        ck_mechanism mech{mechanism, nullptr, 0};
        return (*impl.module)->C_GenerateKey(s, &mech, tmpl, std::size(tmpl) - (movable ? 0 : 1), &key);
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

Result<Pkcs11KeyService::KekExposure> Pkcs11KeyService::kek_exposure(const KeyId& kek)
{
    unsigned char extractable = 0;
    unsigned char with_trusted = 0;
    auto rv = impl_->with_key(CKO_SECRET_KEY, kek, [&](ck_session_handle_t s, ck_object_handle_t h) {
        ck_attribute a = attr(CKA_EXTRACTABLE, &extractable, 1);
        ck_rv_t r = (*impl_->module)->C_GetAttributeValue(s, h, &a, 1);
        if (r != CKR_OK || extractable == 0)
            return r;
        // A token that does not know CKA_WRAP_WITH_TRUSTED answers
        // CKR_ATTRIBUTE_TYPE_INVALID: it cannot hold such a key, so any
        // wrapping key takes this one out.
        ck_attribute w = attr(CKA_WRAP_WITH_TRUSTED, &with_trusted, 1);
        r = (*impl_->module)->C_GetAttributeValue(s, h, &w, 1);
        return r == CKR_ATTRIBUTE_TYPE_INVALID ? CKR_OK : r;
    });
    if (auto ok = call_ok(rv, "reading how KEK " + kek.hex + " may leave the token"); !ok)
        return tl::unexpected(ok.error());
    if (extractable == 0)
        return KekExposure::none;
    return with_trusted != 0 ? KekExposure::trusted_only : KekExposure::any_wrapping_key;
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

}  // namespace vaultfs::hsm
