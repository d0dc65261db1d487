// envelope: the value layer of the key hierarchy. Each version's value is
// sealed with AES-256-GCM (OpenSSL EVP) under its own random DEK; the DEK is
// sealed by the token under the vault's KEK (hsm::KeyService). Both carry
// associated data that binds vault id, secret name, version and KEK id, so a
// row that is edited, or moved to another secret or version, fails
// authentication instead of decrypting to the wrong bytes.
//
// Never sees paths, policies or SQL.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "hsm/key_service.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/model/error.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {

inline constexpr std::size_t value_nonce_size = 12;
inline constexpr std::size_t value_tag_size = 16;

// What a stored version is bound to.
struct Binding {
    VaultId vault;
    std::string_view secret;
    std::uint64_t version = 0;
    std::string_view kek_id;
};

// Associated data for the value and for the sealed DEK; distinct labels keep
// one from being accepted as the other.
std::vector<std::uint8_t> value_aad(const Binding& b);
std::vector<std::uint8_t> dek_aad(const Binding& b);

struct SealedValue {
    std::vector<std::uint8_t> nonce;       // 12 bytes, random
    std::vector<std::uint8_t> ciphertext;  // plaintext size + 16-byte tag
};

// A fresh random 256-bit DEK in locked memory.
Result<hsm::SecureBuffer> new_dek();

Result<SealedValue> seal_value(const hsm::SecureBuffer& dek, std::span<const std::uint8_t> plaintext,
                               std::span<const std::uint8_t> aad);

// Errc::integrity when the tag does not verify; the output is then wiped.
Result<hsm::SecureBuffer> open_value(const hsm::SecureBuffer& dek, std::span<const std::uint8_t> nonce,
                                     std::span<const std::uint8_t> ciphertext, std::span<const std::uint8_t> aad);

}  // namespace vaultfs::vault
