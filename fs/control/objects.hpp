// control/objects: the management plane's keys and certificates -- the
// `vaultfs key ...` and `vaultfs cert ...` commands. Requests are
// {"cmd":"object","op":OP,"args":{...}}; each op names its vault and object
// in args.vault and args.name, binary data travels as base64:
//
//   key_create   type, ops?, rotate_after?, notify_before?, expires_after?  (seconds)
//   key_rotate   key_policy (rotate_after?, notify_before?, expires_after?)
//   key_show     version?            → type, ops, policy, versions, public_pem
//   key_sign     version?, alg, digest          → signature (DER for ECDSA)
//   key_decrypt  version?, alg, data, unwrap?   → plaintext
//   cert_create  subject, sans?, validity, key, exportable, ca, issuer,
//                renew_at_percent?, renew_before?
//   cert_renew   cert_merge (pem)   cert_import (data, password?)
//   cert_show    version?            → status, not_after, files, versions
//
// The caller is the socket's (control.hpp: admins only); the vault's policy
// decides as for the filesystem, and the services audit every operation.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "vault/state/state.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::fs {

nlohmann::json dispatch_object(vault::State& state, const vault::Caller& caller, const std::string& op,
                               const nlohmann::json& args);

}  // namespace vaultfs::fs
