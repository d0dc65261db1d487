// audit/format: the on-disk form of an audit record (format 2), shared by
// the writer, the daemon's start-up check and `vaultfs audit verify`.
//
//   line = body without its closing '}' + ,"hash":"H" [+ ,"sig":"S"] + '}'
//   body = the record's fields as one JSON object, exactly the bytes written
//   H    = hex(SHA-256(body)) -- of those bytes, never of a re-serialisation:
//          a change of whitespace or key order breaks it
//   S    = hex(r | s), ECDSA P-256 by the token's audit key over the 32
//          bytes of H (signed records only)
//
// Every record has `seq` (1, 2, ...), `time` (UTC, µs), `op` and `prev` (the
// previous record's H; 64 zeros before the first). Signed records (init,
// start, checkpoint, rotate, shutdown, handover, acknowledge) also carry `records` (unsigned
// records since the previous signature) and the coverage bound that holds
// until the next signature: `bound_records` and `bound_seconds`.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

#include "vault/model/types.hpp"

namespace vaultfs::vault {
struct AuditAnchor;
}

namespace vaultfs::vault::audit {

// When the audit file is synced: after every record (`always`), or every
// audit_sync_interval (`interval`; config key audit_sync).
enum class AuditSync { always, interval };

// The most any state may declare: a stretch of unsigned records between two
// signatures is at most `records` long and `seconds` wide.
struct Bound {
    std::uint64_t records = 1000;
    std::uint64_t seconds = 60;
};
inline constexpr Bound max_bound{10000, 3600};

// Ops a record may carry; anything else fails verification.
bool is_known_op(std::string_view op);
// The log's own records, which must be signed (and only they are).
bool is_signed_op(std::string_view op);

// "2026-11-28T13:36:11.123456Z", and back (nullopt when malformed).
std::string time_text(Micros t);
std::optional<Micros> parse_time(std::string_view text);
// The `prev` of the first record: 64 zeros.
const std::string& genesis_hash();

// A record body, field by field in the order added. Strings are JSON-escaped
// (invalid UTF-8 replaced, never thrown on); an empty string is null.
class Body {
public:
    using Value = std::variant<std::string, std::int64_t, std::uint64_t, bool, std::nullptr_t>;
    Body& text(std::string_view key, std::string_view value);
    Body& number(std::string_view key, std::optional<std::uint64_t> value);
    Body& integer(std::string_view key, std::int64_t value);
    Body& boolean(std::string_view key, bool value);
    Body& value(std::string_view key, const Value& value);
    // The finished body: `{...}`.
    std::string finish() &&;

private:
    void key(std::string_view k);
    std::string out_ = "{";
};

// The digest a record's hash is and its signature covers.
std::array<std::uint8_t, 32> body_digest(std::string_view body);

struct SealedLine {
    std::string text;  // without the newline
    std::string hash;
};
// `body` with its hash, and its signature when `sig` is not empty.
SealedLine seal(std::string_view body, std::span<const std::uint8_t> sig = {});

// A line split and checked: its hash matches its body's bytes, and the body
// is a JSON object with seq, time, op and prev and no hash or sig of its own.
struct Record {
    std::string body;
    std::string hash;
    std::vector<std::uint8_t> sig;  // empty: unsigned
    nlohmann::json fields;
    std::uint64_t seq = 0;
    Micros time = 0;
    std::string op;
    std::string prev;

    bool is_signed() const { return !sig.empty(); }
    // An unsigned integer field, or nullopt.
    std::optional<std::uint64_t> count(const char* key) const;
};
// The error says what is wrong, in words for `audit verify`.
tl::expected<Record, std::string> parse(std::string_view line);
// Whether a line has the shape of a signed record (cheap: no parsing).
bool looks_signed(std::string_view line);

// What the token signs for a database anchor.
std::array<std::uint8_t, 32> anchor_digest(const AuditAnchor& anchor);

}  // namespace vaultfs::vault::audit
