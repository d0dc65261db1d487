#include "vault/audit/format.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <ctime>

#include "vault/crypto/signing.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit {

namespace {

using json = nlohmann::json;

constexpr std::string_view hash_key = ",\"hash\":\"";
constexpr std::string_view sig_key = "\",\"sig\":\"";
constexpr std::size_t hash_hex = 64;
// A signature is ECDSA P-256 r | s (64 bytes) or RSA-PSS with a 3072-bit key
// (384 bytes): hsm/pkcs11/mechanisms.hpp.
constexpr std::array<std::size_t, 2> sig_hex_sizes{128, 768};
// ,"hash":"H"}  and  ,"hash":"H","sig":"S"}
constexpr std::size_t unsigned_suffix = hash_key.size() + hash_hex + 2;
constexpr std::size_t signed_suffix(std::size_t sig_hex) { return hash_key.size() + hash_hex + sig_key.size() + sig_hex + 2; }

constexpr std::array<std::string_view, 7> signed_ops{"init",     "start",    "checkpoint", "rotate",
                                                     "shutdown", "handover", "acknowledge"};
// Everything else a record may be about (docs/audit.md "The audit trail").
constexpr std::array<std::string_view, 56> record_ops{
    "get",        "set",        "commit",       "list",         "delete",       "recover",   "purge",
    "policy_get", "policy_set", "policy_reset", "xattr_get",    "xattr_list",   "xattr_set", "vault_create",
    "vault_remove", "vault_set", "vault_show",  "vault_list",   "status",       "backup",    "restore",
    "control",    "lookup",     "repeats",      "rename",       "chmod",        "chown",
    // keys and certificates (vault/keys, vault/certificates)
    "key_create", "key_rotate", "key_policy", "key_get", "key_sign", "key_decrypt", "key_unwrap",
    "key_near_expiry", "cert_create", "cert_renew", "cert_merge", "cert_import", "cert_get", "cert_issue",
    // several hosts (vault/hosts): the ceremony, KEKs imported from grants,
    // handed on to trusted hosts, or dropped once no vault uses them, and
    // the transport keys a token's Security Officer trusted or untrusted
    "host_request", "host_grant", "host_accept", "host_remove", "kek_import", "kek_grant", "kek_retire",
    "host_trust", "host_untrust",
    // a vault moved to a new KEK (vault/kek)
    "vault_rekey",
    // an on_change hook fired (vault/hooks)
    "hook",
    // expiry warnings (vault/monitor/expiry)
    "near_expiry", "expired",
    // `vaultfs metrics` (fs/control/metrics)
    "metrics",
    // what became of a commit the database did not confirm (vault/store)
    "commit_outcome"};

bool plain(std::string_view s)
{
    return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c <= 0x7e && c != '"' && c != '\\'; });
}

bool lower_hex(std::string_view s)
{
    return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

}  // namespace

bool is_signed_op(std::string_view op)
{
    return std::find(signed_ops.begin(), signed_ops.end(), op) != signed_ops.end();
}

bool is_known_op(std::string_view op)
{
    return is_signed_op(op) || std::find(record_ops.begin(), record_ops.end(), op) != record_ops.end();
}

std::string time_text(Micros t)
{
    const std::time_t secs = static_cast<std::time_t>(t / 1000000);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<long long>(t % 1000000));
    return buf;
}

std::optional<Micros> parse_time(std::string_view text)
{
    // Exactly what time_text() writes.
    if (text.size() != 27 || text[4] != '-' || text[7] != '-' || text[10] != 'T' || text[13] != ':' ||
        text[16] != ':' || text[19] != '.' || text[26] != 'Z')
        return std::nullopt;
    const auto digits = [&](std::size_t at, std::size_t n) -> std::optional<long long> {
        long long v = 0;
        for (std::size_t i = at; i < at + n; ++i) {
            if (text[i] < '0' || text[i] > '9')
                return std::nullopt;
            v = v * 10 + (text[i] - '0');
        }
        return v;
    };
    const auto y = digits(0, 4), mo = digits(5, 2), d = digits(8, 2), h = digits(11, 2), mi = digits(14, 2),
               s = digits(17, 2), us = digits(20, 6);
    if (!y || !mo || !d || !h || !mi || !s || !us || *mo < 1 || *mo > 12 || *d < 1 || *d > 31 || *h > 23 ||
        *mi > 59 || *s > 60)
        return std::nullopt;
    std::tm tm{};
    tm.tm_year = static_cast<int>(*y - 1900);
    tm.tm_mon = static_cast<int>(*mo - 1);
    tm.tm_mday = static_cast<int>(*d);
    tm.tm_hour = static_cast<int>(*h);
    tm.tm_min = static_cast<int>(*mi);
    tm.tm_sec = static_cast<int>(*s);
    return static_cast<Micros>(::timegm(&tm)) * 1000000 + *us;
}

const std::string& genesis_hash()
{
    static const std::string zeros(64, '0');
    return zeros;
}

// ---- writing -------------------------------------------------------------------------

void Body::key(std::string_view k)
{
    if (out_.size() > 1)
        out_ += ',';
    out_ += '"';
    out_ += k;
    out_ += "\":";
}

Body& Body::text(std::string_view k, std::string_view v)
{
    key(k);
    if (v.empty())
        out_ += "null";
    else if (plain(v))
        (out_ += '"').append(v) += '"';
    else
        out_ += json(std::string(v)).dump(-1, ' ', false, json::error_handler_t::replace);
    return *this;
}

Body& Body::number(std::string_view k, std::optional<std::uint64_t> v)
{
    key(k);
    out_ += v ? std::to_string(*v) : std::string("null");
    return *this;
}

Body& Body::integer(std::string_view k, std::int64_t v)
{
    key(k);
    out_ += std::to_string(v);
    return *this;
}

Body& Body::boolean(std::string_view k, bool v)
{
    key(k);
    out_ += v ? "true" : "false";
    return *this;
}

Body& Body::value(std::string_view k, const Value& v)
{
    std::visit(
        [&](const auto& x) {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, std::string>)
                text(k, x);
            else if constexpr (std::is_same_v<T, std::int64_t>)
                integer(k, x);
            else if constexpr (std::is_same_v<T, std::uint64_t>)
                number(k, x);
            else if constexpr (std::is_same_v<T, bool>)
                boolean(k, x);
            else
                text(k, "");
        },
        v);
    return *this;
}

std::string Body::finish() &&
{
    out_ += '}';
    return std::move(out_);
}

std::array<std::uint8_t, 32> body_digest(std::string_view body) { return sha256(body); }

SealedLine seal(std::string_view body, std::span<const std::uint8_t> sig)
{
    SealedLine out;
    out.hash = sha256_hex(body);
    out.text.reserve(body.size() + signed_suffix(sig.size() * 2));
    out.text.append(body.substr(0, body.size() - 1));
    out.text += hash_key;
    out.text += out.hash;
    if (!sig.empty()) {
        out.text += sig_key;
        out.text += to_hex(sig);
    }
    out.text += "\"}";
    return out;
}

// ---- reading -------------------------------------------------------------------------

// The signature's length in hex when `line` ends in a hash and a signature.
std::size_t signature_hex_size(std::string_view line)
{
    for (const std::size_t sig_hex : sig_hex_sizes) {
        const std::size_t suffix = signed_suffix(sig_hex);
        if (line.size() > suffix && line.substr(line.size() - 2) == "\"}" &&
            line.substr(line.size() - suffix, hash_key.size()) == hash_key &&
            line.substr(line.size() - suffix + hash_key.size() + hash_hex, sig_key.size()) == sig_key)
            return sig_hex;
    }
    return 0;
}

bool looks_signed(std::string_view line) { return signature_hex_size(line) != 0; }

std::optional<std::uint64_t> Record::count(const char* key) const
{
    const auto it = fields.find(key);
    if (it == fields.end() || !it->is_number_unsigned())
        return std::nullopt;
    return it->get<std::uint64_t>();
}

tl::expected<Record, std::string> parse(std::string_view line)
{
    const auto bad = [](std::string why) { return tl::unexpected<std::string>(std::move(why)); };
    Record r;
    std::size_t suffix = 0;
    std::string_view sig_text;
    if (const std::size_t sig_hex = signature_hex_size(line); sig_hex != 0) {
        suffix = signed_suffix(sig_hex);
        sig_text = line.substr(line.size() - sig_hex - 2, sig_hex);
    } else if (line.size() > unsigned_suffix && line.substr(line.size() - 2) == "\"}" &&
               line.substr(line.size() - unsigned_suffix, hash_key.size()) == hash_key) {
        suffix = unsigned_suffix;
    } else {
        return bad("not a valid audit record (edited): it does not end in its hash");
    }
    const std::string_view hash = line.substr(line.size() - suffix + hash_key.size(), hash_hex);
    if (!lower_hex(hash) || !lower_hex(sig_text))
        return bad("not a valid audit record (edited): its hash or signature is not hexadecimal");
    r.body.assign(line.substr(0, line.size() - suffix));
    r.body += '}';
    r.hash.assign(hash);
    if (sha256_hex(r.body) != r.hash)
        return bad("record edited: its hash does not match its bytes");
    if (!sig_text.empty())
        r.sig = *from_hex(sig_text);

    r.fields = json::parse(r.body, nullptr, false);
    if (r.fields.is_discarded() || !r.fields.is_object())
        return bad("not a valid audit record (edited): the body is not a JSON object");
    const auto& f = r.fields;
    if (f.contains("hash") || f.contains("sig"))
        return bad("not a valid audit record (edited): a second hash or signature in the body");
    const auto seq = f.find("seq");
    const auto prev = f.find("prev");
    const auto op = f.find("op");
    const auto time = f.find("time");
    if (seq == f.end() || !seq->is_number_unsigned() || prev == f.end() || !prev->is_string() || op == f.end() ||
        !op->is_string() || time == f.end() || !time->is_string())
        return bad("not a valid audit record (edited): seq, time, op or prev is missing");
    r.seq = seq->get<std::uint64_t>();
    r.prev = prev->get<std::string>();
    r.op = op->get<std::string>();
    const auto t = parse_time(time->get<std::string>());
    if (!t)
        return bad("not a valid audit record (edited): its time is malformed");
    r.time = *t;
    return r;
}

std::array<std::uint8_t, 32> anchor_digest(const AuditAnchor& a)
{
    return sha256("vaultfs-audit-anchor/2 seq=" + std::to_string(a.seq) + " hash=" + a.hash +
                  " clean=" + (a.clean_shutdown ? "1" : "0") + " time=" + std::to_string(a.time) +
                  " file_start=" + std::to_string(a.file_start));
}

}  // namespace vaultfs::vault::audit
