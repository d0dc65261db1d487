#include "fs/control/protocol.hpp"

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include <algorithm>

namespace vaultfs::fs {

using json = nlohmann::json;

namespace {

constexpr std::pair<const char*, ControlRequest::Command> commands[] = {
    {"vault_create", ControlRequest::Command::vault_create},
    {"vault_show", ControlRequest::Command::vault_show},
    {"vault_list", ControlRequest::Command::vault_list},
    {"status", ControlRequest::Command::status},
    {"backup", ControlRequest::Command::backup},
    {"restore", ControlRequest::Command::restore},
    {"policy_reset", ControlRequest::Command::policy_reset},
    {"policy_set", ControlRequest::Command::policy_set},
    {"object", ControlRequest::Command::object},
    {"metrics", ControlRequest::Command::metrics},
    {"vault_rekey", ControlRequest::Command::vault_rekey},
    {"audit_acknowledge", ControlRequest::Command::audit_acknowledge},
};

}  // namespace

tl::expected<ControlRequest, std::string> parse_request(std::string_view text)
{
    if (text.size() > max_request_size)
        return tl::unexpected(std::string("request too large"));
    const json j = json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object())
        return tl::unexpected(std::string("a request is one JSON object"));
    if (!j.contains("cmd") || !j["cmd"].is_string())
        return tl::unexpected(std::string("missing \"cmd\""));
    ControlRequest r;
    const std::string cmd = j["cmd"].get<std::string>();
    bool known = false;
    for (const auto& [name, c] : commands)
        if (cmd == name) {
            r.command = c;
            known = true;
        }
    if (!known)
        return tl::unexpected("unknown command '" + cmd.substr(0, 64) + "'");

    const auto string_field = [&](const char* key, bool required) -> tl::expected<std::optional<std::string>, std::string> {
        if (!j.contains(key))
            return required ? tl::expected<std::optional<std::string>, std::string>(
                                  tl::unexpected(std::string("missing \"") + key + "\""))
                            : std::optional<std::string>();
        if (!j[key].is_string())
            return tl::unexpected(std::string("\"") + key + "\" must be a string");
        // Names and documents are never empty; "" would read as absent.
        if (j[key].get_ref<const std::string&>().empty())
            return tl::unexpected(std::string("\"") + key + "\" must not be empty");
        return std::optional<std::string>(j[key].get<std::string>());
    };
    for (const auto& item : j.items()) {
        static const char* allowed[] = {"cmd",  "vault", "secret", "retention_days", "purge_protection",
                                        "backup", "into", "owner", "policy", "op", "args", "through"};
        const std::string key = item.key();
        if (std::find_if(std::begin(allowed), std::end(allowed), [&](const char* a) { return key == a; }) ==
            std::end(allowed))
            return tl::unexpected("unknown field \"" + key.substr(0, 64) + "\"");
    }
    using C = ControlRequest::Command;
    const bool needs_vault = r.command == C::vault_create || r.command == C::vault_show || r.command == C::backup ||
                             r.command == C::policy_reset || r.command == C::policy_set || r.command == C::vault_rekey;
    auto vault = string_field("vault", needs_vault);
    if (!vault)
        return tl::unexpected(vault.error());
    r.vault = vault->value_or("");
    auto secret = string_field("secret", false);
    if (!secret)
        return tl::unexpected(secret.error());
    r.secret = *secret;
    auto into = string_field("into", false);
    if (!into)
        return tl::unexpected(into.error());
    r.into = *into;
    auto backup = string_field("backup", r.command == C::restore);
    if (!backup)
        return tl::unexpected(backup.error());
    r.backup = backup->value_or("");
    // A policy may be empty text only by mistake: refused like "" elsewhere.
    auto policy = string_field("policy", r.command == C::policy_set);
    if (!policy)
        return tl::unexpected(policy.error());
    r.policy = policy->value_or("");
    auto op = string_field("op", r.command == C::object);
    if (!op)
        return tl::unexpected(op.error());
    r.op = op->value_or("");
    if (r.command == C::object) {
        if (!j.contains("args") || !j["args"].is_object())
            return tl::unexpected(std::string("\"args\" must be an object"));
        r.args = j["args"].dump();
    } else if (j.contains("args")) {
        return tl::unexpected(std::string("\"args\" belongs to \"object\" requests"));
    }
    if (j.contains("retention_days")) {
        if (!j["retention_days"].is_number_integer())
            return tl::unexpected(std::string("\"retention_days\" must be an integer"));
        const auto days = j["retention_days"].get<std::int64_t>();
        if (days < 7 || days > 90)
            return tl::unexpected(std::string("\"retention_days\" must be 7 to 90"));
        r.retention_days = static_cast<int>(days);
    }
    if (j.contains("owner")) {
        if (!j["owner"].is_number_unsigned() || j["owner"].get<std::uint64_t>() >= 0xffffffffu)
            return tl::unexpected(std::string("\"owner\" must be a uid"));
        r.owner = static_cast<std::uint32_t>(j["owner"].get<std::uint64_t>());
    }
    if (j.contains("through") || r.command == C::audit_acknowledge) {
        if (r.command != C::audit_acknowledge)
            return tl::unexpected(std::string("\"through\" belongs to \"audit_acknowledge\" requests"));
        if (!j.contains("through") || !j["through"].is_number_unsigned() || j["through"].get<std::uint64_t>() == 0)
            return tl::unexpected(std::string("\"through\" must be a record's seq (1 or more)"));
        r.through = j["through"].get<std::uint64_t>();
    }
    if (j.contains("purge_protection")) {
        if (!j["purge_protection"].is_boolean())
            return tl::unexpected(std::string("\"purge_protection\" must be true or false"));
        r.purge_protection = j["purge_protection"].get<bool>();
    }
    return r;
}

std::string render_request(const ControlRequest& r)
{
    json j;
    for (const auto& [name, c] : commands)
        if (c == r.command)
            j["cmd"] = name;
    if (!r.vault.empty())
        j["vault"] = r.vault;
    if (r.secret)
        j["secret"] = *r.secret;
    if (r.command == ControlRequest::Command::vault_create) {
        j["retention_days"] = r.retention_days;
        j["purge_protection"] = r.purge_protection;
    }
    if (r.command == ControlRequest::Command::restore)
        j["backup"] = r.backup;
    if (r.command == ControlRequest::Command::policy_set)
        j["policy"] = r.policy;
    if (r.into)
        j["into"] = *r.into;
    if (r.command == ControlRequest::Command::object) {
        j["op"] = r.op;
        j["args"] = json::parse(r.args, nullptr, false);
    }
    if (r.owner)
        j["owner"] = *r.owner;
    if (r.command == ControlRequest::Command::audit_acknowledge)
        j["through"] = r.through;
    return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string base64_encode(std::string_view bytes)
{
    std::string out(4 * ((bytes.size() + 2) / 3), '\0');
    const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                  reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()));
    out.resize(static_cast<std::size_t>(n));
    return out;
}

std::optional<std::string> base64_decode(std::string_view text)
{
    if (text.size() % 4 != 0)
        return std::nullopt;
    std::string out(3 * text.size() / 4, '\0');
    const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                  reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
    if (n < 0)
        return std::nullopt;
    std::size_t size = static_cast<std::size_t>(n);
    // EVP_DecodeBlock counts the padding as zero bytes.
    for (std::size_t i = text.size(); i > 0 && text[i - 1] == '=' && size > 0; --i)
        --size;
    out.resize(size);
    return out;
}

}  // namespace vaultfs::fs
