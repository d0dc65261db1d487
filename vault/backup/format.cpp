#include "vault/backup/format.hpp"

#include <limits>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "vault/model/attributes.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::vault {

using json = nlohmann::json;

namespace {

// An integer field; a float, a string or an out-of-range number is malformed
// (converting those is undefined behaviour in nlohmann::json's get<>()).
template <class T>
T integer(const json& v, const char* what)
{
    if (v.is_number_unsigned()) {
        const auto u = v.get<std::uint64_t>();
        if (u <= static_cast<std::uint64_t>(std::numeric_limits<T>::max()))
            return static_cast<T>(u);
    } else if (v.is_number_integer()) {
        const auto i = v.get<std::int64_t>();
        if (i >= 0 && static_cast<std::uint64_t>(i) <= static_cast<std::uint64_t>(std::numeric_limits<T>::max()))
            return static_cast<T>(i);
    }
    throw std::invalid_argument(std::string("a malformed ") + what);
}

std::optional<Micros> optional_micros(const json& v, const char* what)
{
    if (v.is_null())
        return std::nullopt;
    return integer<Micros>(v, what);
}

std::vector<std::uint8_t> hex_field(const json& v, const char* what)
{
    auto bytes = from_hex(v.get<std::string>());
    if (!bytes)
        throw std::invalid_argument(std::string("malformed hex in ") + what);
    return std::move(*bytes);
}

}  // namespace

std::string canonical(const json& document)
{
    return document.dump(-1, ' ', false, json::error_handler_t::replace);
}

tl::expected<std::string, std::string> seal_document(json& document, const SignDigest& sign)
{
    document.erase("hash");
    document.erase("sig");
    const auto digest = sha256(canonical(document));
    auto sig = sign(std::span<const std::uint8_t, 32>(digest));
    if (!sig)
        return tl::unexpected(sig.error().message);
    document["sig"] = to_hex(*sig);
    document["hash"] = sha256_hex(canonical(document));
    return canonical(document);
}

Result<BackupDocument> parse_backup(std::string_view text)
{
    const json doc = json::parse(text, nullptr, false);
    if (doc.is_discarded() || !doc.is_object() || !doc.contains("format") || doc["format"] != backup_format)
        return fail(Errc::invalid_argument, "not a vaultfs backup (format vaultfs-backup/1)");
    BackupDocument out;
    try {
        const json& vault = doc.at("vault");
        out.source_vault = VaultId{integer<std::int64_t>(vault.at("id"), "vault id")};
        out.source_name = vault.at("name").get<std::string>();
        out.source_kek = vault.at("kek_id").get<std::string>();
        if (!is_valid_vault_name(out.source_name) || !from_hex(out.source_kek))
            throw std::invalid_argument("the vault section names an invalid vault or key");

        std::set<std::string> names;
        for (const json& s : doc.at("secrets")) {
            BackupSecret secret{s.at("name").get<std::string>(), integer<Micros>(s.at("created"), "created"),
                                integer<std::uint64_t>(s.at("next_version"), "next_version"), {}};
            if (!is_valid_secret_name(secret.name) || !names.insert(secret.name).second)
                throw std::invalid_argument("an invalid or repeated secret name");
            std::set<std::uint64_t> numbers;
            for (const json& v : s.at("versions")) {
                BackupVersion version;
                VersionRow& m = version.meta;
                m.number = integer<std::uint64_t>(v.at("version"), "version");
                if (m.number == 0 || m.number >= secret.next_version || !numbers.insert(m.number).second)
                    throw std::invalid_argument("an invalid or repeated version number");
                m.size = integer<std::uint64_t>(v.at("size"), "size");
                m.created = integer<Micros>(v.at("created"), "created");
                m.updated = integer<Micros>(v.at("updated"), "updated");
                m.created_by = integer<uid_t>(v.at("created_by"), "created_by");
                m.enabled = v.at("enabled").get<bool>();
                m.not_before = optional_micros(v.at("not_before"), "not_before");
                m.expires = optional_micros(v.at("expires"), "expires");
                if (!v.at("content_type").is_null()) {
                    m.content_type = v.at("content_type").get<std::string>();
                    if (!is_valid_content_type(*m.content_type))
                        throw std::invalid_argument("an invalid content_type");
                }
                version.kek_id = v.at("kek_id").get<std::string>();
                version.nonce = hex_field(v.at("nonce"), "nonce");
                version.ciphertext = hex_field(v.at("ciphertext"), "ciphertext");
                version.sealed_dek = hex_field(v.at("sealed_dek"), "sealed_dek");
                for (const auto& [name, value] : v.at("tags").items()) {
                    const std::string tag_value = value.get<std::string>();
                    if (!is_valid_tag_name(name) || !is_valid_tag_value(tag_value))
                        throw std::invalid_argument("an invalid tag");
                    version.tags.push_back(Tag{name, tag_value});
                }
                if (version.tags.size() > max_tags)
                    throw std::invalid_argument("too many tags");
                secret.versions.push_back(std::move(version));
            }
            out.secrets.push_back(std::move(secret));
        }

        if (doc.contains("objects")) {
            if (!doc["objects"].is_array())
                throw std::invalid_argument("\"objects\" is not a list");
            out.objects = doc["objects"];
        }

        json body = doc;
        const std::string hash = body.at("hash").get<std::string>();
        body.erase("hash");
        out.hash_matches = sha256_hex(canonical(body)) == hash;
        out.signature = hex_field(body.at("sig"), "sig");
        body.erase("sig");
        out.signed_digest = sha256(canonical(body));
    } catch (const std::exception& e) {
        return fail(Errc::invalid_argument, std::string("the backup is malformed: ") + e.what());
    }
    return out;
}

}  // namespace vaultfs::vault
