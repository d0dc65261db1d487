#include "vault/objects/objects.hpp"

#include <functional>

#include <nlohmann/json.hpp>

#include "vault/model/attributes.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::vault {

using policy::Permission;

std::string sealed_key_binding(std::string_view name, const ObjectVersionRow& row)
{
    const auto body = nlohmann::json::parse(row.body, nullptr, false);
    const std::string ref = body.is_object() ? body.value("key_ref", "") : std::string();
    return "certificate-key/" + std::string(name) + "/" + ref;
}

std::string Objects::path_of(std::string_view name) const
{
    return std::string(kind_ == ObjectKind::key ? ".keys/" : ".certs/") + std::string(name);
}

ObjectView Objects::view_of(const Caller& caller, const VaultEntry& v, ObjectRow object, ObjectVersionRow version,
                            bool pinned) const
{
    const auto permissions = v.policy->effective(caller.who, object.name);
    return ObjectView{v.row.id, v.row.name, std::move(object), std::move(version), pinned, permissions};
}

Result<ObjectView> Objects::find(const Caller& caller, VaultId vault, std::string_view component)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = path_of(component);
    if (auto r = core_.reach(caller, **v, path, false, Errc::not_found); !r)
        return tl::unexpected(r.error());
    const auto parsed = parse_secret_path(component);
    if (!parsed || !is_valid_secret_name(parsed->name))
        return fail(Errc::not_found);
    auto object = core_.store().object_by_name(vault, kind_, parsed->name);
    if (!object)
        return tl::unexpected(object.error());
    if (!*object)
        return fail(Errc::not_found);
    auto version = core_.store().object_version((*object)->id, parsed->version);
    if (!version)
        return tl::unexpected(version.error());
    if (!*version)
        return fail(Errc::not_found);
    return view_of(caller, **v, std::move(**object), std::move(**version), parsed->version.has_value());
}

Result<ObjectView> Objects::by_version_id(const Caller& caller, ObjectVersionId id, bool pinned)
{
    auto version = core_.store().object_version_by_id(id);
    if (!version)
        return tl::unexpected(version.error());
    if (!*version)
        return fail(Errc::not_found);
    auto object = core_.store().object_by_id((*version)->object);
    if (!object)
        return tl::unexpected(object.error());
    if (!*object || (*object)->kind != kind_)
        return fail(Errc::not_found);
    auto v = core_.load_vault((*object)->vault);
    if (!v)
        return tl::unexpected(v.error());
    if (auto r = core_.reach(caller, **v, path_of((*object)->name), false, Errc::not_found); !r)
        return tl::unexpected(r.error());
    return view_of(caller, **v, std::move(**object), std::move(**version), pinned);
}

Result<std::vector<ObjectRow>> Objects::list(const Caller& caller, VaultId vault)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string dir = kind_ == ObjectKind::key ? ".keys" : ".certs";
    const Decided d = core_.decide(caller, **v, Permission::list);
    audit::Event ev{.op = "list", .caller = &caller, .vault = (*v)->row.name, .secret = dir};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    auto rows = core_.store().objects(vault, kind_);
    if (!rows)
        return core_.refuse(ev, rows.error().code, rows.error().message);
    ev.result = "ok";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return rows;
}

Result<std::vector<ObjectVersionRow>> Objects::versions(const Caller& caller, const ObjectView& view)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = path_of(view.object.name);
    const Decided d = core_.decide(caller, **v, Permission::list, view.object.name);
    audit::Event ev{.op = "list", .caller = &caller, .vault = (*v)->row.name, .secret = path};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    auto rows = core_.store().object_versions(view.object.id);
    if (!rows)
        return core_.refuse(ev, rows.error().code, rows.error().message);
    ev.result = "ok";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return rows;
}

Result<std::vector<std::pair<std::string, std::string>>> Objects::attributes(
    const Caller& caller, const ObjectView& view, std::vector<std::pair<std::string, std::string>> extra)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = path_of(view.object.name);
    const Decided d = kind_ == ObjectKind::certificate
                          ? core_.decide_any(caller, **v, {Permission::get, Permission::list, Permission::certificates},
                                             view.object.name)
                          : core_.decide_any(caller, **v, {Permission::get, Permission::list}, view.object.name);
    audit::Event ev{.op = "xattr_get", .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    ev.result = "ok";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    std::vector<std::pair<std::string, std::string>> out{
        {"version", std::to_string(view.version.number)},
        {"created", format_rfc3339(view.version.created)},
        {"enabled", format_bool(view.version.enabled)},
    };
    if (view.version.not_before)
        out.emplace_back("not_before", format_rfc3339(*view.version.not_before));
    if (view.version.expires)
        out.emplace_back("expires", format_rfc3339(*view.version.expires));
    const auto body = nlohmann::json::parse(view.version.body, nullptr, false);
    if (body.is_object() && body.contains("tags") && body["tags"].is_object())
        for (const auto& [k, val] : body["tags"].items())
            if (val.is_string())
                out.emplace_back("tag." + k, val.get<std::string>());
    for (auto& e : extra)
        out.push_back(std::move(e));
    return out;
}

Result<void> Objects::set_attribute(const Caller& caller, const ObjectView& view, std::string_view name,
                                    std::optional<std::string_view> value)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const std::string path = path_of(view.object.name);
    const Decided d = core_.decide(caller, **v, Permission::set, view.object.name);
    audit::Event ev{.op = "xattr_set", .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number, .attribute = name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    // The change, applied to the row as the transaction reads it: another
    // attribute changed meanwhile is never written back over.
    std::function<Result<void>(ObjectVersionRow&)> change;
    if (name == "enabled") {
        const auto b = value ? parse_bool(*value) : std::nullopt;
        if (!b)
            return core_.refuse(ev, Errc::invalid_argument, "enabled is true or false");
        change = [on = *b](ObjectVersionRow& row) -> Result<void> {
            row.enabled = on;
            return {};
        };
    } else if (name == "not_before" || name == "expires") {
        std::optional<Micros> t;
        if (value && !value->empty()) {
            t = parse_rfc3339(*value);
            if (!t)
                return core_.refuse(ev, Errc::invalid_argument, "times are RFC 3339 UTC, like 2027-01-31T00:00:00Z");
        }
        change = [t, expires = name == "expires"](ObjectVersionRow& row) -> Result<void> {
            (expires ? row.expires : row.not_before) = t;
            if (expires)
                row.notified = 0;  // a new expiry gets its warnings again
            return {};
        };
    } else if (name.starts_with("tag.")) {
        const std::string tag(name.substr(4));
        if (!is_valid_tag_name(tag) || (value && !is_valid_tag_value(*value)))
            return core_.refuse(ev, Errc::invalid_argument, "tag names and values are printable text of at most 512 bytes");
        change = [tag, text = value ? std::optional<std::string>(*value) : std::nullopt](
                     ObjectVersionRow& row) -> Result<void> {
            auto body = nlohmann::json::parse(row.body, nullptr, false);
            if (!body.is_object())
                body = nlohmann::json::object();
            auto& tags = body["tags"];
            if (!tags.is_object())
                tags = nlohmann::json::object();
            if (text) {
                if (!tags.contains(tag) && tags.size() >= max_tags)
                    return fail(Errc::invalid_argument, "at most 15 tags per version");
                tags[tag] = *text;
            } else if (!tags.contains(tag)) {
                return fail(Errc::no_attribute);
            } else {
                tags.erase(tag);
            }
            row.body = body.dump();
            return {};
        };
    } else {
        return core_.refuse(ev, Errc::not_permitted, std::string(name) + " cannot be changed");
    }
    ev.allowed = true;
    ev.result = "ok";
    return core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        auto row = tx.object_version(view.object.id, view.version.number);
        if (!row)
            return tl::unexpected(row.error());
        if (!*row)
            return fail(Errc::not_found);
        if (auto r = change(**row); !r)
            return r;
        return tx.update_object_version(**row);
    });
}

Result<void> Objects::authorize(const Caller& caller, const ObjectView& view, Permission wanted, std::string_view op)
{
    auto v = core_.load_vault(view.vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, wanted, view.object.name);
    if (d.allowed)
        return {};
    const std::string path = path_of(view.object.name);
    audit::Event ev{.op = op, .caller = &caller, .vault = (*v)->row.name, .secret = path,
                    .version = view.version.number};
    d.fill(ev);
    return core_.refuse(ev, Errc::access_denied, "no " + std::string(policy::to_string(wanted)) + " permission on " + path);
}

Result<Objects::Target> Objects::target(const Caller* caller, std::string_view vault, std::string_view name,
                                        Permission wanted, std::string_view op, std::string_view daemon_rule)
{
    if (caller != nullptr)
        return target(*caller, vault, name, wanted, op, false);
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    auto object = core_.store().object_by_name((*v)->row.id, kind_, name);
    if (!object)
        return tl::unexpected(object.error());
    if (!*object)
        return fail(Errc::not_found);
    return Target{*v, std::move(*object), Decided{true, std::string(daemon_rule), {}, false}};
}

Result<Objects::Target> Objects::target(const Caller& caller, std::string_view vault, std::string_view name,
                                        Permission wanted, std::string_view op, bool may_be_missing)
{
    auto v = core_.load_vault(vault);
    if (!v) {
        if (v.error().code == Errc::not_found)
            if (auto r = core_.missed_vault(caller, vault, "no such vault"); !r)
                return tl::unexpected(r.error());
        return tl::unexpected(v.error());
    }
    const std::string path = path_of(name);
    if (auto r = core_.reach(caller, **v, path, false, Errc::not_found); !r)
        return tl::unexpected(r.error());
    const Decided d = core_.decide(caller, **v, wanted, name);
    audit::Event ev{.op = op, .caller = &caller, .vault = (*v)->row.name, .secret = path};
    d.fill(ev);
    if (!is_valid_secret_name(name))
        return core_.refuse(ev, Errc::invalid_argument,
                            "a name is 1-127 characters of letters, digits and '-': '" + std::string(name) + "' is not");
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied, "no " + std::string(policy::to_string(wanted)) +
                                                         " permission on " + path + " in " + (*v)->row.name);
    auto object = core_.store().object_by_name((*v)->row.id, kind_, name);
    if (!object)
        return core_.refuse(ev, object.error().code, object.error().message);
    if (!*object && !may_be_missing)
        return core_.refuse(ev, Errc::not_found, "no " + path + " in " + (*v)->row.name);
    return Target{*v, std::move(*object), d};
}

}  // namespace vaultfs::vault
