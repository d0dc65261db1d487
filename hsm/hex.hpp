// hex: lowercase hexadecimal for key ids, sealed blobs and signatures
// (never for secret bytes).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace vaultfs::hsm {

std::string to_hex(std::span<const std::uint8_t> bytes);
// nullopt for odd lengths and characters outside [0-9a-f].
std::optional<std::vector<std::uint8_t>> from_hex(std::string_view hex);

}  // namespace vaultfs::hsm
