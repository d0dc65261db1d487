#include "tests/support/token_attack.hpp"

#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace vaultfs::testing {

namespace {

using Bytes = std::vector<unsigned char>;

const unsigned char yes = 1;
const unsigned char no = 0;
ck_attribute attr(ck_attribute_type_t t, const void* v, unsigned long n) { return {t, const_cast<void*>(v), n}; }
ck_attribute flag(ck_attribute_type_t t, bool on) { return attr(t, on ? &yes : &no, 1); }

std::string hex(const Bytes& b)
{
    static const char* digits = "0123456789abcdef";
    std::string s;
    for (unsigned char c : b) {
        s += digits[c >> 4];
        s += digits[c & 15];
    }
    return s;
}

Bytes unhex(const std::string& s)
{
    Bytes out;
    for (std::size_t i = 0; i + 1 < s.size(); i += 2)
        out.push_back(static_cast<unsigned char>(std::stoi(s.substr(i, 2), nullptr, 16)));
    return out;
}

// A logged-in R/W session on the token, as the attacker opens it.
class Attacker {
public:
    explicit Attacker(const TokenAccess& t)
    {
        for (const auto& [k, v] : t.environment)
            ::setenv(k.c_str(), v.c_str(), 1);
        void* handle = ::dlopen(t.module.c_str(), RTLD_NOW);
        if (handle == nullptr)
            throw std::runtime_error("cannot load " + t.module);
        auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle, "C_GetFunctionList"));
        if (get == nullptr || get(&f_) != CKR_OK)
            throw std::runtime_error(t.module + " has no function list");
        ck_c_initialize_args args{};
        args.flags = CKF_OS_LOCKING_OK;
        const ck_rv_t init = f_->C_Initialize(&args);
        if (init != CKR_OK && init != CKR_CRYPTOKI_ALREADY_INITIALIZED)
            throw std::runtime_error("C_Initialize failed");
        finalize_ = init == CKR_OK;
        unsigned long count = 0;
        f_->C_GetSlotList(1, nullptr, &count);
        std::vector<ck_slot_id_t> slots(count);
        f_->C_GetSlotList(1, slots.data(), &count);
        bool found = false;
        for (auto slot : slots) {
            ck_token_info info{};
            if (f_->C_GetTokenInfo(slot, &info) != CKR_OK)
                continue;
            std::string label(reinterpret_cast<const char*>(info.label), 32);
            label.erase(label.find_last_not_of(' ') + 1);
            if (label == t.label) {
                if (f_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s_) != CKR_OK)
                    throw std::runtime_error("C_OpenSession failed");
                found = true;
                break;
            }
        }
        if (!found)
            throw std::runtime_error("no token labelled " + t.label);
        const ck_rv_t login = f_->C_Login(s_, CKU_USER, reinterpret_cast<unsigned char*>(const_cast<char*>(t.pin.data())),
                                          t.pin.size());
        if (login != CKR_OK && login != CKR_USER_ALREADY_LOGGED_IN)
            throw std::runtime_error("C_Login failed: " + std::to_string(login));
    }
    ~Attacker()
    {
        for (auto h : made_)
            f_->C_DestroyObject(s_, h);
        f_->C_CloseSession(s_);
        if (finalize_)
            f_->C_Finalize(nullptr);
    }

    ck_function_list& f() { return *f_; }
    ck_session_handle_t s() const { return s_; }

    std::vector<ck_object_handle_t> find(const std::vector<ck_attribute>& tmpl)
    {
        std::vector<ck_object_handle_t> out(256);
        unsigned long n = 0;
        f_->C_FindObjectsInit(s_, const_cast<ck_attribute*>(tmpl.data()), tmpl.size());
        f_->C_FindObjects(s_, out.data(), out.size(), &n);
        f_->C_FindObjectsFinal(s_);
        out.resize(n);
        return out;
    }

    Bytes read(ck_object_handle_t h, ck_attribute_type_t type, ck_rv_t* rv = nullptr)
    {
        Bytes v(4096);
        ck_attribute a = attr(type, v.data(), v.size());
        const ck_rv_t r = f_->C_GetAttributeValue(s_, h, &a, 1);
        if (rv != nullptr)
            *rv = r;
        v.resize(r == CKR_OK ? a.value_len : 0);
        return v;
    }

    // An AES key the attacker knows: generated non-sensitive, so its value
    // can be read back.
    ck_object_handle_t own_aes_key(Bytes& value)
    {
        const ck_object_class_t cls = CKO_SECRET_KEY;
        const ck_key_type_t type = CKK_AES;
        const unsigned long len = 32;
        ck_attribute tmpl[] = {attr(CKA_CLASS, &cls, sizeof cls), attr(CKA_KEY_TYPE, &type, sizeof type),
                               attr(CKA_VALUE_LEN, &len, sizeof len), flag(CKA_TOKEN, false),
                               flag(CKA_SENSITIVE, false), flag(CKA_EXTRACTABLE, true), flag(CKA_WRAP, true),
                               flag(CKA_UNWRAP, true), flag(CKA_ENCRYPT, true), flag(CKA_DECRYPT, true)};
        ck_mechanism gen{CKM_AES_KEY_GEN, nullptr, 0};
        ck_object_handle_t h = 0;
        if (f_->C_GenerateKey(s_, &gen, tmpl, std::size(tmpl), &h) != CKR_OK)
            throw std::runtime_error("the attacker cannot make an AES key");
        made_.push_back(h);
        value = read(h, CKA_VALUE);
        return h;
    }

    // An RSA public key of the attacker's own, imported as a wrapping key.
    ck_object_handle_t own_rsa_key(const Bytes& modulus, const Bytes& exponent, bool trusted, ck_rv_t* rv = nullptr)
    {
        const ck_object_class_t cls = CKO_PUBLIC_KEY;
        const ck_key_type_t type = CKK_RSA;
        std::vector<ck_attribute> tmpl{attr(CKA_CLASS, &cls, sizeof cls),
                                       attr(CKA_KEY_TYPE, &type, sizeof type),
                                       attr(CKA_MODULUS, modulus.data(), modulus.size()),
                                       attr(CKA_PUBLIC_EXPONENT, exponent.data(), exponent.size()),
                                       flag(CKA_TOKEN, false),
                                       flag(CKA_WRAP, true),
                                       flag(CKA_ENCRYPT, true)};
        if (trusted)
            tmpl.push_back(flag(CKA_TRUSTED, true));
        ck_object_handle_t h = 0;
        const ck_rv_t r = f_->C_CreateObject(s_, tmpl.data(), tmpl.size(), &h);
        if (rv != nullptr)
            *rv = r;
        if (r == CKR_OK)
            made_.push_back(h);
        return r == CKR_OK ? h : 0;
    }

    void keep(ck_object_handle_t h) { made_.push_back(h); }

private:
    ck_function_list* f_ = nullptr;
    ck_session_handle_t s_ = 0;
    bool finalize_ = false;
    std::vector<ck_object_handle_t> made_;
};

struct RsaPair {
    EVP_PKEY* key = nullptr;
    Bytes modulus, exponent;
    RsaPair()
    {
        EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr);
        EVP_PKEY_keygen_init(ctx);
        EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 2048);
        EVP_PKEY_generate(ctx, &key);
        EVP_PKEY_CTX_free(ctx);
        BIGNUM* n = nullptr;
        BIGNUM* e = nullptr;
        EVP_PKEY_get_bn_param(key, "n", &n);
        EVP_PKEY_get_bn_param(key, "e", &e);
        modulus.resize(BN_num_bytes(n));
        exponent.resize(BN_num_bytes(e));
        BN_bn2bin(n, modulus.data());
        BN_bn2bin(e, exponent.data());
        BN_free(n);
        BN_free(e);
    }
    ~RsaPair() { EVP_PKEY_free(key); }
};

// AES-KWP (RFC 5649) unwrap with OpenSSL: the attacker opens the blob offline.
std::size_t open_kwp(const Bytes& kek, const Bytes& blob)
{
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    Bytes out(blob.size() + 16);
    int len = 0;
    int total = 0;
    if (EVP_DecryptInit_ex(ctx, EVP_aes_256_wrap_pad(), nullptr, kek.data(), nullptr) == 1 &&
        EVP_DecryptUpdate(ctx, out.data(), &len, blob.data(), static_cast<int>(blob.size())) == 1) {
        total = len;
        if (EVP_DecryptFinal_ex(ctx, out.data() + len, &len) == 1)
            total += len;
    } else {
        total = 0;
    }
    EVP_CIPHER_CTX_free(ctx);
    return static_cast<std::size_t>(total);
}

}  // namespace

std::vector<KeyUnderAttack> attack_every_key(const TokenAccess& token)
{
    Attacker a(token);
    Bytes wrapper_value;
    const ck_object_handle_t wrapper = a.own_aes_key(wrapper_value);
    RsaPair rsa;
    const ck_object_handle_t rsa_wrapper = a.own_rsa_key(rsa.modulus, rsa.exponent, false);
    std::vector<KeyUnderAttack> out;
    for (const ck_object_class_t cls : {CKO_SECRET_KEY, CKO_PRIVATE_KEY}) {
        for (const auto h : a.find({attr(CKA_CLASS, &cls, sizeof cls), flag(CKA_TOKEN, true)})) {
            KeyUnderAttack k;
            k.cls = cls;
            k.id = hex(a.read(h, CKA_ID));
            const Bytes label = a.read(h, CKA_LABEL);
            k.label.assign(label.begin(), label.end());
            ck_rv_t rv = CKR_OK;
            a.read(h, CKA_VALUE, &rv);
            if (rv == CKR_ATTRIBUTE_TYPE_INVALID)  // an RSA private key's secret
                a.read(h, CKA_PRIVATE_EXPONENT, &rv);
            k.value_rv = rv;
            Bytes blob(8192);
            unsigned long len = blob.size();
            ck_mechanism kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
            k.wrap_aes_rv = a.f().C_WrapKey(a.s(), &kwp, wrapper, h, blob.data(), &len);
            if (k.wrap_aes_rv == CKR_MECHANISM_INVALID) {
                ck_mechanism kw{CKM_AES_KEY_WRAP, nullptr, 0};
                len = blob.size();
                k.wrap_aes_rv = a.f().C_WrapKey(a.s(), &kw, wrapper, h, blob.data(), &len);
                if (k.wrap_aes_rv == CKR_OK)
                    k.recovered_bytes = len;  // (not opened: that it came out is enough)
            }
            if (k.wrap_aes_rv == CKR_MECHANISM_INVALID) {  // openCryptoki 3.8 wraps with CBC-PAD only
                unsigned char iv[16] = {};
                ck_mechanism cbc{CKM_AES_CBC_PAD, iv, sizeof iv};
                len = blob.size();
                k.wrap_aes_rv = a.f().C_WrapKey(a.s(), &cbc, wrapper, h, blob.data(), &len);
                if (k.wrap_aes_rv == CKR_OK)
                    k.recovered_bytes = len;  // (not opened: that it came out is enough)
            }
            if (k.wrap_aes_rv == CKR_OK && k.recovered_bytes == 0) {
                blob.resize(len);
                k.recovered_bytes = open_kwp(wrapper_value, blob);
            }
            if (cls == CKO_SECRET_KEY && rsa_wrapper != 0) {
                ck_rsa_pkcs_oaep_params p{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};
                ck_mechanism oaep{CKM_RSA_PKCS_OAEP, &p, sizeof p};
                len = 8192;
                blob.resize(len);
                k.wrap_rsa_rv = a.f().C_WrapKey(a.s(), &oaep, rsa_wrapper, h, blob.data(), &len);
            }
            out.push_back(std::move(k));
        }
    }
    return out;
}

TrustAttack attack_trust(const TokenAccess& token)
{
    Attacker a(token);
    RsaPair rsa;
    TrustAttack out;
    ck_rv_t rv = CKR_OK;
    a.own_rsa_key(rsa.modulus, rsa.exponent, true, &rv);
    out.own_key_rv = rv;
    const ck_object_class_t cls = CKO_PUBLIC_KEY;
    for (const auto h : a.find({attr(CKA_CLASS, &cls, sizeof cls), flag(CKA_TRUSTED, true)})) {
        ck_attribute tmpl[] = {attr(CKA_MODULUS, rsa.modulus.data(), rsa.modulus.size()), flag(CKA_TOKEN, false)};
        ck_object_handle_t copy = 0;
        const ck_rv_t r = a.f().C_CopyObject(a.s(), h, tmpl, std::size(tmpl), &copy);
        if (r == CKR_OK)
            a.keep(copy);
        out.copy_rvs.push_back(r);
    }
    return out;
}

UnwrapAttack attack_unwrap(const TokenAccess& token, const std::string& transport_id, const Bytes& wrapped)
{
    Attacker a(token);
    const ck_object_class_t priv = CKO_PRIVATE_KEY;
    const Bytes id = unhex(transport_id);
    const auto found = a.find({attr(CKA_CLASS, &priv, sizeof priv), attr(CKA_ID, id.data(), id.size())});
    if (found.empty())
        throw std::runtime_error("no transport key " + transport_id);
    const ck_object_class_t secret = CKO_SECRET_KEY;
    const ck_key_type_t aes = CKK_AES;
    ck_attribute tmpl[] = {attr(CKA_CLASS, &secret, sizeof secret), attr(CKA_KEY_TYPE, &aes, sizeof aes),
                           flag(CKA_TOKEN, false), flag(CKA_SENSITIVE, false), flag(CKA_EXTRACTABLE, true)};
    ck_rsa_pkcs_oaep_params p{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};
    ck_mechanism oaep{CKM_RSA_PKCS_OAEP, &p, sizeof p};
    ck_object_handle_t h = 0;
    UnwrapAttack out;
    out.unwrap_rv = a.f().C_UnwrapKey(a.s(), &oaep, found[0], const_cast<unsigned char*>(wrapped.data()),
                                      wrapped.size(), tmpl, std::size(tmpl), &h);
    if (out.unwrap_rv == CKR_OK) {
        a.keep(h);
        ck_rv_t rv = CKR_OK;
        a.read(h, CKA_VALUE, &rv);
        out.value_rv = rv;
    }
    return out;
}

unsigned long plant_exposed_kek(const TokenAccess& token, const std::string& kek_id)
{
    Attacker a(token);
    const ck_object_class_t cls = CKO_SECRET_KEY;
    const Bytes id = unhex(kek_id);
    const auto found = a.find({attr(CKA_CLASS, &cls, sizeof cls), attr(CKA_ID, id.data(), id.size())});
    if (found.size() != 1)
        throw std::runtime_error("no KEK " + kek_id);
    const Bytes label = a.read(found[0], CKA_LABEL);
    if (const ck_rv_t r = a.f().C_DestroyObject(a.s(), found[0]); r != CKR_OK)
        return r;
    const ck_key_type_t type = CKK_AES;
    const unsigned long len = 32;
    ck_attribute tmpl[] = {attr(CKA_CLASS, &cls, sizeof cls), attr(CKA_KEY_TYPE, &type, sizeof type),
                           attr(CKA_VALUE_LEN, &len, sizeof len), attr(CKA_ID, id.data(), id.size()),
                           attr(CKA_LABEL, label.data(), label.size()), flag(CKA_TOKEN, true),
                           flag(CKA_PRIVATE, true), flag(CKA_SENSITIVE, true), flag(CKA_EXTRACTABLE, true),
                           flag(CKA_ENCRYPT, true), flag(CKA_DECRYPT, true), flag(CKA_WRAP, false),
                           flag(CKA_UNWRAP, false), flag(CKA_SIGN, false), flag(CKA_VERIFY, false),
                           flag(CKA_DERIVE, false)};
    ck_mechanism gen{CKM_AES_KEY_GEN, nullptr, 0};
    ck_object_handle_t h = 0;
    return a.f().C_GenerateKey(a.s(), &gen, tmpl, std::size(tmpl), &h);
}

}  // namespace vaultfs::testing
