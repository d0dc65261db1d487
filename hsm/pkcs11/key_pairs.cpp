// Pkcs11KeyService: application key pairs (hsm/key_pairs.hpp) -- RSA and EC
// keys made in the token, their public halves, signing and decryption.
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

// DER of OID 1.2.840.10045.3.1.7 (prime256v1)
constexpr std::array<std::uint8_t, 10> p256_oid_der{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

}  // namespace

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

}  // namespace

Result<Bytes> p11::rsa_spki(const Bytes& modulus, const Bytes& exponent)
{
    std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
    std::unique_ptr<BIGNUM, BnFree> n(BN_bin2bn(modulus.data(), static_cast<int>(modulus.size()), nullptr));
    std::unique_ptr<BIGNUM, BnFree> e(BN_bin2bn(exponent.data(), static_cast<int>(exponent.size()), nullptr));
    if (!bld || !n || !e)
        return fail(Errc::device_error, "out of memory building an RSA public key");
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get());
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get());
    return spki_from("RSA", bld.get());
}

namespace {

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
        // A transport key's: what every key it unwraps must be (last: no
        // other key pair carries it).
        attr(CKA_UNWRAP_TEMPLATE, p11::unwrapped_kek_attributes().data(),
             p11::unwrapped_kek_attributes().size() * sizeof(ck_attribute)),
    };
    auto rv = impl_->with_session([&](ck_session_handle_t s) {
        ck_mechanism mech{rsa ? CKM_RSA_PKCS_KEY_PAIR_GEN : CKM_EC_KEY_PAIR_GEN, nullptr, 0};
        ck_object_handle_t pub_h = 0;
        ck_object_handle_t priv_h = 0;
        const bool transport = rsa && usage.unwrap;
        return (*impl_->module)->C_GenerateKeyPair(s, &mech, pub.data(), pub.size(), priv,
                                                   std::size(priv) - (transport ? 0 : 1), &pub_h, &priv_h);
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
    if (type == CKK_RSA)
        return p11::rsa_spki(a, b);
    std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
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

}  // namespace vaultfs::hsm
