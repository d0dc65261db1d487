#include "vault/audit_format.hpp"

#include <openssl/evp.h>

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
    std::array<std::uint8_t, 32> out{};
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr);
    return out;
}

namespace {
std::string hex(std::span<const std::uint8_t> bytes)
{
    static const char digits[] = "0123456789abcdef";
    std::string s;
    s.reserve(bytes.size() * 2);
    for (const auto b : bytes) {
        s.push_back(digits[b >> 4]);
        s.push_back(digits[b & 0xf]);
    }
    return s;
}
}  // namespace

std::string sha256_hex(std::string_view data)
{
    const auto d = sha256(data);
    return hex(d);
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
        record["sig"] = hex(*sig);
    }
    const std::string hash = sha256_hex(canonical(record));
    record["hash"] = hash;
    return SealedRecord{canonical(record), hash};
}

}  // namespace vaultfs::vault
