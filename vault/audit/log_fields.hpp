// audit/log_fields: one record's fields as the writer renders them (the
// parts of Log that its files share; only vault/audit/log*.cpp include it).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "vault/audit/log.hpp"

namespace vaultfs::vault::audit {

struct Log::Fields {
    std::string op;
    std::string vault;
    std::string secret;
    std::optional<std::uint64_t> version;
    std::int64_t uid = 0;
    std::int64_t gid = 0;
    std::int64_t pid = 0;
    std::string exe;
    bool allowed = false;
    std::string rule;
    std::string result;
    std::optional<std::uint64_t> bytes;
    std::string reason;
    std::string attribute;
    std::string from;

    // An event's fields; `exe` is looked up from the caller's pid.
    static Fields of(const Event& e);
    // The daemon's own record.
    static Fields daemon(std::string_view op);
    // The record's JSON text, chained to `prev`.
    std::string body(std::uint64_t seq, Micros time, const std::string& prev, const Extras& extras) const;
};

}  // namespace vaultfs::vault::audit
