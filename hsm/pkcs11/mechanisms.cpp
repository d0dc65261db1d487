#include "hsm/pkcs11/mechanisms.hpp"

#define CRYPTOKI_GNU 1
#include <p11-kit/pkcs11.h>

#include <cstdio>

namespace vaultfs::hsm {

namespace {

struct Need {
    unsigned long mechanism;
    unsigned long flags;
    unsigned long bits = 0;
};

// What each construction asks of the token (mechanisms.hpp).
std::vector<Need> needs(SealScheme s)
{
    switch (s) {
    case SealScheme::aes_gcm:
        return {{CKM_AES_KEY_GEN, CKF_GENERATE}, {CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT}};
    case SealScheme::aes_cbc_hmac:
        return {{CKM_AES_KEY_GEN, CKF_GENERATE},
                {CKM_AES_CBC_PAD, CKF_ENCRYPT | CKF_DECRYPT},
                {CKM_GENERIC_SECRET_KEY_GEN, CKF_GENERATE},
                {CKM_SHA256_HMAC, CKF_SIGN | CKF_VERIFY}};
    }
    return {};
}

std::vector<Need> needs(SignatureScheme s)
{
    switch (s) {
    case SignatureScheme::ecdsa_p256:
        return {{CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 256}, {CKM_ECDSA, CKF_SIGN, 256}};
    case SignatureScheme::rsa_pss_sha256:
        return {{CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 3072}, {CKM_RSA_PKCS_PSS, CKF_SIGN, 3072}};
    }
    return {};
}

std::vector<unsigned long> missing(const TokenProfile& token, const std::vector<Need>& list)
{
    std::vector<unsigned long> out;
    for (const auto& n : list)
        if (!token.offers(n.mechanism, n.flags, n.bits))
            out.push_back(n.mechanism);
    return out;
}

std::string joined(const std::vector<unsigned long>& mechanisms)
{
    std::string s;
    for (std::size_t i = 0; i < mechanisms.size(); ++i) {
        if (i > 0)
            s += i + 1 == mechanisms.size() ? " and " : ", ";
        s += mechanism_name(mechanisms[i]);
    }
    return s;
}

std::string_view described(SealScheme s)
{
    return s == SealScheme::aes_gcm ? "AES-256-GCM" : "AES-256-CBC-PAD + HMAC-SHA256 (encrypt-then-MAC, two keys)";
}

std::string_view described(SignatureScheme s)
{
    return s == SignatureScheme::ecdsa_p256 ? "ECDSA P-256" : "RSA-PSS (RSA-3072, SHA-256)";
}

}  // namespace

std::string_view to_string(SealScheme s) { return s == SealScheme::aes_gcm ? "aes-gcm" : "aes-cbc-pad+hmac-sha256"; }
std::string_view to_string(SignatureScheme s)
{
    return s == SignatureScheme::ecdsa_p256 ? "ecdsa-p256" : "rsa-pss-sha256";
}

std::optional<SealScheme> seal_scheme_from(std::string_view text)
{
    for (const auto s : {SealScheme::aes_gcm, SealScheme::aes_cbc_hmac})
        if (to_string(s) == text)
            return s;
    return std::nullopt;
}

std::optional<SignatureScheme> signature_scheme_from(std::string_view text)
{
    for (const auto s : {SignatureScheme::ecdsa_p256, SignatureScheme::rsa_pss_sha256})
        if (to_string(s) == text)
            return s;
    return std::nullopt;
}

bool TokenProfile::offers(unsigned long mechanism, unsigned long flags, unsigned long bits) const
{
    const auto it = mechanisms.find(mechanism);
    if (it == mechanisms.end() || (it->second.flags & flags) != flags)
        return false;
    // Some tokens report 0 for "any size", and tokens disagree on whether EC
    // sizes are in bits or bytes: for EC sizes (at most 521 bits) accept
    // either unit.
    if (bits == 0 || it->second.max_bits == 0)
        return true;
    const auto in = [&](unsigned long b) { return it->second.min_bits <= b && b <= it->second.max_bits; };
    return in(bits) || (bits <= 521 && in((bits + 7) / 8));
}

std::string TokenProfile::name() const
{
    std::string what = manufacturer;
    if (!model.empty())
        what += (what.empty() ? "" : " ") + model;
    return "token '" + label + "'" + (what.empty() ? "" : " (" + what + ")");
}

Result<Negotiated> negotiate(const TokenProfile& token)
{
    Negotiated out;
    const auto gcm = missing(token, needs(SealScheme::aes_gcm));
    if (!gcm.empty()) {
        const auto cbc = missing(token, needs(SealScheme::aes_cbc_hmac));
        if (!cbc.empty())
            return fail(Errc::mechanism_unsupported,
                        token.name() + " cannot seal keys for vaultfs: it lacks " + joined(gcm) +
                            " (for AES-GCM) and " + joined(cbc) + " (for AES-CBC-PAD + HMAC-SHA256)");
        out.schemes.seal = SealScheme::aes_cbc_hmac;
        out.notes.push_back(token.name() + " lacks " + joined(gcm) + "; vaultfs will seal DEKs with " +
                            std::string(described(SealScheme::aes_cbc_hmac)));
    }
    const auto ec = missing(token, needs(SignatureScheme::ecdsa_p256));
    if (!ec.empty()) {
        const auto rsa = missing(token, needs(SignatureScheme::rsa_pss_sha256));
        if (!rsa.empty())
            return fail(Errc::mechanism_unsupported,
                        token.name() + " cannot sign the audit trail: it lacks " + joined(ec) +
                            " (for ECDSA P-256) and " + joined(rsa) + " (for RSA-PSS with 3072-bit keys)");
        out.schemes.signature = SignatureScheme::rsa_pss_sha256;
        out.notes.push_back(token.name() + " lacks " + joined(ec) + " for P-256; vaultfs will sign the audit trail with " +
                            std::string(described(SignatureScheme::rsa_pss_sha256)));
    }
    return out;
}

Result<void> check_schemes(const TokenProfile& token, const Schemes& schemes)
{
    if (const auto m = missing(token, needs(schemes.seal)); !m.empty())
        return fail(Errc::mechanism_unsupported, token.name() + " lacks " + joined(m) + ", which this state's token_seal = " +
                                                     std::string(to_string(schemes.seal)) + " needs");
    if (const auto m = missing(token, needs(schemes.signature)); !m.empty())
        return fail(Errc::mechanism_unsupported, token.name() + " lacks " + joined(m) +
                                                     ", which this state's token_signature = " +
                                                     std::string(to_string(schemes.signature)) + " needs");
    return {};
}

Result<void> check_key_pair(const TokenProfile& token, KeyType type, KeyUsage usage)
{
    std::vector<Need> list;
    if (is_rsa(type)) {
        const unsigned long bits = type == KeyType::rsa_2048 ? 2048 : type == KeyType::rsa_3072 ? 3072 : 4096;
        list.push_back({CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, bits});
        if (usage.sign) {
            list.push_back({CKM_RSA_PKCS, CKF_SIGN, bits});      // RS256/384/512
            list.push_back({CKM_RSA_PKCS_PSS, CKF_SIGN, bits});  // PS256/384/512
        }
        if (usage.decrypt) {
            list.push_back({CKM_RSA_PKCS, CKF_DECRYPT, bits});  // RSA1_5
            // RSA-OAEP; OAEP with SHA-2 falls back to raw RSA where needed.
            if (!token.offers(CKM_RSA_PKCS_OAEP, CKF_DECRYPT, bits))
                list.push_back({CKM_RSA_X_509, CKF_DECRYPT, bits});
        }
    } else {
        const unsigned long bits = type == KeyType::ec_p256 ? 256 : type == KeyType::ec_p384 ? 384 : 521;
        list.push_back({CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, bits});
        if (usage.sign)
            list.push_back({CKM_ECDSA, CKF_SIGN, bits});
    }
    if (const auto m = missing(token, list); !m.empty())
        return fail(Errc::mechanism_unsupported, token.name() + " cannot make " + std::string(to_string(type)) +
                                                     " keys" + (usage.sign ? " that sign" : "") +
                                                     (usage.decrypt ? (usage.sign ? " and decrypt" : " that decrypt") : "") +
                                                     ": it lacks " + joined(m));
    return {};
}

std::string mechanism_name(unsigned long m)
{
    switch (m) {
    case CKM_AES_KEY_GEN: return "CKM_AES_KEY_GEN";
    case CKM_AES_GCM: return "CKM_AES_GCM";
    case CKM_AES_CBC_PAD: return "CKM_AES_CBC_PAD";
    case CKM_AES_KEY_WRAP_PAD: return "CKM_AES_KEY_WRAP_PAD";
    case CKM_GENERIC_SECRET_KEY_GEN: return "CKM_GENERIC_SECRET_KEY_GEN";
    case CKM_SHA256_HMAC: return "CKM_SHA256_HMAC";
    case CKM_EC_KEY_PAIR_GEN: return "CKM_EC_KEY_PAIR_GEN";
    case CKM_ECDSA: return "CKM_ECDSA";
    case CKM_RSA_PKCS_KEY_PAIR_GEN: return "CKM_RSA_PKCS_KEY_PAIR_GEN";
    case CKM_RSA_PKCS: return "CKM_RSA_PKCS";
    case CKM_RSA_PKCS_PSS: return "CKM_RSA_PKCS_PSS";
    case CKM_RSA_PKCS_OAEP: return "CKM_RSA_PKCS_OAEP";
    case CKM_RSA_X_509: return "CKM_RSA_X_509";
    default: {
        char buf[32];
        std::snprintf(buf, sizeof buf, "mechanism 0x%lx", m);
        return buf;
    }
    }
}

}  // namespace vaultfs::hsm
