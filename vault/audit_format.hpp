// audit_format: the on-disk form of audit records, shared by the writer and
// the verifier (internal to vault/).
//
//   hash = hex(SHA-256(canonical(record without "hash")))
//   sig  = hex(r | s), ECDSA P-256 over SHA-256(canonical(record without
//          "hash" and "sig"))
//
// canonical(): nlohmann::json's dump with sorted keys and no whitespace;
// invalid UTF-8 (an odd exe path) is replaced, never thrown on.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

#include "hsm/error.hpp"
#include "hsm/hex.hpp"
#include "vault/types.hpp"

struct evp_pkey_st;  // OpenSSL's EVP_PKEY

namespace vaultfs::vault {

// "2026-11-28T13:36:11.123456Z"
std::string audit_time(Micros t);
// The `prev` of the first record: 64 zeros.
const std::string& genesis_hash();

std::string canonical(const nlohmann::json& record);
std::string sha256_hex(std::string_view data);
std::array<std::uint8_t, 32> sha256(std::string_view data);

using hsm::from_hex;
using hsm::to_hex;

// Checks ECDSA P-256 signatures (r | s, 64 bytes) over SHA-256 digests with
// a PEM public key; needs no token.
class P256Verifier {
public:
    explicit P256Verifier(const std::string& public_key_pem);
    ~P256Verifier();
    P256Verifier(const P256Verifier&) = delete;
    P256Verifier& operator=(const P256Verifier&) = delete;
    bool usable() const { return key_ != nullptr; }
    bool verify(const std::array<std::uint8_t, 32>& digest, std::span<const std::uint8_t> signature) const;

private:
    ::evp_pkey_st* key_ = nullptr;
};

// The fields of one ordinary record, before `seq`, `prev` and `hash`.
// Empty strings and nullopt numbers are JSON null (reason and attribute are
// left out when empty).
struct RecordFields {
    std::string time;
    std::string op;
    std::string vault;
    std::string secret;
    std::optional<std::uint64_t> version;
    std::uint64_t uid = 0;
    std::uint64_t gid = 0;
    std::int64_t pid = 0;
    std::string exe;
    bool allowed = false;
    std::string rule;
    std::string result;
    std::optional<std::uint64_t> bytes;
    std::string reason;
    std::string attribute;
};

nlohmann::json to_json(const RecordFields& f);

// Renders an unsigned record without building a JSON tree: the same bytes
// canonical() would give (the verifier recomputes it that way), for the
// common case where every string is printable ASCII without quotes or
// backslashes. nullopt otherwise: the caller falls back to the JSON path.
std::optional<struct SealedRecord> render_fast(const RecordFields& f, std::uint64_t seq, const std::string& prev);

using SignDigest = std::function<hsm::Result<std::vector<std::uint8_t>>(std::span<const std::uint8_t, 32>)>;

struct SealedRecord {
    std::string line;  // without the newline
    std::string hash;
};

// Adds `sig` (when `sign` is set) and `hash` to `record` and renders it.
// The error is the signer's message.
tl::expected<SealedRecord, std::string> seal_record(nlohmann::json& record, const SignDigest& sign);

}  // namespace vaultfs::vault
