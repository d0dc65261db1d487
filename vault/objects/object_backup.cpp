#include "vault/objects/object_backup.hpp"

#include "hsm/hex.hpp"
#include "vault/crypto/envelope.hpp"
#include "vault/model/names.hpp"
#include "vault/objects/objects.hpp"

namespace vaultfs::vault {

using json = nlohmann::json;
using policy::Permission;

namespace {

std::string path_of(ObjectKind kind, const std::string& name)
{
    return std::string(kind == ObjectKind::key ? ".keys/" : ".certs/") + name;
}

json optional_micros(const std::optional<Micros>& v) { return v ? json(*v) : json(nullptr); }

std::vector<std::uint8_t> hex_of(const json& j, const char* key)
{
    auto bytes = hsm::from_hex(j.at(key).get<std::string>());
    if (!bytes)
        throw std::invalid_argument(std::string("\"") + key + "\" is not hex");
    return std::move(*bytes);
}

}  // namespace

Result<json> ObjectBackup::backup(const Caller& caller, const VaultEntry& vault)
{
    json out = json::array();
    for (const ObjectKind kind : {ObjectKind::key, ObjectKind::certificate}) {
        auto objects = core_.store().objects(vault.row.id, kind);
        if (!objects)
            return tl::unexpected(objects.error());
        for (const auto& o : *objects) {
            const std::string path = path_of(kind, o.name);
            const Decided d = core_.decide(caller, vault, Permission::backup, o.name);
            if (!d.allowed) {
                audit::Event ev{.op = "backup", .caller = &caller, .vault = vault.row.name, .secret = path};
                d.fill(ev);
                return core_.refuse(ev, Errc::access_denied, "no backup permission for " + path);
            }
            auto versions = core_.store().object_versions(o.id);
            if (!versions)
                return tl::unexpected(versions.error());
            json vs = json::array();
            for (const auto& v : *versions)
                vs.push_back(json{{"version", v.number},
                                  {"created", v.created},
                                  {"created_by", v.created_by},
                                  {"enabled", v.enabled},
                                  {"not_before", optional_micros(v.not_before)},
                                  {"expires", optional_micros(v.expires)},
                                  {"token_key", v.token_key},
                                  {"public_der", hsm::to_hex(v.public_der)},
                                  {"body", v.body},
                                  {"kek_id", v.kek_id},
                                  {"nonce", hsm::to_hex(v.nonce)},
                                  {"sealed_key", hsm::to_hex(v.sealed_key)},
                                  {"sealed_dek", hsm::to_hex(v.sealed_dek)}});
            out.push_back(json{{"kind", kind == ObjectKind::key ? "key" : "certificate"},
                               {"name", o.name},
                               {"created", o.created},
                               {"created_by", o.created_by},
                               {"spec", o.spec},
                               {"versions", vs}});
        }
    }
    return out;
}

Result<ObjectBackup::Work> ObjectBackup::plan_restore(const Caller& caller, const VaultEntry& target, VaultId source,
                                                      const json& objects)
{
    struct Planned {
        ObjectRow row;
        std::vector<ObjectVersionRow> versions;
    };
    std::vector<Planned> plan;
    audit::Event ev{.op = "restore", .caller = &caller, .vault = target.row.name};
    std::string path;
    try {
        if (!objects.is_array())
            return core_.refuse(ev, Errc::invalid_argument, "the backup's objects are not a list");
        for (const json& o : objects) {
            const std::string kind_text = o.at("kind").get<std::string>();
            if (kind_text != "key" && kind_text != "certificate")
                return core_.refuse(ev, Errc::invalid_argument, "the backup holds an object of unknown kind");
            const ObjectKind kind = kind_text == "key" ? ObjectKind::key : ObjectKind::certificate;
            Planned p;
            p.row = ObjectRow{{},
                              target.row.id,
                              kind,
                              o.at("name").get<std::string>(),
                              o.at("created").get<Micros>(),
                              o.at("created_by").get<uid_t>(),
                              o.at("spec").get<std::string>(),
                              1};
            path = path_of(kind, p.row.name);
            ev.secret = path;
            if (!is_valid_secret_name(p.row.name))
                return core_.refuse(ev, Errc::invalid_argument, "the backup names an invalid object");
            const Decided d = core_.decide(caller, target, Permission::restore, p.row.name);
            if (!d.allowed) {
                d.fill(ev);
                return core_.refuse(ev, Errc::access_denied, "no restore permission for " + path);
            }
            std::uint64_t expected = 1;
            for (const json& v : o.at("versions")) {
                ObjectVersionRow r;
                r.number = v.at("version").get<std::uint64_t>();
                if (r.number != expected++)
                    return core_.refuse(ev, Errc::invalid_argument, path + "'s versions are not 1, 2, ...");
                r.created = v.at("created").get<Micros>();
                r.created_by = v.at("created_by").get<uid_t>();
                r.enabled = v.at("enabled").get<bool>();
                if (!v.at("not_before").is_null())
                    r.not_before = v.at("not_before").get<Micros>();
                if (!v.at("expires").is_null())
                    r.expires = v.at("expires").get<Micros>();
                r.token_key = v.at("token_key").get<std::string>();
                r.public_der = hex_of(v, "public_der");
                r.body = v.at("body").get<std::string>();
                const std::string old_kek = v.at("kek_id").get<std::string>();
                const auto nonce = hex_of(v, "nonce");
                const auto sealed_key = hex_of(v, "sealed_key");
                const auto sealed_dek = hex_of(v, "sealed_dek");
                if (!r.token_key.empty()) {
                    // Referenced, never copied: it must be in this token.
                    if (auto k = keys_.find_key(hsm::KeyId{r.token_key}); !k)
                        return core_.refuse(ev, Errc::key_unavailable,
                                            path + " version " + std::to_string(r.number) + ": its key " +
                                                r.token_key + " is not in this token (token keys are never exported)");
                }
                if (!sealed_key.empty()) {
                    // Re-bind the sealed key to the target vault, in locked memory.
                    const std::string bound = sealed_key_binding(p.row.name, r);
                    const Binding old_binding{source, bound, 0, old_kek};
                    auto dek = keys_.unseal(hsm::KeyId{old_kek}, sealed_dek, dek_aad(old_binding));
                    if (!dek)
                        return core_.refuse(ev, Core::from_hsm(dek.error()).code, dek.error().message);
                    auto key = open_value(*dek, nonce, sealed_key, value_aad(old_binding));
                    if (!key)
                        return core_.refuse(ev, key.error().code, path + ": a sealed key fails authentication");
                    const Binding new_binding{target.row.id, bound, 0, target.row.kek_id};
                    auto resealed_dek = keys_.seal(hsm::KeyId{target.row.kek_id}, *dek, dek_aad(new_binding));
                    if (!resealed_dek)
                        return core_.refuse(ev, Core::from_hsm(resealed_dek.error()).code,
                                            resealed_dek.error().message);
                    auto resealed = seal_value(*dek, key->bytes(), value_aad(new_binding));
                    if (!resealed)
                        return core_.refuse(ev, resealed.error().code, resealed.error().message);
                    r.kek_id = target.row.kek_id;
                    r.nonce = std::move(resealed->nonce);
                    r.sealed_key = std::move(resealed->ciphertext);
                    r.sealed_dek = std::move(*resealed_dek);
                }
                p.versions.push_back(std::move(r));
            }
            plan.push_back(std::move(p));
        }
    } catch (const std::exception& e) {
        return core_.refuse(ev, Errc::invalid_argument, std::string("the backup's objects are malformed: ") + e.what());
    }
    return Work([this, plan = std::move(plan), caller, target_name = target.row.name](
                    Store::Transaction& tx) mutable -> Result<std::vector<std::string>> {
        std::vector<std::string> names;
        for (auto& p : plan) {
            const std::string path = path_of(p.row.kind, p.row.name);
            auto id = tx.insert_object(p.row);
            if (!id)
                return fail(id.error().code, id.error().code == Errc::already_exists
                                                 ? path + " exists in " + target_name + "; restore overwrites nothing"
                                                 : id.error().message);
            for (auto& v : p.versions) {
                v.object = *id;
                if (auto r = tx.insert_object_version(v); !r)
                    return tl::unexpected(r.error());
            }
            audit::Event one{.op = "restore", .caller = &caller, .vault = target_name, .secret = path,
                             .allowed = true, .rule = "restore", .bytes = p.versions.size()};
            if (auto a = core_.record(one); !a)
                return tl::unexpected(a.error());
            names.push_back(path);
        }
        return names;
    });
}

}  // namespace vaultfs::vault
