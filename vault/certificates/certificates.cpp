#include "vault/certificates/certificates.hpp"

#include <openssl/rand.h>
#include <openssl/x509.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <cstring>

#include "hsm/hex.hpp"
#include "vault/model/attributes.hpp"
#include "vault/certificates/x509.hpp"
#include "vault/crypto/envelope.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::vault::certificates {

using policy::Permission;
using json = nlohmann::json;

// ---- policy and files -------------------------------------------------------------

std::string CertPolicy::to_json() const
{
    json j{{"subject", subject},
           {"sans", sans},
           {"validity", validity.count()},
           {"key", std::string(hsm::to_string(key))},
           {"exportable", exportable},
           {"ca", ca},
           {"issuer", issuer}};
    if (renew_at_percent)
        j["renew_at_percent"] = *renew_at_percent;
    if (renew_before)
        j["renew_before"] = renew_before->count();
    return j.dump();
}

std::optional<CertPolicy> CertPolicy::from_json(std::string_view text)
{
    const json j = json::parse(text, nullptr, false);
    if (!j.is_object())
        return std::nullopt;
    CertPolicy p;
    p.subject = j.value("subject", "");
    p.sans = j.value("sans", "");
    p.validity = std::chrono::seconds(j.value("validity", std::int64_t{0}));
    const auto key = hsm::key_type_from(j.value("key", "ec-p256"));
    if (!key)
        return std::nullopt;
    p.key = *key;
    p.exportable = j.value("exportable", false);
    p.ca = j.value("ca", false);
    p.issuer = j.value("issuer", "self");
    if (j.contains("renew_at_percent"))
        p.renew_at_percent = j["renew_at_percent"].get<int>();
    if (j.contains("renew_before"))
        p.renew_before = std::chrono::seconds(j["renew_before"].get<std::int64_t>());
    return p;
}

namespace {

struct FileName {
    CertFile file;
    std::string_view name;
};
constexpr FileName file_names[] = {
    {CertFile::cert, "cert.pem"},       {CertFile::chain, "chain.pem"},   {CertFile::ca, "ca.pem"},
    {CertFile::key, "key.pem"},         {CertFile::bundle, "bundle.pem"}, {CertFile::bundle_p12, "bundle.p12"},
    {CertFile::csr, "csr.pem"},         {CertFile::status, "status"},
};

json body_of(const ObjectVersionRow& row)
{
    json j = json::parse(row.body, nullptr, false);
    return j.is_object() ? j : json::object();
}

bool exportable(const ObjectVersionRow& row) { return !row.sealed_key.empty(); }

Result<hsm::SecureBuffer> secure_copy(std::string_view text)
{
    auto out = hsm::SecureBuffer::allocate(text.size());
    if (!out)
        return fail(Errc::out_of_memory, out.error().message);
    if (!text.empty())
        std::memcpy(out->data(), text.data(), text.size());
    return std::move(*out);
}

std::string random_ref()
{
    std::uint8_t ref[16];
    RAND_bytes(ref, sizeof ref);
    return hsm::to_hex(ref);
}

}  // namespace

std::optional<CertFile> cert_file(std::string_view name)
{
    for (const auto& f : file_names)
        if (f.name == name)
            return f.file;
    return std::nullopt;
}

std::string_view to_string(CertFile file)
{
    for (const auto& f : file_names)
        if (f.file == file)
            return f.name;
    return "?";
}

std::string status_of(const ObjectView& view) { return body_of(view.version).value("status", "failed"); }

std::vector<CertFile> files_of(const ObjectView& view)
{
    const std::string status = status_of(view);
    std::vector<CertFile> out;
    if (status == "issued") {
        out = {CertFile::cert, CertFile::chain, CertFile::ca};
        if (exportable(view.version))
            out.insert(out.end(), {CertFile::key, CertFile::bundle, CertFile::bundle_p12});
    }
    if (status == "pending")
        out.push_back(CertFile::csr);
    out.push_back(CertFile::status);
    return out;
}

// ---- keys of versions ----------------------------------------------------------------

Result<void> Certificates::seal_key(const VaultEntry& v, const std::string& name, std::span<const std::uint8_t> der,
                                    ObjectVersionRow& row)
{
    json body = body_of(row);
    const std::string ref = random_ref();
    body["key_ref"] = ref;
    row.body = body.dump();
    const std::string bound = sealed_key_binding(name, row);
    const Binding binding{v.row.id, bound, 0, v.row.kek_id};
    auto dek = new_dek();
    if (!dek)
        return tl::unexpected(dek.error());
    auto sealed = seal_value(*dek, der, value_aad(binding));
    if (!sealed)
        return tl::unexpected(sealed.error());
    auto sealed_dek = keys_.seal(hsm::KeyId{v.row.kek_id}, *dek, dek_aad(binding));
    if (!sealed_dek)
        return tl::unexpected(Core::from_hsm(sealed_dek.error()));
    row.kek_id = v.row.kek_id;
    row.nonce = std::move(sealed->nonce);
    row.sealed_key = std::move(sealed->ciphertext);
    row.sealed_dek = std::move(*sealed_dek);
    return {};
}

Result<hsm::SecureBuffer> Certificates::unseal_key(const VaultEntry& v, const ObjectRow& object,
                                                   const ObjectVersionRow& row)
{
    const std::string bound = sealed_key_binding(object.name, row);
    const Binding binding{v.row.id, bound, 0, row.kek_id};
    auto dek = keys_.unseal(hsm::KeyId{row.kek_id}, row.sealed_dek, dek_aad(binding));
    if (!dek)
        return tl::unexpected(Core::from_hsm(dek.error()));
    return open_value(*dek, row.nonce, row.sealed_key, value_aad(binding));
}

Result<void> Certificates::with_key(const VaultEntry& v, const ObjectRow& object, const ObjectVersionRow& version,
                                    const std::function<Result<void>(EVP_PKEY*)>& use)
{
    if (!version.token_key.empty()) {
        Result<void> inner;
        auto r = evp_.with_private_key(hsm::KeyId{version.token_key}, [&](EVP_PKEY* key) -> hsm::Result<void> {
            inner = use(key);
            return {};
        });
        if (!r)
            return tl::unexpected(Core::from_hsm(r.error()));
        return inner;
    }
    auto der = unseal_key(v, object, version);
    if (!der)
        return tl::unexpected(der.error());
    auto key = private_key_from_der(der->bytes());
    if (!key)
        return tl::unexpected(key.error());
    return use(key->get());
}

// ---- making versions -----------------------------------------------------------------

Result<ObjectVersionRow> Certificates::make_version(const Caller* caller, const VaultEntry& v,
                                                      const std::string& name, const CertPolicy& policy,
                                                      audit::Event& ev)
{
    const Micros now = now_micros();
    Request request{policy.subject, policy.sans, now - 60 * 1000000, now + policy.validity.count() * 1000000,
                    policy.ca};
    if (auto r = check_request(request); !r)
        return core_.refuse(ev, r.error().code, r.error().message);

    // The issuer, when it is a vault CA: found and authorized before any key is made.
    std::shared_ptr<const VaultEntry> ca_vault;
    std::optional<ObjectRow> ca_object;
    std::optional<ObjectVersionRow> ca_version;
    Cert ca_cert;
    std::string ca_chain;
    if (policy.issuer != "self" && policy.issuer != "unknown") {
        const auto slash = policy.issuer.find('/');
        const std::string ca_vault_name = policy.issuer.substr(0, slash);
        const std::string ca_name = slash == std::string::npos ? "" : policy.issuer.substr(slash + 1);
        auto cv = core_.load_vault(ca_vault_name);
        if (!cv)
            return core_.refuse(ev, Errc::invalid_argument, "no vault " + ca_vault_name + " for the issuer");
        ca_vault = *cv;
        if (caller != nullptr) {
            const Decided d = core_.decide(*caller, *ca_vault, Permission::sign, ca_name);
            if (!d.allowed) {
                const std::string ca_path = objects_.path_of(ca_name);  // the event only views it
                audit::Event ca_ev{.op = "cert_issue", .caller = caller, .vault = ca_vault->row.name,
                                   .secret = ca_path};
                d.fill(ca_ev);
                static_cast<void>(core_.refuse(ca_ev, Errc::access_denied));
                return core_.refuse(ev, Errc::access_denied,
                                    "no sign permission on the issuer " + policy.issuer);
            }
        }
        auto row = core_.store().object_by_name(ca_vault->row.id, ObjectKind::certificate, ca_name);
        if (!row || !*row)
            return core_.refuse(ev, Errc::invalid_argument, "no certificate " + policy.issuer + " to issue with");
        ca_object = std::move(**row);
        auto cur = core_.store().object_version(ca_object->id, std::nullopt);
        const auto ca_policy = CertPolicy::from_json(ca_object->spec);
        if (!cur || !*cur || body_of(**cur).value("status", "") != "issued" || !ca_policy || !ca_policy->ca)
            return core_.refuse(ev, Errc::invalid_argument,
                                policy.issuer + " is not an issued CA certificate (make one with --ca)");
        ca_version = std::move(**cur);
        const json cb = body_of(*ca_version);
        auto certs = certs_from_pem(cb.value("cert", ""));
        if (!certs)
            return core_.refuse(ev, Errc::integrity, "the issuer's certificate does not parse");
        ca_cert = std::move(certs->front());
        ca_chain = cb.value("cert", "") + cb.value("ca", "");
        request.not_after = std::min(request.not_after, not_after_of(ca_cert.get()));
    }

    ObjectVersionRow row;
    row.created = now;
    row.created_by = caller != nullptr ? caller->who.uid : 0;
    row.body = "{}";
    std::optional<hsm::KeyId> token_key;
    if (policy.exportable) {
        auto key = generate_key(policy.key);
        if (!key)
            return core_.refuse(ev, key.error().code, key.error().message);
        auto der = private_key_der(key->get());
        if (!der)
            return core_.refuse(ev, der.error().code, der.error().message);
        if (auto s = seal_key(v, name, der->bytes(), row); !s)
            return core_.refuse(ev, s.error().code, s.error().message);
        row.public_der = spki_of(key->get());
    } else {
        auto id = pairs_.create_key_pair(policy.key, "vaultfs-cert:" + v.row.name + "/" + name,
                                         hsm::KeyUsage{.sign = true});
        if (!id)
            return core_.refuse(ev, id.error().code == hsm::Errc::mechanism_unsupported ? Errc::invalid_argument
                                                                                : Errc::key_unavailable,
                                id.error().code == hsm::Errc::mechanism_unsupported
                                    ? id.error().message
                                    : "the token cannot make the key: " + id.error().message);
        token_key = *id;
        auto der = pairs_.public_key_der(*id);
        if (!der) {
            static_cast<void>(pairs_.destroy_key_pair(*id));
            return core_.refuse(ev, Errc::key_unavailable, der.error().message);
        }
        row.token_key = id->hex;
        row.public_der = std::move(*der);
    }
    const auto drop_token_key = [&] {
        if (token_key)
            static_cast<void>(pairs_.destroy_key_pair(*token_key));
    };
    auto subject_key = public_key_from_spki(row.public_der);
    if (!subject_key) {
        drop_token_key();
        return core_.refuse(ev, subject_key.error().code, subject_key.error().message);
    }
    const ObjectRow self{{}, v.row.id, ObjectKind::certificate, name, now, 0, "", 1};
    json body = body_of(row);
    Result<void> made;
    if (policy.issuer == "unknown") {
        made = with_key(v, self, row, [&](EVP_PKEY* key) -> Result<void> {
            auto csr = make_csr(request, subject_key->get(), key);
            if (!csr)
                return tl::unexpected(csr.error());
            body["status"] = "pending";
            body["csr"] = *csr;
            return {};
        });
    } else {
        const bool self_signed = policy.issuer == "self";
        const auto sign_with = [&](EVP_PKEY* signer) -> Result<void> {
            auto cert = issue(request, subject_key->get(), self_signed ? nullptr : ca_cert.get(), signer);
            if (!cert)
                return tl::unexpected(cert.error());
            body["status"] = "issued";
            body["cert"] = to_pem(cert->get());
            body["ca"] = self_signed ? std::string() : ca_chain;
            body["not_before"] = not_before_of(cert->get());
            body["not_after"] = not_after_of(cert->get());
            return {};
        };
        made = self_signed ? with_key(v, self, row, sign_with) : with_key(*ca_vault, *ca_object, *ca_version, sign_with);
    }
    if (!made) {
        drop_token_key();
        return core_.refuse(ev, made.error().code, made.error().message);
    }
    row.body = body.dump();
    return row;
}

Result<ObjectView> Certificates::commit(const Caller* caller, const VaultEntry& v, std::optional<ObjectRow> object,
                                        ObjectRow fresh, ObjectVersionRow row, audit::Event& ev)
{
    ev.allowed = true;
    ev.result = "ok";
    ObjectRow target = object ? std::move(*object) : std::move(fresh);
    auto w = core_.store().write([&](Store::Transaction& tx) -> Result<void> {
        if (target.id.value == 0) {
            auto made = tx.insert_object(target);
            if (!made)
                return tl::unexpected(made.error());
            target.id = *made;
        }
        row.object = target.id;
        if (auto r = tx.insert_object_version(row); !r)
            return r;
        ev.version = row.number;
        return core_.record(ev);
    });
    if (!w) {
        if (!row.token_key.empty())
            static_cast<void>(pairs_.destroy_key_pair(hsm::KeyId{row.token_key}));
        if (w.error().code == Errc::audit_unavailable)
            return tl::unexpected(w.error());
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    keep_on_token(v, target.name, row);
    const Caller daemon{};
    return objects_.view_of(caller != nullptr ? *caller : daemon, v, std::move(target), std::move(row), false);
}

void Certificates::keep_on_token(const VaultEntry& v, const std::string& name, const ObjectVersionRow& row)
{
    if (row.token_key.empty() || body_of(row).value("status", "") != "issued")
        return;
    auto certs = certs_from_pem(body_of(row).value("cert", ""));
    if (!certs)
        return;
    if (auto r = evp_.store_certificate(hsm::KeyId{row.token_key}, certs->front().get(),
                                        "vaultfs-cert:" + v.row.name + "/" + name);
        !r)
        spdlog::warn("certificate {}/{} version {}: {}", v.row.name, name, row.number, r.error().message);
}

Result<ObjectView> Certificates::create(const Caller& caller, std::string_view vault, std::string_view name,
                                        CertPolicy policy)
{
    auto t = objects_.target(caller, vault, name, Permission::create, "cert_create", true);
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "cert_create", .caller = &caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    if (t->object)
        return core_.refuse(ev, Errc::already_exists, path + " exists in " + t->vault->row.name);
    if (policy.validity.count() <= 0)
        return core_.refuse(ev, Errc::invalid_argument, "a certificate's validity must be positive");
    if (policy.renew_at_percent && (*policy.renew_at_percent < 1 || *policy.renew_at_percent > 99))
        return core_.refuse(ev, Errc::invalid_argument, "--renew-at is a share of the validity, 1% to 99%");
    auto made = make_version(&caller, *t->vault, std::string(name), policy, ev);
    if (!made)
        return tl::unexpected(made.error());
    ObjectRow fresh{{}, t->vault->row.id, ObjectKind::certificate, std::string(name), now_micros(), caller.who.uid,
                    policy.to_json(), 1};
    return commit(&caller, *t->vault, std::nullopt, std::move(fresh), std::move(*made), ev);
}

Result<ObjectView> Certificates::renew(const Caller* caller, std::string_view vault, std::string_view name)
{
    auto t = objects_.target(caller, vault, name, Permission::rotate, "cert_renew", "renewal-policy");
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "cert_renew", .caller = caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    const VaultEntry& v = *t->vault;
    ObjectRow& object = *t->object;
    const auto policy = CertPolicy::from_json(object.spec);
    if (!policy)
        return core_.refuse(ev, Errc::integrity, "the certificate's stored policy does not parse");
    if (policy->subject.empty())
        return core_.refuse(ev, Errc::invalid_argument,
                            path + " was imported: import its next version, or create it with a policy");
    auto made = make_version(caller, v, object.name, *policy, ev);
    if (!made)
        return tl::unexpected(made.error());
    return commit(caller, v, std::move(object), ObjectRow{}, std::move(*made), ev);
}

Result<ObjectView> Certificates::merge(const Caller& caller, std::string_view vault, std::string_view name,
                                       std::string_view signed_pem)
{
    auto t = objects_.target(caller, vault, name, Permission::create, "cert_merge", false);
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "cert_merge", .caller = &caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    auto current = core_.store().object_version(t->object->id, std::nullopt);
    if (!current)
        return core_.refuse(ev, current.error().code, current.error().message);
    if (!*current || body_of(**current).value("status", "") != "pending")
        return core_.refuse(ev, Errc::invalid_argument, path + " has no pending request to merge");
    ObjectVersionRow row = std::move(**current);
    ev.version = row.number;
    auto certs = certs_from_pem(signed_pem);
    if (!certs)
        return core_.refuse(ev, certs.error().code, certs.error().message);
    if (!matches(certs->front().get(), row.public_der))
        return core_.refuse(ev, Errc::invalid_argument,
                            "the certificate is not for " + path + "'s pending key (its CSR is csr.pem)");
    json body = body_of(row);
    body["status"] = "issued";
    body["cert"] = to_pem(certs->front().get());
    std::string ca;
    for (std::size_t i = 1; i < certs->size(); ++i)
        ca += to_pem((*certs)[i].get());
    body["ca"] = ca;
    body["not_before"] = not_before_of(certs->front().get());
    body["not_after"] = not_after_of(certs->front().get());
    body.erase("csr");
    row.body = body.dump();
    ev.result = "ok";
    if (auto w = core_.write_audited(ev, [&](Store::Transaction& tx) { return tx.update_object_version(row); }); !w)
        return tl::unexpected(w.error());
    keep_on_token(*t->vault, t->object->name, row);
    return objects_.view_of(caller, *t->vault, std::move(*t->object), std::move(row), false);
}

Result<ObjectView> Certificates::import(const Caller& caller, std::string_view vault, std::string_view name,
                                        std::span<const std::uint8_t> data, const std::string& password)
{
    auto t = objects_.target(caller, vault, name, Permission::create, "cert_import", true);
    if (!t)
        return tl::unexpected(t.error());
    const std::string path = objects_.path_of(name);
    audit::Event ev{.op = "cert_import", .caller = &caller, .vault = t->vault->row.name, .secret = path};
    t->decided.fill(ev);
    auto imported = certificates::import(data, password);
    if (!imported)
        return core_.refuse(ev, imported.error().code, imported.error().message);
    if (!imported->key)
        return core_.refuse(ev, Errc::invalid_argument, "the file holds no private key for its certificate");
    const auto type = key_type_of(imported->key.get());
    if (!type)
        return core_.refuse(ev, Errc::invalid_argument,
                            "the key is of a type vaultfs does not keep (rsa-2048..4096, ec-p256/384/521)");
    ObjectVersionRow row;
    row.created = now_micros();
    row.created_by = caller.who.uid;
    row.body = "{}";
    auto der = private_key_der(imported->key.get());
    if (!der)
        return core_.refuse(ev, der.error().code, der.error().message);
    if (auto s = seal_key(*t->vault, std::string(name), der->bytes(), row); !s)
        return core_.refuse(ev, s.error().code, s.error().message);
    row.public_der = spki_of(imported->key.get());
    json body = body_of(row);
    X509* leaf = imported->chain.front().get();
    body["status"] = "issued";
    body["cert"] = to_pem(leaf);
    std::string ca;
    for (std::size_t i = 1; i < imported->chain.size(); ++i)
        ca += to_pem(imported->chain[i].get());
    body["ca"] = ca;
    body["not_before"] = not_before_of(leaf);
    body["not_after"] = not_after_of(leaf);
    row.body = body.dump();
    CertPolicy policy;
    policy.key = *type;
    policy.exportable = true;
    policy.issuer = "unknown";
    policy.subject.clear();  // imported: renewed by importing again
    ObjectRow fresh{{}, t->vault->row.id, ObjectKind::certificate, std::string(name), now_micros(), caller.who.uid,
                    policy.to_json(), 1};
    return commit(&caller, *t->vault, std::move(t->object), std::move(fresh), std::move(row), ev);
}

// ---- reading -------------------------------------------------------------------------

Result<hsm::SecureBuffer> Certificates::read_file(const Caller& caller, const ObjectView& view, CertFile file)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = objects_.path_of(view.object.name);
    const bool private_part = file == CertFile::key || file == CertFile::bundle || file == CertFile::bundle_p12;
    const Decided d = private_part ? core_.decide(caller, **v, Permission::get, view.object.name)
                                   : core_.decide_any(caller, **v, {Permission::get, Permission::certificates},
                                                      view.object.name);
    audit::Event ev{.op = "cert_get", .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number, .attribute = to_string(file)};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied,
                            std::string(private_part ? "no get permission" : "no get or certificates permission") +
                                " on " + path);
    const auto files = files_of(view);
    if (std::find(files.begin(), files.end(), file) == files.end())
        return core_.refuse(ev, Errc::not_found,
                            private_part && !exportable(view.version)
                                ? path + "'s key is in the token and never leaves it (not exportable)"
                                : path + " has no " + std::string(to_string(file)) + " now");
    if (file != CertFile::status && !view.version.enabled)
        return core_.refuse(ev, Errc::disabled, "version " + std::to_string(view.version.number) + " is disabled");
    // Its window too (`user.vault.not_before`, `expires`), as a secret's
    // version and a key's have: `status` alone still answers outside it.
    if (const Micros now = now_micros();
        file != CertFile::status && ((view.version.not_before && now < *view.version.not_before) ||
                                     (view.version.expires && now >= *view.version.expires)))
        return core_.refuse(ev, Errc::not_valid_now,
                            "version " + std::to_string(view.version.number) + " is outside its validity");
    const json body = body_of(view.version);
    Result<hsm::SecureBuffer> out = fail(Errc::not_found);
    switch (file) {
    case CertFile::cert:
        out = secure_copy(body.value("cert", ""));
        break;
    case CertFile::chain:
        out = secure_copy(body.value("cert", "") + body.value("ca", ""));
        break;
    case CertFile::ca:
        out = secure_copy(body.value("ca", ""));
        break;
    case CertFile::csr:
        out = secure_copy(body.value("csr", ""));
        break;
    case CertFile::status: {
        std::string text = "status: " + body.value("status", "failed") + "\n";
        if (body.contains("not_after"))
            text += "not_after: " + format_rfc3339(body["not_after"].get<Micros>()) + "\n";
        const auto policy = CertPolicy::from_json(view.object.spec);
        if (policy && body.contains("not_after") && body.contains("not_before")) {
            const Micros nb = body["not_before"].get<Micros>();
            const Micros na = body["not_after"].get<Micros>();
            std::optional<Micros> due;
            if (policy->renew_at_percent)
                due = nb + (na - nb) / 100 * *policy->renew_at_percent;
            else if (policy->renew_before)
                due = na - policy->renew_before->count() * 1000000;
            if (due)
                text += "next_renewal: " + format_rfc3339(*due) + "\n";
        }
        out = secure_copy(text);
        break;
    }
    case CertFile::key:
    case CertFile::bundle:
    case CertFile::bundle_p12: {
        auto der = unseal_key(**v, view.object, view.version);
        if (!der) {
            out = tl::unexpected(der.error());
            break;
        }
        if (file == CertFile::key) {
            out = private_key_pem(der->bytes());
            break;
        }
        if (file == CertFile::bundle) {
            auto pem = private_key_pem(der->bytes());
            if (!pem) {
                out = tl::unexpected(pem.error());
                break;
            }
            const std::string chain = body.value("cert", "") + body.value("ca", "");
            auto all = hsm::SecureBuffer::allocate(pem->size() + chain.size());
            if (!all) {
                out = fail(Errc::out_of_memory, all.error().message);
                break;
            }
            std::memcpy(all->data(), pem->data(), pem->size());
            std::memcpy(all->data() + pem->size(), chain.data(), chain.size());
            out = std::move(*all);
            break;
        }
        auto key = private_key_from_der(der->bytes());
        auto certs = certs_from_pem(body.value("cert", "") + body.value("ca", ""));
        if (!key || !certs) {
            out = fail(Errc::integrity, "the stored certificate or key does not parse");
            break;
        }
        std::vector<X509*> chain;
        for (auto& c : *certs)
            chain.push_back(c.get());
        out = to_pkcs12(key->get(), chain, view.object.name);
        break;
    }
    }
    if (!out)
        return core_.refuse(ev, out.error().code, out.error().message);
    ev.result = "ok";
    ev.bytes = out->size();
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return out;
}

Result<std::vector<std::pair<std::string, std::string>>> Certificates::attributes(const Caller& caller,
                                                                                  const ObjectView& view)
{
    const auto policy = CertPolicy::from_json(view.object.spec).value_or(CertPolicy{});
    const json body = body_of(view.version);
    std::vector<std::pair<std::string, std::string>> extra{
        {"status", body.value("status", "failed")},
        {"exportable", format_bool(exportable(view.version))},
        {"key_type", std::string(hsm::to_string(policy.key))},
        {"issuer", policy.issuer},
    };
    if (!policy.subject.empty())
        extra.emplace_back("subject", policy.subject);
    if (!policy.sans.empty())
        extra.emplace_back("sans", policy.sans);
    if (body.contains("not_after"))
        extra.emplace_back("not_after", format_rfc3339(body["not_after"].get<Micros>()));
    return objects_.attributes(caller, view, std::move(extra));
}

Result<std::size_t> Certificates::run_policies(Micros now)
{
    auto all = core_.store().all_objects();
    if (!all)
        return tl::unexpected(all.error());
    std::size_t renewed = 0;
    for (const auto& object : *all) {
        if (object.kind != ObjectKind::certificate)
            continue;
        const auto policy = CertPolicy::from_json(object.spec);
        if (!policy || (!policy->renew_at_percent && !policy->renew_before) || policy->subject.empty())
            continue;
        auto current = core_.store().object_version(object.id, std::nullopt);
        if (!current || !*current)
            continue;
        const json body = body_of(**current);
        if (body.value("status", "") != "issued" || !body.contains("not_after") || !body.contains("not_before"))
            continue;
        const Micros nb = body["not_before"].get<Micros>();
        const Micros na = body["not_after"].get<Micros>();
        const Micros due = policy->renew_at_percent ? nb + (na - nb) / 100 * *policy->renew_at_percent
                                                    : na - policy->renew_before->count() * 1000000;
        if (now < due)
            continue;
        auto v = core_.load_vault(object.vault);
        if (!v)
            continue;
        if (auto r = renew(nullptr, (*v)->row.name, object.name); r) {
            spdlog::info("certificate {}/{} renewed by its policy: version {}", (*v)->row.name, object.name,
                         r->version.number);
            ++renewed;
        } else {
            spdlog::error("renewing certificate {}/{} failed: {}", (*v)->row.name, object.name, r.error().message);
        }
    }
    return renewed;
}

}  // namespace vaultfs::vault::certificates
