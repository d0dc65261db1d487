// names: what a vault or secret may be called, and how `S@N` is read.
//
// Secret names: 1–127 characters of [0-9A-Za-z-]. Vault names: 3–24 of the
// same, starting with a letter, ending with a letter or digit, without "--"
// (Azure Key Vault's rules). Neither can contain '@' or '.', so `S@N`,
// `.policy`, `.versions` and `.deleted` never clash with a real name.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace vaultfs::vault {

bool is_valid_secret_name(std::string_view name);
bool is_valid_vault_name(std::string_view name);

// A secret as a path component names it: "S" (the current version) or
// "S@N" (version N).
struct SecretPath {
    std::string_view name;
    std::optional<std::uint64_t> version;
};

// Parses "S" or "S@N". N is strict: decimal digits only, no sign, no leading
// zero, not 0, fits in 63 bits (SQLite integers are signed). Anything else,
// including "S@", "S@01", "S@1@2", is nullopt.
std::optional<SecretPath> parse_secret_path(std::string_view component);

}  // namespace vaultfs::vault
