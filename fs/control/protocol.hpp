// control/protocol: the requests of the control socket, one JSON object per
// connection, and their parsing (strict: unknown commands, missing, empty or
// mistyped fields are errors). The libFuzzer target drives parse_request.
//
//   {"cmd":"vault_create","vault":"payments","retention_days":30,"purge_protection":true}
//   {"cmd":"vault_show","vault":"payments"}   {"cmd":"vault_list"}   {"cmd":"status"}   {"cmd":"metrics"}
//   {"cmd":"vault_rekey","vault":"payments"}
//   {"cmd":"audit_acknowledge","through":4711}
//   {"cmd":"backup","vault":"payments","secret":"db-password"}   (secret optional)
//   {"cmd":"restore","backup":"<backup document>","into":"payments2"}   (into optional)
//   {"cmd":"policy_reset","vault":"payments","owner":1001}   (owner optional: the caller)
//   {"cmd":"policy_set","vault":"payments","policy":"allow uid:0 *\n..."}
//   {"cmd":"object","op":"key_sign","args":{"vault":"apps","name":"signer","alg":"ES256","digest":"<base64>"}}
//     keys and certificates (fs/control/objects.cpp lists the ops and their args)
//
// Replies: {"ok":true,"result":...} or {"ok":false,"errno":"EACCES","error":"..."}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <tl/expected.hpp>

namespace vaultfs::fs {

// The largest request accepted (a restore carries a whole backup).
inline constexpr std::size_t max_request_size = 256u << 20;

struct ControlRequest {
    enum class Command {
        vault_create,
        vault_show,
        vault_list,
        status,
        backup,
        restore,
        policy_reset,
        policy_set,
        object,
        metrics,
        vault_rekey,
        audit_acknowledge
    };
    Command command = Command::status;
    std::string vault;
    std::optional<std::string> secret;
    int retention_days = 90;
    bool purge_protection = false;
    std::string backup;  // restore: the document
    std::optional<std::string> into;
    std::optional<std::uint32_t> owner;  // policy_reset: who gets `*`
    std::string policy;                  // policy_set: the text
    std::string op;                      // object: key_create, cert_renew, ...
    std::string args;                    // object: its arguments, a JSON object (as text)
    std::uint64_t through = 0;           // audit_acknowledge: the last seq acknowledged
};

// Base64 (RFC 4648, with padding) for binary fields; nullopt for bad input.
std::string base64_encode(std::string_view bytes);
std::optional<std::string> base64_decode(std::string_view text);

tl::expected<ControlRequest, std::string> parse_request(std::string_view text);
std::string render_request(const ControlRequest& request);

}  // namespace vaultfs::fs
