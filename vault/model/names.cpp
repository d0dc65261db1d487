#include "vault/model/names.hpp"

#include <algorithm>
#include <limits>

namespace vaultfs::vault {

namespace {
bool is_name_char(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-';
}
bool is_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
}  // namespace

bool is_valid_secret_name(std::string_view name)
{
    return !name.empty() && name.size() <= 127 && std::all_of(name.begin(), name.end(), is_name_char);
}

bool is_valid_vault_name(std::string_view name)
{
    return name.size() >= 3 && name.size() <= 24 && std::all_of(name.begin(), name.end(), is_name_char) &&
           is_letter(name.front()) && name.back() != '-' && name.find("--") == std::string_view::npos;
}

std::optional<SecretPath> parse_secret_path(std::string_view component)
{
    const auto at = component.find('@');
    if (at == std::string_view::npos) {
        if (!is_valid_secret_name(component))
            return std::nullopt;
        return SecretPath{component, std::nullopt};
    }
    const auto name = component.substr(0, at);
    const auto digits = component.substr(at + 1);
    if (!is_valid_secret_name(name) || digits.empty() || digits.size() > 19 || digits.front() == '0')
        return std::nullopt;
    std::uint64_t n = 0;
    for (const char c : digits) {
        if (c < '0' || c > '9')
            return std::nullopt;
        const std::uint64_t d = static_cast<std::uint64_t>(c - '0');
        if (n > (static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) - d) / 10)
            return std::nullopt;
        n = n * 10 + d;
    }
    return SecretPath{name, n};
}

}  // namespace vaultfs::vault
