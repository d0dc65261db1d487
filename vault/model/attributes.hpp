// attributes: the text forms of secret attributes, as users see them in
// `user.vault.*` extended attributes. Pure parsing and formatting; the
// rules on who may change what live in SecretService.
//
//   version, created, updated        read-only
//   enabled                          "true" | "false"
//   not_before, expires              RFC 3339 UTC ("2027-01-31T00:00:00Z"),
//                                    empty value or removexattr clears
//   content_type                     at most 255 printable ASCII characters
//   tag.NAME                         at most 15 tags per version; NAME 1-512
//                                    printable ASCII characters (the kernel
//                                    limits a whole xattr name to 255 bytes),
//                                    value at most 512 bytes without control
//                                    characters
//
// Of a vault directory: retention_days (7-90), purge_protection (true |
// false), default_owner and default_group (ids; names when set), and
// default_mode (octal, permission bits only: "0400").
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "vault/model/types.hpp"

namespace vaultfs::vault {

inline constexpr std::size_t max_tags = 15;
inline constexpr std::size_t max_tag_name = 512;
inline constexpr std::size_t max_tag_value = 512;
inline constexpr std::size_t max_content_type = 255;

// "YYYY-MM-DDTHH:MM:SS[.fraction]Z"; nullopt for anything else (offsets
// other than Z, out-of-range fields, trailing text).
std::optional<Micros> parse_rfc3339(std::string_view text);
// Seconds precision when the time is whole seconds, else microseconds.
std::string format_rfc3339(Micros t);

std::optional<bool> parse_bool(std::string_view text);
std::string format_bool(bool b);

// Octal permission bits, 1-4 digits, at most 0777; formatted as "0400".
std::optional<std::uint32_t> parse_mode(std::string_view text);
std::string format_mode(std::uint32_t mode);

bool is_valid_content_type(std::string_view text);
bool is_valid_tag_name(std::string_view text);
bool is_valid_tag_value(std::string_view text);

}  // namespace vaultfs::vault
