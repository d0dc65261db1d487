// SecretService: soft delete, recover, purge, attributes and vault settings
// (the Azure Key Vault secret lifecycle).

#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <mutex>

#include "vault/model/attributes.hpp"
#include "vault/model/names.hpp"
#include "vault/secrets/secret_service.hpp"

namespace vaultfs::vault {

using policy::Permission;

namespace {

constexpr std::string_view tag_prefix = "tag.";

bool is_tag(std::string_view name) { return name.substr(0, tag_prefix.size()) == tag_prefix; }

}  // namespace

// ---- soft delete, recover, purge ---------------------------------------------------

Result<DeletedView> SecretService::deleted_view(const Caller& caller, const VaultEntry& v, const SecretRow& s)
{
    return DeletedView{v.row.id,
                       v.row.name,
                       s.id,
                       s.name,
                       s.created,
                       s.deleted_at.value_or(0),
                       s.purge_at.value_or(0),
                       v.policy->effective(caller.who, s.name),
                       s.ownership(v.row.defaults)};
}

Result<void> SecretService::delete_secret(const Caller& caller, VaultId vault, std::string_view name)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::remove, name);
    audit::Event ev{.op = "delete", .caller = &caller, .vault = (*v)->row.name, .secret = name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    const Micros now = now_micros();
    const Micros purge_at = now + static_cast<Micros>((*v)->row.retention_days) * options_.retention_day_ms * 1000;
    // What goes for good instead of to .deleted: a name whose first version
    // is still being written (its writer then commits nothing), and a fresh,
    // empty secret its own uid removes (vim's probe file, whose first
    // version its release may commit just before this). Decided inside the
    // transaction, on the row as it is then.
    bool soft = false;
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        auto s = tx.secret_by_name(vault, name);
        if (!s)
            return tl::unexpected(s.error());
        if (!*s || (*s)->deleted())
            return fail(Errc::not_found);
        ev.reason = {};
        if (!(*s)->has_versions()) {
            ev.reason = "being created: removed, its writer commits nothing";
        } else if ((*s)->next_version == 2) {
            auto first = tx.version((*s)->id, 1);
            if (!first)
                return tl::unexpected(first.error());
            if (*first && (*first)->size == 0 && is_fresh(caller, **s, *first))
                ev.reason = "fresh and empty: made by this uid moments ago, removed for good";
        }
        if (!ev.reason.empty()) {
            if (auto r = tx.purge_secret((*s)->id); !r)
                return r;
        } else {
            if (auto r = tx.set_deleted((*s)->id, now, purge_at); !r)
                return r;
            soft = true;
        }
        // Written before COMMIT: if the audit cannot take it, nothing commits.
        return core_.record(ev);
    });
    if (!w) {
        if (w.error().code == Errc::audit_unavailable)
            return w;
        ev.reason = {};
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    if (soft) {
        std::lock_guard lock(deletes_mutex_);
        std::erase_if(recent_deletes_, [&](const auto& e) { return now - e.second.at > fresh_window; });
        recent_deletes_[{vault.value, std::string(name)}] = RecentDelete{caller.who.uid, now};
    }
    return {};
}

Result<DeletedView> SecretService::find_deleted(const Caller& caller, VaultId vault, std::string_view name)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    if (auto r = core_.reach(caller, **v, name, false, Errc::access_denied); !r)
        return tl::unexpected(r.error());
    if (!is_valid_secret_name(name))
        return fail(Errc::not_found);
    auto s = store_.secret_by_name(vault, name);
    if (!s)
        return tl::unexpected(s.error());
    if (!*s || !(*s)->deleted())
        return fail(Errc::not_found);
    return deleted_view(caller, **v, **s);
}

Result<DeletedView> SecretService::deleted_by_id(const Caller& caller, SecretId id)
{
    auto s = store_.secret_by_id(id);
    if (!s)
        return tl::unexpected(s.error());
    if (!*s || !(*s)->deleted())
        return fail(Errc::not_found);
    auto v = core_.load_vault((*s)->vault);
    if (!v)
        return tl::unexpected(v.error());
    if (auto r = core_.reach(caller, **v, (*s)->name, false, Errc::access_denied); !r)
        return tl::unexpected(r.error());
    return deleted_view(caller, **v, **s);
}

Result<std::vector<SecretRow>> SecretService::deleted_page(const ListingGrant& grant, SecretId after,
                                                           std::size_t limit)
{
    if (auto r = still_listing(grant); !r)
        return tl::unexpected(r.error());
    return store_.deleted_secrets(grant.vault, after, limit);
}

Result<void> SecretService::recover(const Caller& caller, VaultId vault, std::string_view name)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::recover, name);
    audit::Event ev{.op = "recover", .caller = &caller, .vault = (*v)->row.name, .secret = name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        auto s = tx.secret_by_name(vault, name);
        if (!s)
            return tl::unexpected(s.error());
        if (!*s || !(*s)->deleted())
            return fail(Errc::not_found);
        if (auto r = tx.set_deleted((*s)->id, std::nullopt, std::nullopt); !r)
            return r;
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    return {};
}

Result<void> SecretService::purge_row(const SecretRow& s, audit::Event ev)
{
    return store_.write([&](Store::Transaction& tx) -> Result<void> {
        auto current = tx.secret(s.id);
        if (!current)
            return tl::unexpected(current.error());
        if (!*current || !(*current)->deleted())
            return fail(Errc::not_found);
        if (auto r = tx.purge_secret(s.id); !r)
            return r;
        return core_.record(ev);
    });
}

Result<void> SecretService::purge(const Caller& caller, VaultId vault, std::string_view name)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::purge, name);
    audit::Event ev{.op = "purge", .caller = &caller, .vault = (*v)->row.name, .secret = name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    auto s = store_.secret_by_name(vault, name);
    if (!s)
        return core_.refuse(ev, s.error().code, s.error().message);
    if (!*s || !(*s)->deleted())
        return core_.refuse(ev, Errc::not_found);
    if ((*v)->row.purge_protection && now_micros() < (*s)->purge_at.value_or(0)) {
        ev.reason = "purge protection";
        return core_.refuse(ev, Errc::not_permitted, "purge protection holds it until its retention ends");
    }
    if (auto r = purge_row(**s, ev); !r) {
        if (r.error().code == Errc::audit_unavailable)
            return r;
        return core_.refuse(ev, r.error().code, r.error().message);
    }
    return {};
}

Result<std::size_t> SecretService::purge_expired()
{
    std::size_t purged = 0;
    for (;;) {
        auto due = store_.purge_due(now_micros(), 64);
        if (!due)
            return tl::unexpected(due.error());
        if (due->empty())
            return purged;
        for (const auto& s : *due) {
            auto v = core_.load_vault(s.vault);
            const std::string vault_name = v ? (*v)->row.name : std::string();
            audit::Event ev{.op = "purge", .vault = vault_name, .secret = s.name, .allowed = true,
                          .rule = "retention-ended", .reason = "automatic purge"};
            if (auto r = purge_row(s, ev); !r) {
                spdlog::error("automatic purge of {}/{} failed: {}", vault_name, s.name, r.error().message);
                return tl::unexpected(r.error());
            }
            ++purged;
        }
    }
}

// ---- secret attributes -------------------------------------------------------------

Result<std::vector<std::string>> SecretService::list_attributes(const Caller& caller, const SecretView& target)
{
    audit::Event ev{.op = "xattr_list", .caller = &caller, .vault = target.vault_name, .secret = target.name,
                  .version = target.version.number, .allowed = false, .rule = "needs get or list"};
    if (!target.permissions.contains(Permission::get) && !target.permissions.contains(Permission::list))
        return core_.refuse(ev, Errc::access_denied);
    ev.allowed = true;
    ev.rule = "get or list";
    auto version = store_.version_by_id(target.version.id);
    if (!version || !*version)
        return core_.refuse(ev, Errc::not_found);
    std::vector<std::string> names{"version", "created", "updated", "enabled"};
    if ((*version)->not_before)
        names.emplace_back("not_before");
    if ((*version)->expires)
        names.emplace_back("expires");
    if ((*version)->content_type)
        names.emplace_back("content_type");
    auto tags = store_.tags(target.version.id);
    if (!tags)
        return core_.refuse(ev, tags.error().code, tags.error().message);
    for (const auto& t : *tags)
        names.push_back(std::string(tag_prefix) + t.name);
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return names;
}

Result<std::string> SecretService::get_attribute(const Caller& caller, const SecretView& target, std::string_view name)
{
    audit::Event ev{.op = "xattr_get", .caller = &caller, .vault = target.vault_name, .secret = target.name,
                  .version = target.version.number, .allowed = false, .rule = "needs get or list",
                  .attribute = name};
    if (!target.permissions.contains(Permission::get) && !target.permissions.contains(Permission::list))
        return core_.refuse(ev, Errc::access_denied);
    ev.allowed = true;
    ev.rule = "get or list";
    auto version = store_.version_by_id(target.version.id);
    if (!version || !*version)
        return core_.refuse(ev, Errc::not_found);
    const VersionRow& row = **version;
    std::optional<std::string> value;
    if (name == "version")
        value = std::to_string(row.number);
    else if (name == "created")
        value = format_rfc3339(row.created);
    else if (name == "updated")
        value = format_rfc3339(row.updated);
    else if (name == "enabled")
        value = format_bool(row.enabled);
    else if (name == "not_before" && row.not_before)
        value = format_rfc3339(*row.not_before);
    else if (name == "expires" && row.expires)
        value = format_rfc3339(*row.expires);
    else if (name == "content_type" && row.content_type)
        value = *row.content_type;
    else if (is_tag(name)) {
        auto tags = store_.tags(row.id);
        if (!tags)
            return core_.refuse(ev, tags.error().code, tags.error().message);
        for (const auto& t : *tags)
            if (t.name == name.substr(tag_prefix.size()))
                value = t.value;
    }
    if (!value)
        return core_.refuse(ev, Errc::no_attribute);
    ev.bytes = value->size();
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return *value;
}

Result<void> SecretService::set_attribute(const Caller& caller, const SecretView& target, std::string_view name,
                                          std::optional<std::string_view> value)
{
    auto v = core_.load_vault(target.vault);
    if (!v)
        return tl::unexpected(v.error());
    const Decided d = core_.decide(caller, **v, Permission::set, target.name);
    audit::Event ev{.op = "xattr_set", .caller = &caller, .vault = target.vault_name, .secret = target.name,
                    .version = target.version.number, .attribute = name};
    d.fill(ev);
    if (!d.allowed)
        return core_.refuse(ev, Errc::access_denied);
    if (target.version.number == 0)
        return core_.refuse(ev, Errc::not_found);
    if (name == "version" || name == "created" || name == "updated")
        return core_.refuse(ev, Errc::not_permitted, "read-only attribute");

    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        auto current = tx.version_by_id(target.version.id);
        if (!current)
            return tl::unexpected(current.error());
        if (!*current)
            return fail(Errc::not_found);
        VersionRow row = **current;
        const std::string text(value.value_or(""));
        if (name == "enabled") {
            const auto b = parse_bool(text);
            if (!value || !b)
                return fail(Errc::invalid_argument, "enabled is true or false");
            row.enabled = *b;
        } else if (name == "not_before" || name == "expires") {
            std::optional<Micros> t;
            if (!text.empty()) {
                t = parse_rfc3339(text);
                if (!t)
                    return fail(Errc::invalid_argument, "times are RFC 3339 UTC, e.g. 2027-01-31T00:00:00Z");
            }
            (name == "not_before" ? row.not_before : row.expires) = t;
            if (row.not_before && row.expires && *row.not_before >= *row.expires)
                return fail(Errc::invalid_argument, "not_before must come before expires");
        } else if (name == "content_type") {
            if (!is_valid_content_type(text))
                return fail(Errc::invalid_argument, "content_type is at most 255 printable characters");
            row.content_type = text.empty() ? std::nullopt : std::optional<std::string>(text);
        } else if (is_tag(name)) {
            const std::string tag(name.substr(tag_prefix.size()));
            if (!is_valid_tag_name(tag))
                return fail(Errc::invalid_argument, "tag names are 1-512 printable characters");
            auto tags = tx.tags(row.id);
            if (!tags)
                return tl::unexpected(tags.error());
            auto it = std::find_if(tags->begin(), tags->end(), [&](const Tag& t) { return t.name == tag; });
            if (!value) {
                if (it == tags->end())
                    return fail(Errc::no_attribute);
                tags->erase(it);
            } else {
                if (!is_valid_tag_value(text))
                    return fail(Errc::invalid_argument, "tag values are at most 512 characters, no control characters");
                if (it != tags->end())
                    it->value = text;
                else if (tags->size() >= max_tags)
                    return fail(Errc::invalid_argument, "at most 15 tags");
                else
                    tags->push_back(Tag{tag, text});
            }
            if (auto r = tx.replace_tags(row.id, *tags); !r)
                return r;
        } else {
            return fail(Errc::invalid_argument, "unknown attribute");
        }
        row.updated = now_micros();
        if (auto r = tx.update_version(row); !r)
            return r;
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    return {};
}

Result<std::vector<std::pair<std::string, std::string>>> SecretService::deleted_attributes(const Caller& caller,
                                                                                           const DeletedView& target)
{
    audit::Event ev{.op = "xattr_get", .caller = &caller, .vault = target.vault_name, .secret = target.name,
                  .allowed = false, .rule = "needs list or recover"};
    if (!target.permissions.contains(Permission::list) && !target.permissions.contains(Permission::recover))
        return core_.refuse(ev, Errc::access_denied);
    ev.allowed = true;
    ev.rule = "list or recover";
    ev.attribute = "deleted";
    if (auto r = core_.record(ev); !r)
        return tl::unexpected(r.error());
    return std::vector<std::pair<std::string, std::string>>{{"deleted", format_rfc3339(target.deleted_at)},
                                                            {"scheduled_purge", format_rfc3339(target.purge_at)}};
}

// ---- vault settings -----------------------------------------------------------------

Result<std::vector<std::pair<std::string, std::string>>> SecretService::vault_attributes(const Caller& caller,
                                                                                         VaultId vault)
{
    auto v = this->vault(caller, vault);
    if (!v)
        return tl::unexpected(v.error());
    return std::vector<std::pair<std::string, std::string>>{
        {"retention_days", std::to_string(v->settings.retention_days)},
        {"purge_protection", format_bool(v->settings.purge_protection)},
        {"default_owner", std::to_string(v->defaults.owner)},
        {"default_group", std::to_string(v->defaults.group)},
        {"default_mode", format_mode(v->defaults.mode)},
        {"rekey_after_days", std::to_string(v->settings.rekey_after_days)},
        {"kek_created", format_rfc3339(v->kek_created)}};
}

Result<void> SecretService::set_vault_attribute(const Caller& caller, VaultId vault, std::string_view name,
                                                std::string_view value)
{
    auto v = core_.load_vault(vault);
    if (!v)
        return tl::unexpected(v.error());
    audit::Event ev{.op = "vault_set", .caller = &caller, .vault = (*v)->row.name, .allowed = false, .rule = "not-admin",
                  .attribute = name};
    VaultRow row = (*v)->row;
    if (name == "rekey_after_days") {
        // The KEK's rotation, as Azure Key Vault's key rotation policy: the
        // vault's managers decide.
        const Decided d = core_.decide(caller, **v, Permission::manage);
        d.fill(ev);
        if (!d.allowed)
            return core_.refuse(ev, Errc::access_denied, "setting a vault's KEK rotation needs manage");
        const std::string text(value);
        int days = -1;
        const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), days);
        if (text.empty() || ec != std::errc() || p != text.data() + text.size() || days < 0 || days > 36500)
            return core_.refuse(ev, Errc::invalid_argument, "rekey_after_days is 0 (only when asked) to 36500");
        auto w = core_.write_audited(ev, [&](Store::Transaction& tx) { return tx.set_rekey_after(vault, days); });
        if (!w)
            return tl::unexpected(w.error());
        core_.forget_vault(vault);
        return {};
    }
    if (name == "kek_created") {
        ev.allowed = true;
        ev.rule = "read-only";
        return core_.refuse(ev, Errc::not_permitted, "kek_created is when the KEK was made; `vaultfs vault rekey` "
                                                     "makes a new one");
    }
    if (name == "default_owner" || name == "default_group" || name == "default_mode") {
        // What new secrets show: the vault's managers decide, as they do chown.
        const Decided d = core_.decide(caller, **v, Permission::manage);
        d.fill(ev);
        if (!d.allowed)
            return core_.refuse(ev, Errc::access_denied, "setting a vault's defaults needs manage");
        const std::string text(value);
        std::uint32_t id = 0;
        const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), id);
        const bool numeric = !text.empty() && ec == std::errc() && p == text.data() + text.size();
        if (name == "default_mode") {
            const auto mode = parse_mode(text);
            if (!mode)
                return core_.refuse(ev, Errc::invalid_argument, "default_mode is octal permission bits, e.g. 0400");
            row.defaults.mode = *mode;
        } else if (name == "default_owner") {
            const auto uid = numeric ? std::optional<uid_t>(id) : names_.user_id(text);
            if (!uid)
                return core_.refuse(ev, Errc::invalid_argument, "default_owner is a user name or a uid");
            row.defaults.owner = *uid;
        } else {
            const auto gid = numeric ? std::optional<gid_t>(id) : names_.group_id(text);
            if (!gid)
                return core_.refuse(ev, Errc::invalid_argument, "default_group is a group name or a gid");
            row.defaults.group = *gid;
        }
        auto w = core_.write_audited(ev, [&](Store::Transaction& tx) { return tx.set_vault_defaults(vault, row.defaults); });
        if (!w)
            return tl::unexpected(w.error());
        core_.forget_vault(vault);
        return {};
    }
    if (!is_admin(caller))
        return core_.refuse(ev, Errc::access_denied, "only admins change vault settings");
    ev.allowed = true;
    ev.rule = "admin";
    if (name == "retention_days") {
        int days = 0;
        const std::string text(value);
        if (text.empty() || text.size() > 2 || !std::all_of(text.begin(), text.end(), ::isdigit) ||
            (days = std::stoi(text)) < 7 || days > 90)
            return core_.refuse(ev, Errc::invalid_argument, "retention_days is 7 to 90");
        row.retention_days = days;
    } else if (name == "purge_protection") {
        const auto b = parse_bool(value);
        if (!b)
            return core_.refuse(ev, Errc::invalid_argument, "purge_protection is true or false");
        if (row.purge_protection && !*b)
            return core_.refuse(ev, Errc::not_permitted, "purge protection cannot be turned off");
        row.purge_protection = *b;
    } else {
        return core_.refuse(ev, Errc::invalid_argument, "unknown vault setting");
    }
    auto w = core_.write_audited(ev, [&](Store::Transaction& tx) -> Result<void> {
        if (auto r = tx.update_vault_settings(vault, row.retention_days, row.purge_protection); !r)
            return r;
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    core_.forget_vault(vault);
    return {};
}

}  // namespace vaultfs::vault
