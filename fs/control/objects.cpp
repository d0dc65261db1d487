#include "fs/control/objects.hpp"

#include <openssl/crypto.h>

#include "fs/control/server.hpp"
#include "fs/control/protocol.hpp"
#include "vault/model/attributes.hpp"
#include "vault/certificates/certificates.hpp"
#include "vault/keys/key_vault.hpp"

namespace vaultfs::fs {

using json = nlohmann::json;
namespace keys = vault::keys;
namespace certs = vault::certificates;

namespace {

json bad(const std::string& text) { return error_reply({vault::Errc::invalid_argument, text}); }

std::string text_of(const json& args, const char* key)
{
    return args.contains(key) && args[key].is_string() ? args[key].get<std::string>() : std::string();
}

std::optional<std::chrono::seconds> seconds_of(const json& args, const char* key)
{
    if (args.contains(key) && args[key].is_number_integer() && args[key].get<std::int64_t>() > 0)
        return std::chrono::seconds(args[key].get<std::int64_t>());
    return std::nullopt;
}

// NAME or NAME@N in a vault, as the filesystem would find it.
vault::Result<vault::ObjectView> find(vault::Objects& objects, vault::State& state, const vault::Caller& caller,
                                      const json& args)
{
    auto v = state.service->find_vault(caller, text_of(args, "vault"));
    if (!v)
        return tl::unexpected(v.error());
    std::string component = text_of(args, "name");
    if (args.contains("version") && args["version"].is_number_unsigned())
        component += "@" + std::to_string(args["version"].get<std::uint64_t>());
    return objects.find(caller, v->id, component);
}

json version_list(const std::vector<vault::ObjectVersionRow>& rows)
{
    json out = json::array();
    for (const auto& r : rows) {
        json one{{"version", r.number}, {"created", vault::format_rfc3339(r.created)}, {"enabled", r.enabled}};
        if (r.expires)
            one["expires"] = vault::format_rfc3339(*r.expires);
        out.push_back(one);
    }
    return out;
}

json key_op(vault::State& state, const vault::Caller& caller, const std::string& op, const json& args,
            const std::string& what)
{
    auto& kv = *state.key_vault;
    const std::string vault_name = text_of(args, "vault");
    const std::string name = text_of(args, "name");
    if (op == "key_create") {
        const auto type = hsm::key_type_from(text_of(args, "type"));
        if (!type)
            return bad("--type is one of rsa-2048, rsa-3072, rsa-4096, ec-p256, ec-p384, ec-p521");
        keys::KeySpec spec;
        spec.type = *type;
        spec.ops = keys::Operations::all_for(*type);
        if (const std::string ops = text_of(args, "ops"); !ops.empty()) {
            std::string unknown;
            const auto parsed = keys::Operations::parse(ops, &unknown);
            if (!parsed)
                return bad("unknown key operation '" + unknown +
                           "' (sign, verify, encrypt, decrypt, wrapkey, unwrapkey)");
            spec.ops = *parsed;
        }
        spec.rotate_after = seconds_of(args, "rotate_after");
        spec.notify_before = seconds_of(args, "notify_before");
        spec.expires_after = seconds_of(args, "expires_after");
        auto made = kv.create(caller, vault_name, name, spec);
        if (!made)
            return failure(made.error(), what);
        return json{{"ok", true},
                    {"result", json{{"version", made->version.number},
                                    {"public_pem", keys::public_pem(made->version.public_der).value_or("")}}}};
    }
    if (op == "key_rotate") {
        auto made = kv.rotate(&caller, vault_name, name);
        if (!made)
            return failure(made.error(), what);
        return json{{"ok", true}, {"result", json{{"version", made->version.number}}}};
    }
    if (op == "key_policy") {
        keys::KeySpec policy;
        policy.rotate_after = seconds_of(args, "rotate_after");
        policy.notify_before = seconds_of(args, "notify_before");
        policy.expires_after = seconds_of(args, "expires_after");
        if (auto r = kv.set_rotation(caller, vault_name, name, policy); !r)
            return failure(r.error(), what);
        return json{{"ok", true}, {"result", name}};
    }
    auto view = find(kv.objects(), state, caller, args);
    if (!view)
        return failure(view.error(), what);
    if (op == "key_show") {
        auto versions = kv.objects().versions(caller, *view);
        if (!versions)
            return failure(versions.error(), what);
        auto der = kv.public_key(caller, *view);
        if (!der)
            return failure(der.error(), what);
        const auto spec = kv.spec_of(*view);
        json out{{"name", view->object.name},
                 {"type", std::string(hsm::to_string(spec.type))},
                 {"ops", spec.ops.names()},
                 {"version", view->version.number},
                 {"versions", version_list(*versions)},
                 {"public_pem", keys::public_pem(*der).value_or("")}};
        if (spec.rotate_after)
            out["rotate_after"] = spec.rotate_after->count();
        if (spec.notify_before)
            out["notify_before"] = spec.notify_before->count();
        if (spec.expires_after)
            out["expires_after"] = spec.expires_after->count();
        return json{{"ok", true}, {"result", out}};
    }
    if (op == "key_sign") {
        const auto alg = keys::sign_algorithm(text_of(args, "alg"));
        if (!alg)
            return bad("--alg is one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 ES512");
        const auto digest = base64_decode(text_of(args, "digest"));
        if (!digest)
            return bad("\"digest\" must be base64");
        auto sig = kv.sign(caller, *view, *alg,
                           std::span(reinterpret_cast<const std::uint8_t*>(digest->data()), digest->size()));
        if (!sig)
            return failure(sig.error(), what);
        return json{{"ok", true},
                    {"result", json{{"version", view->version.number},
                                    {"type", std::string(hsm::to_string(kv.spec_of(*view).type))},
                                    {"signature", base64_encode(std::string_view(
                                                      reinterpret_cast<const char*>(sig->data()), sig->size()))}}}};
    }
    if (op == "key_decrypt") {
        const auto alg = keys::decrypt_algorithm(text_of(args, "alg"));
        if (!alg)
            return bad("--alg is one of RSA-OAEP RSA-OAEP-256 RSA1_5");
        const auto data = base64_decode(text_of(args, "data"));
        if (!data)
            return bad("\"data\" must be base64");
        const bool unwrap = args.value("unwrap", false);
        auto plain = kv.decrypt(caller, *view, *alg,
                                std::span(reinterpret_cast<const std::uint8_t*>(data->data()), data->size()), unwrap);
        if (!plain)
            return failure(plain.error(), what);
        return json{{"ok", true},
                    {"result", json{{"plaintext", base64_encode(std::string_view(
                                                      reinterpret_cast<const char*>(plain->data()), plain->size()))}}}};
    }
    return bad("unknown key operation " + op);
}

json cert_op(vault::State& state, const vault::Caller& caller, const std::string& op, const json& args,
             const std::string& what)
{
    auto& c = *state.certificates;
    const std::string vault_name = text_of(args, "vault");
    const std::string name = text_of(args, "name");
    const auto made_reply = [&](const vault::Result<vault::ObjectView>& made) {
        if (!made)
            return failure(made.error(), what);
        return json{{"ok", true},
                    {"result", json{{"version", made->version.number}, {"status", certs::status_of(*made)}}}};
    };
    if (op == "cert_create") {
        certs::CertPolicy p;
        p.subject = text_of(args, "subject");
        p.sans = text_of(args, "sans");
        p.validity = seconds_of(args, "validity").value_or(std::chrono::seconds(365 * 86400));
        const auto key = hsm::key_type_from(args.value("key", "ec-p256"));
        if (!key)
            return bad("--key is one of rsa-2048, rsa-3072, rsa-4096, ec-p256, ec-p384, ec-p521");
        p.key = *key;
        p.exportable = args.value("exportable", false);
        p.ca = args.value("ca", false);
        p.issuer = args.value("issuer", "self");
        if (args.contains("renew_at_percent") && args["renew_at_percent"].is_number_integer())
            p.renew_at_percent = args["renew_at_percent"].get<int>();
        p.renew_before = seconds_of(args, "renew_before");
        return made_reply(c.create(caller, vault_name, name, p));
    }
    if (op == "cert_renew")
        return made_reply(c.renew(&caller, vault_name, name));
    if (op == "cert_merge")
        return made_reply(c.merge(caller, vault_name, name, text_of(args, "pem")));
    if (op == "cert_import") {
        auto data = base64_decode(text_of(args, "data"));
        if (!data)
            return bad("\"data\" must be base64");
        auto made = c.import(caller, vault_name, name,
                             std::span(reinterpret_cast<const std::uint8_t*>(data->data()), data->size()),
                             text_of(args, "password"));
        OPENSSL_cleanse(data->data(), data->size());  // it holds a private key
        return made_reply(made);
    }
    if (op == "cert_show") {
        auto view = find(c.objects(), state, caller, args);
        if (!view)
            return failure(view.error(), what);
        auto attrs = c.attributes(caller, *view);
        if (!attrs)
            return failure(attrs.error(), what);
        auto versions = c.objects().versions(caller, *view);
        if (!versions)
            return failure(versions.error(), what);
        json out{{"name", view->object.name}, {"versions", version_list(*versions)}};
        for (const auto& [k, v] : *attrs)
            out[k] = v;
        json files = json::array();
        for (const auto f : certs::files_of(*view))
            files.push_back(std::string(certs::to_string(f)));
        out["files"] = files;
        return json{{"ok", true}, {"result", out}};
    }
    return bad("unknown certificate operation " + op);
}

}  // namespace

// The ceremony's steps an enrolled host runs (vault/hosts/enrolment.hpp):
// admins only, recorded in this daemon's audit trail.
json host_op(vault::State& state, const vault::Caller& caller, const std::string& op, const json& args)
{
    if (!state.enrolment)
        return bad("this state does not use a PostgreSQL store: it has no other hosts");
    if (!state.service->is_admin(caller)) {
        vault::Errc denied = vault::Errc::access_denied;
        (void)state.service->audit_management(caller, op, "", false, "not-admin", &denied);
        return error_reply({denied, "only admins grant and remove hosts"});
    }
    if (op == "host_grant") {
        const bool check_only = args.contains("check_only") && args["check_only"].is_boolean() &&
                                args["check_only"].get<bool>();
        auto grant = state.enrolment->grant(text_of(args, "request"), text_of(args, "fingerprint"), state.audit.get(),
                                            check_only);
        if (!grant)
            return error_reply(grant.error());
        return json{{"ok", true}, {"result", *grant}};
    }
    if (op == "host_trusted") {
        // After `host trust` (the SO step, in the CLI's process): what the
        // token trusts now is audited, and KEKs handed on.
        if (auto r = state.enrolment->audit_trust(state.audit.get()); !r)
            return error_reply(r.error());
        auto n = state.enrolment->grant_missing(state.audit.get());
        if (!n)
            return error_reply(n.error());
        return json{{"ok", true}, {"result", *n}};
    }
    if (op == "host_remove") {
        if (auto r = state.enrolment->remove_host(text_of(args, "host"), state.audit.get()); !r)
            return error_reply(r.error());
        return json{{"ok", true}, {"result", text_of(args, "host")}};
    }
    return bad("unknown operation " + op);
}

json dispatch_object(vault::State& state, const vault::Caller& caller, const std::string& op, const json& args)
{
    if (!args.is_object())
        return bad("\"args\" must be an object");
    if (op.rfind("host_", 0) == 0)
        return host_op(state, caller, op, args);
    if (text_of(args, "vault").empty() || text_of(args, "name").empty())
        return bad("\"args\" must name \"vault\" and \"name\"");
    const bool key = op.rfind("key_", 0) == 0;
    const std::string what =
        text_of(args, "vault") + (key ? "/.keys/" : "/.certs/") + text_of(args, "name");
    if (key)
        return key_op(state, caller, op, args, what);
    if (op.rfind("cert_", 0) == 0)
        return cert_op(state, caller, op, args, what);
    return bad("unknown operation " + op);
}

}  // namespace vaultfs::fs
