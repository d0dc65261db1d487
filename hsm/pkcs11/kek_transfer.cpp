// Moving KEKs between hosts' tokens (pkcs11_key_service.hpp, "moving KEKs
// between hosts' tokens"): transport keys, trusted wrapping keys, and the
// check that the token enforces CKA_WRAP_WITH_TRUSTED at all.
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <algorithm>

#include "hsm/pkcs11/session.hpp"
#include "hsm/security_officer.hpp"

namespace vaultfs::hsm {

namespace {

// RSA-OAEP as SoftHSM2 2.6 takes it for C_WrapKey/C_UnwrapKey (SHA-1 only;
// OAEP's security rests on the hash as a random oracle, not on its
// collision resistance).
ck_rsa_pkcs_oaep_params transfer_oaep{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};

constexpr unsigned transport_min_bits = 3072;

const ck_object_class_t secret_class = CKO_SECRET_KEY;
const ck_object_class_t public_class = CKO_PUBLIC_KEY;
const ck_key_type_t aes_type = CKK_AES;
const ck_key_type_t rsa_type = CKK_RSA;

struct RsaPublic {
    Bytes modulus;
    Bytes exponent;
};

// The modulus and exponent of an RSA SubjectPublicKeyInfo of at least
// `min_bits`, big-endian without leading zeros.
Result<RsaPublic> rsa_public_of(std::span<const std::uint8_t> spki)
{
    const unsigned char* p = spki.data();
    EVP_PKEY* raw = d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size()));
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> pkey(raw, &EVP_PKEY_free);
    if (!pkey || EVP_PKEY_get_base_id(pkey.get()) != EVP_PKEY_RSA ||
        EVP_PKEY_get_bits(pkey.get()) < static_cast<int>(transport_min_bits))
        return fail(Errc::invalid_argument, "a transport key is an RSA public key of at least 3072 bits");
    BIGNUM* n = nullptr;
    BIGNUM* e = nullptr;
    EVP_PKEY_get_bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_N, &n);
    EVP_PKEY_get_bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_E, &e);
    std::unique_ptr<BIGNUM, decltype(&BN_free)> n_owner(n, &BN_free), e_owner(e, &BN_free);
    if (n == nullptr || e == nullptr)
        return fail(Errc::invalid_argument, "the transport key has no modulus or exponent");
    RsaPublic out{Bytes(static_cast<std::size_t>(BN_num_bytes(n))), Bytes(static_cast<std::size_t>(BN_num_bytes(e)))};
    BN_bn2bin(n, out.modulus.data());
    BN_bn2bin(e, out.exponent.data());
    return out;
}

Bytes without_leading_zeros(Bytes b)
{
    const auto first = std::find_if(b.begin(), b.end(), [](std::uint8_t c) { return c != 0; });
    b.erase(b.begin(), first);
    return b;
}

// The first object of class `cls` with CKA_ID `id` (and CKA_TRUSTED true
// when `trusted`), or 0; never from the handle cache: these lookups are
// rare, and may rightly find nothing (no reconnect either).
ck_rv_t find_first(const ck_function_list& f, ck_session_handle_t s, const ck_object_class_t& cls, const Bytes& id,
                   bool trusted, ck_object_handle_t& found)
{
    ck_attribute tmpl[] = {attr(CKA_CLASS, &cls, sizeof cls), attr(CKA_ID, id.data(), id.size()),
                           flag(CKA_TRUSTED, true)};
    return p11::find_first(f, s, tmpl, trusted ? 3 : 2, found);
}

// A public RSA object's modulus, as the token holds it.
ck_rv_t modulus_of(const ck_function_list& f, ck_session_handle_t s, ck_object_handle_t h, Bytes& modulus)
{
    modulus.assign(1024, 0);
    ck_attribute a = attr(CKA_MODULUS, modulus.data(), modulus.size());
    const ck_rv_t r = f.C_GetAttributeValue(s, h, &a, 1);
    modulus.resize(r == CKR_OK ? a.value_len : 0);
    modulus = without_leading_zeros(std::move(modulus));
    return r;
}

// Finds the trusted copy of `key` in the token: 0 when there is none, or
// the object with its id is not trusted or holds another modulus.
ck_rv_t find_trusted(const ck_function_list& f, ck_session_handle_t s, const Bytes& id, const RsaPublic& key,
                     ck_object_handle_t& found)
{
    ck_rv_t r = find_first(f, s, public_class, id, true, found);
    if (r != CKR_OK || found == 0)
        return r;
    Bytes modulus;
    r = modulus_of(f, s, found, modulus);
    if (r == CKR_OK && modulus != without_leading_zeros(key.modulus))
        found = 0;
    return r;
}

}  // namespace

const std::vector<ck_attribute>& p11::unwrapped_kek_attributes()
{
    static const std::vector<ck_attribute> attributes{
        attr(CKA_CLASS, &secret_class, sizeof secret_class),
        attr(CKA_KEY_TYPE, &aes_type, sizeof aes_type),
        flag(CKA_SENSITIVE, true),
        flag(CKA_EXTRACTABLE, true),
        flag(CKA_WRAP_WITH_TRUSTED, true),
        flag(CKA_WRAP, false),
        flag(CKA_UNWRAP, false),
        flag(CKA_DERIVE, false),
    };
    return attributes;
}

KeyId Pkcs11KeyService::trusted_key_id(std::span<const std::uint8_t> transport_public)
{
    std::array<std::uint8_t, SHA256_DIGEST_LENGTH> d{};
    SHA256(transport_public.data(), transport_public.size(), d.data());
    return KeyId{to_hex(std::span<const std::uint8_t>(d.data(), key_id_size))};
}

Result<void> Pkcs11KeyService::check_trusted_wrapping()
{
    std::lock_guard once(impl_->trusted_wrapping_mutex);
    if (impl_->trusted_wrapping)
        return *impl_->trusted_wrapping;
    const TokenProfile& t = impl_->profile;
    // Any AES mechanism the token wraps with will do: the check is of the
    // attribute, not of the mechanism.
    ck_mechanism_type_t mechanism = 0;
    for (const ck_mechanism_type_t m : {CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP, CKM_AES_CBC_PAD})
        if (mechanism == 0 && t.offers(m, CKF_WRAP))
            mechanism = m;
    if (mechanism == 0)
        return *(impl_->trusted_wrapping =
                     fail(Errc::not_permitted, t.name() + " wraps with no AES mechanism (CKM_AES_KEY_WRAP_PAD, "
                                                          "CKM_AES_KEY_WRAP, CKM_AES_CBC_PAD): vaultfs cannot check "
                                                          "that it enforces CKA_WRAP_WITH_TRUSTED"));
    std::array<std::uint8_t, 16> iv{};  // CBC-PAD's; the wrapped bytes are thrown away
    // Three session keys: a wrapping key nobody trusted, and two keys to
    // wrap with it, alike but for CKA_WRAP_WITH_TRUSTED.
    ck_rv_t plain_rv = CKR_OK;
    ck_rv_t guarded_rv = CKR_OK;
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        auto& f = *impl_->module;
        const unsigned long len = 32;
        const auto make = [&](bool wrapping, bool with_trusted, ck_object_handle_t& h) {
            ck_attribute tmpl[] = {
                attr(CKA_CLASS, &secret_class, sizeof secret_class),
                attr(CKA_KEY_TYPE, &aes_type, sizeof aes_type),
                attr(CKA_VALUE_LEN, &len, sizeof len),
                flag(CKA_TOKEN, false),
                flag(CKA_SENSITIVE, true),
                flag(CKA_EXTRACTABLE, !wrapping),
                flag(CKA_WRAP, wrapping),
                flag(CKA_ENCRYPT, false),
                flag(CKA_DECRYPT, false),
                flag(CKA_WRAP_WITH_TRUSTED, true),
            };
            ck_mechanism gen{CKM_AES_KEY_GEN, nullptr, 0};
            return f->C_GenerateKey(s, &gen, tmpl, std::size(tmpl) - (with_trusted ? 0 : 1), &h);
        };
        ck_object_handle_t wrapper = 0, plain = 0, guarded = 0;
        ck_rv_t r = make(true, false, wrapper);
        if (r == CKR_OK)
            r = make(false, false, plain);
        if (r == CKR_OK) {
            guarded_rv = make(false, true, guarded);
            ck_mechanism wrap{mechanism, mechanism == CKM_AES_CBC_PAD ? iv.data() : nullptr,
                              mechanism == CKM_AES_CBC_PAD ? iv.size() : 0};
            std::array<std::uint8_t, 64> out{};
            unsigned long out_len = out.size();
            plain_rv = f->C_WrapKey(s, &wrap, wrapper, plain, out.data(), &out_len);
            if (guarded_rv == CKR_OK) {
                out_len = out.size();
                guarded_rv = f->C_WrapKey(s, &wrap, wrapper, guarded, out.data(), &out_len);
            }
        }
        for (const auto h : {wrapper, plain, guarded})
            if (h != 0)
                f->C_DestroyObject(s, h);
        return r;
    });
    if (auto ok = call_ok(rv, "making session keys to check CKA_WRAP_WITH_TRUSTED"); !ok)
        return *(impl_->trusted_wrapping = tl::unexpected(ok.error()));
    const std::string what = t.name() + " does not enforce CKA_WRAP_WITH_TRUSTED";
    if (plain_rv != CKR_OK)
        impl_->trusted_wrapping = fail(Errc::not_permitted, t.name() + " cannot wrap a session key with " +
                                                                mechanism_name(mechanism) + " (" + rv_name(plain_rv) +
                                                                "), so vaultfs cannot check that it enforces "
                                                                "CKA_WRAP_WITH_TRUSTED");
    else if (guarded_rv == CKR_OK)
        impl_->trusted_wrapping = fail(Errc::not_permitted, what + ": it wrapped a key marked so under a key nobody "
                                                                   "trusted (openCryptoki before 3.16 does)");
    else if (guarded_rv != CKR_KEY_NOT_WRAPPABLE)
        impl_->trusted_wrapping =
            fail(Errc::not_permitted, what + " as PKCS#11 says (" + rv_name(guarded_rv) + ", not CKR_KEY_NOT_WRAPPABLE)");
    else
        impl_->trusted_wrapping = Result<void>{};
    return *impl_->trusted_wrapping;
}

Result<KeyId> Pkcs11KeyService::create_transport_key(const std::string& label)
{
    if (!impl_->profile.offers(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, transport_min_bits) ||
        !impl_->profile.offers(CKM_RSA_PKCS_OAEP, CKF_UNWRAP))
        return fail(Errc::mechanism_unsupported,
                    impl_->profile.name() + " cannot receive KEKs from other hosts: it needs CKM_RSA_PKCS_KEY_PAIR_GEN "
                                            "and CKM_RSA_PKCS_OAEP");
    if (auto r = check_trusted_wrapping(); !r)
        return fail(r.error().code, r.error().message + ": it cannot hold KEKs shared with other hosts");
    return generate_key_pair(KeyType::rsa_3072, label, KeyUsage{.unwrap = true});
}

Result<bool> Pkcs11KeyService::trusts(std::span<const std::uint8_t> transport_public)
{
    auto key = rsa_public_of(transport_public);
    if (!key)
        return tl::unexpected(key.error());
    auto id = from_hex(trusted_key_id(transport_public).hex);
    ck_object_handle_t found = 0;
    auto rv = impl_->with_session(
        [&](ck_session_handle_t s) { return find_trusted(impl_->module->functions(), s, *id, *key, found); });
    if (auto ok = call_ok(rv, "looking for a trusted key"); !ok)
        return tl::unexpected(ok.error());
    return found != 0;
}

Result<std::vector<std::uint8_t>> Pkcs11KeyService::wrap_kek(const KeyId& kek,
                                                             std::span<const std::uint8_t> transport_public)
{
    if (impl_->schemes.seal != SealScheme::aes_gcm)
        return fail(Errc::not_permitted, "this state's KEKs are aes-cbc-pad+hmac-sha256 pairs, which never leave the "
                                         "token");
    auto key = rsa_public_of(transport_public);
    if (!key)
        return tl::unexpected(key.error());
    auto trusted_id = from_hex(trusted_key_id(transport_public).hex);
    auto kek_id = from_hex(kek.hex);
    if (!kek_id)
        return fail(Errc::invalid_argument, "malformed KEK id '" + kek.hex + "'");
    bool untrusted = false;
    bool missing = false;
    Bytes out(1024);
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        auto& f = impl_->module->functions();
        ck_object_handle_t pub = 0, kek_h = 0;
        ck_rv_t r = find_trusted(f, s, *trusted_id, *key, pub);
        if (r != CKR_OK)
            return r;
        untrusted = pub == 0;
        if (untrusted)
            return CKR_OK;
        r = find_first(f, s, secret_class, *kek_id, false, kek_h);
        missing = r == CKR_OK && kek_h == 0;
        if (r != CKR_OK || missing)
            return r;
        ck_mechanism oaep{CKM_RSA_PKCS_OAEP, &transfer_oaep, sizeof transfer_oaep};
        unsigned long len = out.size();
        r = f.C_WrapKey(s, &oaep, pub, kek_h, out.data(), &len);
        out.resize(r == CKR_OK ? len : 0);
        return r;
    });
    if (rv && *rv == CKR_OK && untrusted)
        return fail(Errc::not_permitted,
                    impl_->profile.name() + " does not trust that transport key: its Security Officer has not taken it "
                                            "in (vaultfs join grant, or vaultfs host trust, with the SO PIN)");
    if (rv && *rv == CKR_OK && missing)
        return fail(Errc::key_not_found, "KEK " + kek.hex + " is not in " + impl_->profile.name());
    if (rv && *rv == CKR_KEY_UNEXTRACTABLE)
        return fail(Errc::not_permitted, "KEK " + kek.hex + " was made for this token only (one host): it never "
                                                            "leaves it; `vaultfs vault rekey` makes one that can");
    if (auto ok = call_ok(rv, "wrapping KEK " + kek.hex + " for a transport key"); !ok)
        return tl::unexpected(ok.error());
    return out;
}

Result<void> Pkcs11KeyService::unwrap_kek(const KeyId& transport, std::span<const std::uint8_t> wrapped,
                                          const KeyId& kek, const std::string& label)
{
    auto id = from_hex(kek.hex);
    if (!id || id->size() != key_id_size)
        return fail(Errc::invalid_argument, "malformed KEK id '" + kek.hex + "'");
    auto taken = impl_->id_in_use(kek);
    if (!taken)
        return tl::unexpected(taken.error());
    if (*taken)
        return fail(Errc::invalid_argument, impl_->profile.name() + " already holds a key with id " + kek.hex);
    // What the transport key's CKA_UNWRAP_TEMPLATE demands, and the rest.
    // No CKA_MODIFIABLE or CKA_VALUE_LEN: SoftHSM2 refuses either in an
    // unwrap template (CKR_ATTRIBUTE_READ_ONLY).
    std::vector<ck_attribute> tmpl = p11::unwrapped_kek_attributes();
    for (const ck_attribute& a : {attr(CKA_LABEL, label.data(), label.size()), attr(CKA_ID, id->data(), id->size()),
                                  flag(CKA_TOKEN, true), flag(CKA_PRIVATE, true), flag(CKA_ENCRYPT, true),
                                  flag(CKA_DECRYPT, true), flag(CKA_SIGN, false), flag(CKA_VERIFY, false)})
        tmpl.push_back(a);
    auto rv = impl_->with_key(CKO_PRIVATE_KEY, transport, [&](ck_session_handle_t s, ck_object_handle_t priv) {
        ck_mechanism oaep{CKM_RSA_PKCS_OAEP, &transfer_oaep, sizeof transfer_oaep};
        ck_object_handle_t made = 0;
        return (*impl_->module)->C_UnwrapKey(s, &oaep, priv, const_cast<std::uint8_t*>(wrapped.data()),
                                             wrapped.size(), tmpl.data(), tmpl.size(), &made);
    });
    // SoftHSM2 answers a blob that does not open with CKR_GENERAL_ERROR.
    if (rv && (*rv == CKR_GENERAL_ERROR || *rv == CKR_WRAPPED_KEY_INVALID || *rv == CKR_ENCRYPTED_DATA_INVALID ||
               *rv == CKR_WRAPPED_KEY_LEN_RANGE))
        return fail(Errc::authentication_failed, "the wrapped KEK " + kek.hex + " does not open with this host's "
                                                 "transport key (a grant for another host, or altered)");
    return call_ok(rv, "unwrapping KEK " + kek.hex);
}

Result<std::vector<Pkcs11KeyService::TrustedKey>> Pkcs11KeyService::trusted_keys()
{
    std::vector<TrustedKey> out;
    Result<void> built{};
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        auto& f = impl_->module->functions();
        ck_attribute tmpl[] = {attr(CKA_CLASS, &public_class, sizeof public_class), flag(CKA_TRUSTED, true)};
        ck_rv_t r = f.C_FindObjectsInit(s, tmpl, 2);
        if (r != CKR_OK)
            return r;
        std::vector<ck_object_handle_t> handles(64);
        unsigned long count = 0;
        r = f.C_FindObjects(s, handles.data(), handles.size(), &count);
        f.C_FindObjectsFinal(s);
        handles.resize(r == CKR_OK ? count : 0);
        out.clear();
        for (const auto h : handles) {
            ck_key_type_t type = 0;
            Bytes id(64), label(256), exponent(16);
            ck_attribute a[] = {attr(CKA_KEY_TYPE, &type, sizeof type), attr(CKA_ID, id.data(), id.size()),
                                attr(CKA_LABEL, label.data(), label.size()),
                                attr(CKA_PUBLIC_EXPONENT, exponent.data(), exponent.size())};
            if (f.C_GetAttributeValue(s, h, a, std::size(a)) != CKR_OK || type != CKK_RSA)
                continue;
            id.resize(a[1].value_len);
            label.resize(a[2].value_len);
            exponent.resize(a[3].value_len);
            Bytes modulus;
            if (modulus_of(f, s, h, modulus) != CKR_OK)
                continue;
            auto spki = p11::rsa_spki(modulus, exponent);
            if (!spki) {
                built = tl::unexpected(spki.error());
                continue;
            }
            out.push_back(TrustedKey{KeyId{to_hex(id)}, std::string(label.begin(), label.end()), std::move(*spki)});
        }
        return r;
    });
    if (auto ok = call_ok(rv, "listing the trusted keys"); !ok)
        return tl::unexpected(ok.error());
    if (!built)
        return tl::unexpected(built.error());
    return out;
}

Result<void> Pkcs11KeyService::forget_trusted_key(std::span<const std::uint8_t> transport_public)
{
    auto id = from_hex(trusted_key_id(transport_public).hex);
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        auto& f = impl_->module->functions();
        ck_object_handle_t h = 0;
        ck_rv_t r = find_first(f, s, public_class, *id, false, h);
        if (r != CKR_OK || h == 0)
            return r;
        return f.C_DestroyObject(s, h);
    });
    return call_ok(rv, "removing a trusted key");
}

// ---- the Security Officer's step ---------------------------------------------------

struct SecurityOfficer::Session {
    std::shared_ptr<p11::Module> module;
    ck_session_handle_t handle = 0;
    std::string token;
};

Result<std::unique_ptr<SecurityOfficer>> SecurityOfficer::login(
    const std::string& module_path, const std::vector<std::pair<std::string, std::string>>& environment,
    const std::string& token_label, const SecureBuffer& so_pin)
{
    auto module = p11::Module::load(module_path, environment);
    if (!module)
        return tl::unexpected(module.error());
    auto slot = (*module)->find_token(token_label);
    if (!slot)
        return tl::unexpected(slot.error());
    auto session = std::make_unique<Session>();
    session->module = *module;
    session->token = token_label;
    auto& f = **module;
    if (const ck_rv_t rv = f->C_OpenSession(*slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                                            &session->handle);
        rv != CKR_OK)
        return fail(Errc::device_error, "C_OpenSession on token '" + token_label + "' failed: " + rv_name(rv));
    const ck_rv_t rv = f->C_Login(session->handle, CKU_SO, const_cast<std::uint8_t*>(so_pin.data()), so_pin.size());
    if (rv != CKR_OK) {
        f->C_CloseSession(session->handle);
        if (rv == CKR_USER_ANOTHER_ALREADY_LOGGED_IN || rv == CKR_USER_ALREADY_LOGGED_IN)
            return fail(Errc::device_error, "token '" + token_label + "' has a user logged in from this process; "
                                            "the Security Officer logs in alone");
        Error e = login_error(rv, token_label);
        if (e.code == Errc::pin_incorrect)
            e.message = "token '" + token_label + "' rejected the Security Officer PIN (" + rv_name(rv) +
                        "); not retrying";
        return tl::unexpected(std::move(e));
    }
    return std::unique_ptr<SecurityOfficer>(new SecurityOfficer(std::move(session)));
}

SecurityOfficer::SecurityOfficer(std::unique_ptr<Session> session) : session_(std::move(session)) {}

SecurityOfficer::~SecurityOfficer()
{
    auto& f = session_->module->functions();
    f.C_Logout(session_->handle);
    f.C_CloseSession(session_->handle);
}

Result<bool> SecurityOfficer::trust(std::span<const std::uint8_t> transport_public, const std::string& label)
{
    auto key = rsa_public_of(transport_public);
    if (!key)
        return tl::unexpected(key.error());
    const KeyId kid = Pkcs11KeyService::trusted_key_id(transport_public);
    const Bytes id = *from_hex(kid.hex);
    auto& f = session_->module->functions();
    const ck_session_handle_t s = session_->handle;
    ck_object_handle_t found = 0;
    if (const ck_rv_t r = find_first(f, s, public_class, id, false, found); r != CKR_OK)
        return fail(Errc::device_error, "C_FindObjects failed: " + rv_name(r));
    if (found != 0) {
        ck_object_handle_t trusted = 0;
        if (const ck_rv_t r = find_trusted(f, s, id, *key, trusted); r != CKR_OK)
            return fail(Errc::device_error, "C_FindObjects failed: " + rv_name(r));
        if (trusted == found)
            return false;
        return fail(Errc::invalid_argument, "token '" + session_->token + "' holds another object with id " + kid.hex +
                                                ", not this key trusted; remove it (pkcs11-tool --delete-object "
                                                "--type pubkey --id " + kid.hex + ") and run this again");
    }
    ck_attribute tmpl[] = {
        attr(CKA_CLASS, &public_class, sizeof public_class),
        attr(CKA_KEY_TYPE, &rsa_type, sizeof rsa_type),
        attr(CKA_LABEL, label.data(), label.size()),
        attr(CKA_ID, id.data(), id.size()),
        attr(CKA_MODULUS, key->modulus.data(), key->modulus.size()),
        attr(CKA_PUBLIC_EXPONENT, key->exponent.data(), key->exponent.size()),
        flag(CKA_TOKEN, true),
        flag(CKA_PRIVATE, false),
        flag(CKA_MODIFIABLE, false),
        flag(CKA_TRUSTED, true),
        flag(CKA_WRAP, true),
        flag(CKA_ENCRYPT, false),
        flag(CKA_VERIFY, false),
        flag(CKA_VERIFY_RECOVER, false),
        flag(CKA_DERIVE, false),
    };
    ck_object_handle_t made = 0;
    if (const ck_rv_t r = f.C_CreateObject(s, tmpl, std::size(tmpl), &made); r != CKR_OK)
        return fail(Errc::device_error, "storing the trusted key in token '" + session_->token +
                                            "' failed: " + rv_name(r));
    return true;
}

Result<void> SecurityOfficer::forget(std::span<const std::uint8_t> transport_public)
{
    const Bytes id = *from_hex(Pkcs11KeyService::trusted_key_id(transport_public).hex);
    auto& f = session_->module->functions();
    ck_object_handle_t found = 0;
    ck_rv_t r = find_first(f, session_->handle, public_class, id, false, found);
    if (r == CKR_OK && found != 0)
        r = f.C_DestroyObject(session_->handle, found);
    if (r != CKR_OK)
        return fail(Errc::device_error, "removing the trusted key failed: " + rv_name(r));
    return {};
}

}  // namespace vaultfs::hsm
