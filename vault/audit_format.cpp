#include "vault/audit_format.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <ctime>

namespace vaultfs::vault {

std::string audit_time(Micros t)
{
    const std::time_t secs = static_cast<std::time_t>(t / 1000000);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(t % 1000000));
    return buf;
}

const std::string& genesis_hash()
{
    static const std::string zeros(64, '0');
    return zeros;
}

std::string canonical(const nlohmann::json& record)
{
    return record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::array<std::uint8_t, 32> sha256(std::string_view data)
{
    // Fetched once: an implicit fetch costs a provider lookup per digest.
    static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    std::array<std::uint8_t, 32> out{};
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), out.data(), &len, md, nullptr);
    return out;
}

std::string sha256_hex(std::string_view data)
{
    const auto d = sha256(data);
    return to_hex(d);
}

P256Verifier::P256Verifier(const std::string& pem)
{
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    if (bio != nullptr) {
        key_ = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
        BIO_free(bio);
    }
}

P256Verifier::~P256Verifier() { EVP_PKEY_free(key_); }

bool P256Verifier::verify(const std::array<std::uint8_t, 32>& digest, std::span<const std::uint8_t> sig) const
{
    if (key_ == nullptr || sig.size() != 64)
        return false;
    // OpenSSL wants DER; the token gives r | s.
    ECDSA_SIG* es = ECDSA_SIG_new();
    BIGNUM* r = BN_bin2bn(sig.data(), 32, nullptr);
    BIGNUM* s = BN_bin2bn(sig.data() + 32, 32, nullptr);
    if (es == nullptr || r == nullptr || s == nullptr || ECDSA_SIG_set0(es, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(es);
        return false;
    }
    unsigned char* der = nullptr;
    const int der_len = i2d_ECDSA_SIG(es, &der);
    ECDSA_SIG_free(es);
    if (der_len <= 0)
        return false;
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key_, nullptr);
    const bool ok = ctx != nullptr && EVP_PKEY_verify_init(ctx) == 1 &&
                    EVP_PKEY_verify(ctx, der, static_cast<std::size_t>(der_len), digest.data(), digest.size()) == 1;
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(der);
    return ok;
}

namespace {

bool plain(std::string_view s)
{
    for (const char c : s)
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
            return false;
    return true;
}

void put_key(std::string& out, const char* key)
{
    out += '"';
    out += key;
    out += "\":";
}

void put_string(std::string& out, const char* key, std::string_view value)
{
    put_key(out, key);
    if (value.empty()) {
        out += "null";
    } else {
        out += '"';
        out += value;
        out += '"';
    }
    out += ',';
}

void put_number(std::string& out, const char* key, std::optional<std::uint64_t> value)
{
    put_key(out, key);
    out += value ? std::to_string(*value) : std::string("null");
    out += ',';
}

}  // namespace

nlohmann::json to_json(const RecordFields& f)
{
    const auto nullable = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
    nlohmann::json r;
    r["time"] = f.time;
    r["op"] = f.op;
    r["vault"] = nullable(f.vault);
    r["secret"] = nullable(f.secret);
    r["version"] = f.version ? nlohmann::json(*f.version) : nlohmann::json(nullptr);
    r["uid"] = f.uid;
    r["gid"] = f.gid;
    r["pid"] = f.pid;
    r["exe"] = nullable(f.exe);
    r["decision"] = f.allowed ? "allow" : "deny";
    r["rule"] = nullable(f.rule);
    r["result"] = f.result.empty() ? std::string("ok") : f.result;
    r["bytes"] = f.bytes ? nlohmann::json(*f.bytes) : nlohmann::json(nullptr);
    if (!f.reason.empty())
        r["reason"] = f.reason;
    if (!f.attribute.empty())
        r["attribute"] = f.attribute;
    return r;
}

std::optional<SealedRecord> render_fast(const RecordFields& f, std::uint64_t seq, const std::string& prev)
{
    for (const std::string* s : {&f.time, &f.op, &f.vault, &f.secret, &f.exe, &f.rule, &f.result, &f.reason,
                                 &f.attribute, &prev})
        if (!plain(*s))
            return std::nullopt;
    if (f.pid < 0)
        return std::nullopt;
    // Keys in sorted order, as nlohmann's std::map keeps them; "hash" goes
    // between "gid" and "op".
    std::string head;
    head.reserve(512);
    head += '{';
    if (!f.attribute.empty())
        put_string(head, "attribute", f.attribute);
    put_number(head, "bytes", f.bytes);
    put_string(head, "decision", f.allowed ? "allow" : "deny");
    put_string(head, "exe", f.exe);
    put_number(head, "gid", f.gid);
    std::string tail;
    tail.reserve(512);
    put_string(tail, "op", f.op);
    put_number(tail, "pid", static_cast<std::uint64_t>(f.pid));
    put_string(tail, "prev", prev);
    if (!f.reason.empty())
        put_string(tail, "reason", f.reason);
    put_string(tail, "result", f.result.empty() ? std::string_view("ok") : std::string_view(f.result));
    put_string(tail, "rule", f.rule);
    put_string(tail, "secret", f.secret);
    put_number(tail, "seq", seq);
    put_string(tail, "time", f.time);
    put_number(tail, "uid", f.uid);
    put_string(tail, "vault", f.vault);
    put_number(tail, "version", f.version);
    tail.back() = '}';

    const std::string hash = sha256_hex(head + tail);
    SealedRecord out;
    out.hash = hash;
    out.line.reserve(head.size() + tail.size() + 80);
    out.line += head;
    out.line += "\"hash\":\"";
    out.line += hash;
    out.line += "\",";
    out.line += tail;
    return out;
}

tl::expected<SealedRecord, std::string> seal_record(nlohmann::json& record, const SignDigest& sign)
{
    record.erase("hash");
    record.erase("sig");
    if (sign) {
        const auto digest = sha256(canonical(record));
        auto sig = sign(std::span<const std::uint8_t, 32>(digest));
        if (!sig)
            return tl::unexpected(sig.error().message);
        record["sig"] = to_hex(*sig);
    }
    const std::string hash = sha256_hex(canonical(record));
    record["hash"] = hash;
    return SealedRecord{canonical(record), hash};
}

}  // namespace vaultfs::vault
