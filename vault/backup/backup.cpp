// SecretService: backup and restore.
//
// A backup is a JSON document ("format": "vaultfs-backup/1") holding each
// live secret's versions exactly as stored — ciphertext, nonce, sealed DEK,
// KEK id and attributes — and `sig`, an ECDSA P-256 signature by the state's
// token-held signing key over the SHA-256 of the document without `sig`.
// It never holds plaintext or an unsealed key.
//
// Restore checks that the backup's KEK is in this token and that the
// signature verifies with this state's public key, then re-binds each
// version to its new home: the DEK is unsealed under the old KEK and AAD and
// sealed again under the target vault's KEK with the new AAD, and the value
// re-encrypted under the new AAD — inside the daemon, in locked memory.

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include "vault/backup/format.hpp"
#include "vault/crypto/envelope.hpp"
#include "vault/model/names.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/secrets/secret_service.hpp"

namespace vaultfs::vault {

using json = nlohmann::json;
using policy::Permission;

namespace {

json optional_json(const std::optional<Micros>& v) { return v ? json(*v) : json(nullptr); }

}  // namespace

Result<std::string> SecretService::backup(const Caller& caller, std::string_view vault_name,
                                          std::optional<std::string_view> secret)
{
    auto v = core_.load_vault(vault_name);
    if (!v || (!is_admin(caller) && !(*v)->policy->holds_any(caller.who)))
        return core_.refuse(audit::Event{.op = "backup", .caller = &caller, .vault = vault_name,
                                 .secret = secret.value_or(""), .rule = "default-deny"},
                      Errc::not_found, "no such vault");
    const VaultEntry& vault = **v;

    std::vector<SecretRow> rows;
    if (secret) {
        auto s = store_.secret_by_name(vault.row.id, *secret);
        if (!s)
            return tl::unexpected(s.error());
        if (!*s || !(*s)->has_versions() || (*s)->deleted())
            return core_.refuse(audit::Event{.op = "backup", .caller = &caller, .vault = vault_name, .secret = *secret,
                                     .allowed = true, .rule = "lookup"},
                          Errc::not_found, "no such secret");
        rows.push_back(std::move(**s));
    } else {
        SecretId after{0};
        for (;;) {
            auto page = store_.live_secrets(vault.row.id, after, 1000);
            if (!page)
                return tl::unexpected(page.error());
            rows.insert(rows.end(), page->begin(), page->end());
            if (page->size() < 1000)
                break;
            after = page->back().id;
        }
    }

    json secrets = json::array();
    for (const auto& s : rows) {
        const Decided d = core_.decide(caller, vault, Permission::backup, s.name);
        if (!d.allowed) {
            audit::Event ev{.op = "backup", .caller = &caller, .vault = vault_name, .secret = s.name};
            d.fill(ev);
            return core_.refuse(ev, Errc::access_denied, "no backup permission for " + s.name);
        }
        auto versions = store_.versions_of(s.id);
        if (!versions)
            return tl::unexpected(versions.error());
        json vs = json::array();
        for (const auto& meta : *versions) {
            auto sealed = store_.sealed_version(meta.id);
            if (!sealed || !*sealed)
                return fail(Errc::storage, "version vanished during backup");
            auto tags = store_.tags(meta.id);
            if (!tags)
                return tl::unexpected(tags.error());
            json t = json::object();
            for (const auto& tag : *tags)
                t[tag.name] = tag.value;
            vs.push_back(json{{"version", meta.number},
                              {"kek_id", (*sealed)->kek_id},
                              {"nonce", to_hex((*sealed)->nonce)},
                              {"ciphertext", to_hex((*sealed)->ciphertext)},
                              {"sealed_dek", to_hex((*sealed)->sealed_dek)},
                              {"size", meta.size},
                              {"created", meta.created},
                              {"created_by", meta.created_by},
                              {"updated", meta.updated},
                              {"enabled", meta.enabled},
                              {"not_before", optional_json(meta.not_before)},
                              {"expires", optional_json(meta.expires)},
                              {"content_type", meta.content_type ? json(*meta.content_type) : json(nullptr)},
                              {"tags", t}});
        }
        secrets.push_back(json{{"name", s.name}, {"created", s.created}, {"next_version", s.next_version}, {"versions", vs}});
    }
    json doc{{"format", backup_format},
             {"created", now_micros()},
             {"vault", json{{"id", vault.row.id.value}, {"name", vault.row.name}, {"kek_id", vault.row.kek_id}}},
             {"secrets", secrets}};
    if (!secret && options_.backup_objects) {
        auto objects = options_.backup_objects(caller, vault);
        if (!objects)
            return tl::unexpected(objects.error());
        if (!objects->empty())
            doc["objects"] = std::move(*objects);
    }
    auto sealed = seal_document(doc, [&](std::span<const std::uint8_t, 32> digest) {
        return keys_.sign_digest(options_.signing_key, digest);
    });
    audit::Event ev{.op = "backup", .caller = &caller, .vault = vault_name, .secret = secret.value_or(""),
                  .allowed = true, .rule = "backup"};
    if (!sealed)
        return core_.refuse(ev, Errc::key_unavailable, "cannot sign the backup: " + sealed.error());
    ev.bytes = sealed->size();
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return std::move(*sealed);
}

Result<std::vector<std::string>> SecretService::restore(const Caller& caller, std::string_view document,
                                                        std::optional<std::string_view> into)
{
    audit::Event ev{.op = "restore", .caller = &caller, .vault = into.value_or(""), .rule = "default-deny"};
    auto doc = parse_backup(document);
    if (!doc)
        return core_.refuse(ev, Errc::invalid_argument, doc.error().message);
    const std::string target_name(into.value_or(doc->source_name));
    ev.vault = target_name;

    // Where the key is, first: the most useful thing to say on another host.
    if (auto k = keys_.find_key(hsm::KeyId{doc->source_kek}); !k) {
        ev.reason = "KEK not in this token";
        return core_.refuse(ev, k.error().code == hsm::Errc::key_not_found ? Errc::key_unavailable : core_.from_hsm(k.error()).code,
                      "this backup's vault key (KEK " + doc->source_kek +
                          ") is not in this token: a backup can only be restored where its vault's KEK exists");
    }
    if (!doc->hash_matches || !SignatureVerifier(options_.signing_public_pem).verify(doc->signed_digest, doc->signature)) {
        ev.reason = "bad signature";
        return core_.refuse(ev, Errc::integrity,
                      "the backup's signature does not verify: it was altered, or made by another vaultfs state");
    }

    auto v = core_.load_vault(target_name);
    if (!v || (!is_admin(caller) && !(*v)->policy->holds_any(caller.who)))
        return core_.refuse(ev, Errc::not_found, "no vault " + target_name + " to restore into (create it first)");
    const VaultEntry& target = **v;
    // Into another vault, the caller must also hold `restore` in the vault the
    // backup came from — else an admin could make a vault (owning it) and
    // read any vault's backup there. A backup whose vault is gone restores
    // only into a vault of its own name.
    if (target.row.name != doc->source_name) {
        auto source = core_.load_vault(doc->source_name);
        if (!source) {
            ev.reason = "source vault gone";
            return core_.refuse(ev, Errc::access_denied,
                          "the backup's vault " + doc->source_name + " no longer exists: restore into a vault of that name");
        }
        if (!(*source)->policy->evaluate(caller.who, Permission::restore).allowed) {
            ev.reason = "no restore permission in the source vault";
            return core_.refuse(ev, Errc::access_denied, "restoring into another vault needs `restore` in " + doc->source_name);
        }
    }

    struct Restored {
        std::string name;
        Micros created;
        std::uint64_t next_version;
        std::vector<SealedVersion> versions;
        std::vector<std::vector<Tag>> tags;
    };
    std::vector<Restored> plan;
    for (auto& s : doc->secrets) {
        ev.secret = s.name;
        const Decided d = core_.decide(caller, target, Permission::restore, s.name);
        if (!d.allowed) {
            d.fill(ev);
            return core_.refuse(ev, Errc::access_denied, "no restore permission for " + s.name);
        }
        Restored r{s.name, s.created, s.next_version, {}, {}};
        for (auto& bv : s.versions) {
            // Re-bind: open under the old binding, seal under the new.
            const Binding old_binding{doc->source_vault, s.name, bv.meta.number, bv.kek_id};
            auto dek = keys_.unseal(hsm::KeyId{bv.kek_id}, bv.sealed_dek, dek_aad(old_binding));
            if (!dek)
                return core_.refuse(ev, core_.from_hsm(dek.error()).code, dek.error().message);
            auto value = vault::open_value(*dek, bv.nonce, bv.ciphertext, value_aad(old_binding));
            if (!value)
                return core_.refuse(ev, value.error().code, "a version in the backup fails authentication");
            const Binding new_binding{target.row.id, s.name, bv.meta.number, target.row.kek_id};
            auto resealed_dek = keys_.seal(hsm::KeyId{target.row.kek_id}, *dek, dek_aad(new_binding));
            if (!resealed_dek)
                return core_.refuse(ev, core_.from_hsm(resealed_dek.error()).code, resealed_dek.error().message);
            auto resealed = seal_value(*dek, value->bytes(), value_aad(new_binding));
            if (!resealed)
                return core_.refuse(ev, resealed.error().code, resealed.error().message);
            bv.meta.size = value->size();
            r.versions.push_back(SealedVersion{bv.meta, target.row.kek_id, std::move(resealed->nonce),
                                               std::move(resealed->ciphertext), std::move(*resealed_dek)});
            r.tags.push_back(std::move(bv.tags));
        }
        plan.push_back(std::move(r));
    }

    std::function<Result<std::vector<std::string>>(Store::Transaction&)> objects;
    if (!doc->objects.empty()) {
        if (!options_.restore_objects)
            return core_.refuse(ev, Errc::invalid_argument, "this daemon restores no keys or certificates");
        auto planned = options_.restore_objects(caller, target, doc->source_vault, doc->objects);
        if (!planned)
            return tl::unexpected(planned.error());
        objects = std::move(*planned);
    }

    std::vector<std::string> names;
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        if (objects) {
            auto restored = objects(tx);
            if (!restored)
                return tl::unexpected(restored.error());
            names = std::move(*restored);
        }
        for (auto& r : plan) {
            auto existing = tx.secret_by_name(target.row.id, r.name);
            if (!existing)
                return tl::unexpected(existing.error());
            if (*existing && ((*existing)->has_versions() || (*existing)->deleted()))
                return fail(Errc::already_exists, "secret " + r.name + " exists in " + target_name +
                                                      " (live or soft-deleted); restore overwrites nothing");
            if (*existing)  // an abandoned create: no versions, nothing to keep
                if (auto p = tx.purge_secret((*existing)->id); !p)
                    return p;
            auto id = tx.insert_secret(target.row.id, r.name, r.created, r.next_version);
            if (!id)
                return tl::unexpected(id.error());
            for (std::size_t i = 0; i < r.versions.size(); ++i) {
                r.versions[i].meta.secret = *id;
                auto vid = tx.insert_version(r.versions[i]);
                if (!vid)
                    return tl::unexpected(vid.error());
                if (auto t = tx.replace_tags(*vid, r.tags[i]); !t)
                    return t;
            }
            audit::Event one{.op = "restore", .caller = &caller, .vault = target_name, .secret = r.name,
                           .allowed = true, .rule = "restore", .bytes = r.versions.size()};
            if (auto a = core_.record(one); !a)
                return a;
            names.push_back(r.name);
        }
        return {};
    });
    if (!w) {
        ev.secret = "";
        if (w.error().code == Errc::audit_unavailable)
            return tl::unexpected(w.error());
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    return names;
}

}  // namespace vaultfs::vault
