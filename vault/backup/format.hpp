// backup_format: reading a backup document ("format": "vaultfs-backup/1")
// into plain values, checking its structure and types — no keys, no I/O,
// so the libFuzzer target can drive it. SecretService::restore then checks
// the signature and re-binds the versions.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <functional>
#include <span>

#include <nlohmann/json.hpp>

#include "hsm/error.hpp"
#include "vault/model/error.hpp"
#include "vault/store/store.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {

inline constexpr const char* backup_format = "vaultfs-backup/1";

struct BackupVersion {
    VersionRow meta;  // id and secret are not set
    std::string kek_id;
    std::vector<std::uint8_t> nonce;
    std::vector<std::uint8_t> ciphertext;
    std::vector<std::uint8_t> sealed_dek;
    std::vector<Tag> tags;
};

struct BackupSecret {
    std::string name;
    Micros created = 0;
    std::uint64_t next_version = 1;
    std::vector<BackupVersion> versions;
};

struct BackupDocument {
    VaultId source_vault;
    std::string source_name;
    std::string source_kek;
    std::vector<BackupSecret> secrets;
    // Keys and certificates (vault/objects/object_backup.hpp), checked there.
    nlohmann::json objects = nlohmann::json::array();
    // What the signature covers, and the signature itself.
    std::array<std::uint8_t, 32> signed_digest{};
    std::vector<std::uint8_t> signature;
    bool hash_matches = false;  // `hash` agrees with the document
};

// A document's canonical text: nlohmann::json's dump with sorted keys and no
// whitespace (invalid UTF-8 replaced). The signature and hash of a backup
// cover the canonical text of the document without them.
std::string canonical(const nlohmann::json& document);

using SignDigest = std::function<hsm::Result<std::vector<std::uint8_t>>(std::span<const std::uint8_t, 32>)>;

// Adds `sig` (over the canonical document) and `hash` (over the canonical
// document with `sig`) and renders it. The error is the signer's message.
tl::expected<std::string, std::string> seal_document(nlohmann::json& document, const SignDigest& sign);

// Errc::invalid_argument, with what is wrong, for anything that is not a
// well-formed backup: bad JSON, missing or mistyped fields, bad hex, invalid
// secret names or tags, duplicate names or versions.
Result<BackupDocument> parse_backup(std::string_view text);

}  // namespace vaultfs::vault
