#include "vault/core.hpp"

#include <spdlog/spdlog.h>

#include "vault/model/names.hpp"

namespace vaultfs::vault {

using policy::Permission;

Core::Core(Store& store, audit::Log& audit, const policy::NameResolver& names, std::optional<gid_t> admin_gid)
    : store_(store), audit_(audit), names_(names), admin_gid_(admin_gid)
{
    store_.on_in_doubt_resolved([this](std::int64_t xid, const std::string& outcome, const std::string&) {
        // The write itself was answered EIO (its record's reason names the
        // transaction); this record says what became of it.
        const std::string reason = "transaction " + std::to_string(xid) +
                                   ", whose commit the database did not confirm in time: " + outcome;
        if (auto r = record(audit::Event{.op = "commit_outcome", .allowed = true, .rule = "daemon", .result = "ok",
                                         .reason = reason, .attribute = outcome});
            !r)
            spdlog::error("audit: cannot record the outcome of transaction {} ({}): {}", xid, outcome,
                          r.error().message);
    });
}

Core::~Core() { store_.on_in_doubt_resolved({}); }

std::string Core::rule_of(const policy::Decision& d)
{
    if (d.rule_line == 0)
        return "default-deny";
    return std::to_string(d.rule_line) + ": " + d.rule_text;
}

void Decided::fill(audit::Event& ev) const
{
    ev.allowed = allowed;
    ev.rule = rule;
    if (!reason.empty())
        ev.reason = reason;
    ev.coalesce = outsider;
}

Decided Core::decide(const Caller& caller, const VaultEntry& v, Permission wanted,
                                             std::optional<std::string_view> secret) const
{
    const policy::Decision d = v.policy->evaluate(caller.who, wanted, secret);
    Decided out{d.allowed, rule_of(d), {}, false};
    if (d.groups_unknown)
        out.reason = "the caller's supplementary groups could not be read, and a group rule decides";
    if (!d.allowed)
        out.outsider = !v.policy->holds_any(caller.who);
    return out;
}

Result<void> Core::reach(const Caller& caller, const VaultEntry& v, std::string_view secret, bool admins_see,
                                  Errc code)
{
    if (v.policy->holds_any(caller.who) || (admins_see && is_admin(caller)))
        return {};
    audit::Event ev{.op = "lookup",
                    .caller = &caller,
                    .vault = v.row.name,
                    .secret = secret,
                    .rule = "holds-nothing",
                    .reason = caller.who.groups_known ? std::string_view("the caller holds nothing in the vault")
                                                      : std::string_view("the caller holds nothing in the vault that "
                                                                         "does not depend on unread groups"),
                    .coalesce = true};
    return refuse(ev, code);
}

Result<void> Core::missed_vault(const Caller& caller, std::string_view name, std::string_view why)
{
    if (is_admin(caller))
        return fail(Errc::not_found);
    return refuse(audit::Event{.op = "lookup",
                               .caller = &caller,
                               .vault = name,
                               .rule = "holds-nothing",
                               .reason = why,
                               .coalesce = true},
                  Errc::not_found);
}

Error Core::from_hsm(const hsm::Error& e)
{
    switch (e.code) {
    case hsm::Errc::authentication_failed:
        return Error{Errc::integrity, e.message};
    case hsm::Errc::out_of_secure_memory:
        return Error{Errc::out_of_memory, e.message};
    case hsm::Errc::not_permitted:
        return Error{Errc::not_permitted, e.message};
    case hsm::Errc::invalid_argument:
    case hsm::Errc::mechanism_unsupported:
        return Error{Errc::invalid_argument, e.message};
    default:
        return Error{Errc::key_unavailable, e.message};
    }
}

std::string_view result_name(Errc code)
{
    switch (code) {
    case Errc::not_found:
        return "ENOENT";
    case Errc::already_exists:
        return "EEXIST";
    case Errc::invalid_argument:
        return "EINVAL";
    case Errc::too_large:
        return "EFBIG";
    case Errc::access_denied:
    case Errc::disabled:
        return "EACCES";
    case Errc::not_valid_now:
        return "EKEYEXPIRED";
    case Errc::not_permitted:
        return "EPERM";
    case Errc::read_only:
        return "EROFS";
    case Errc::not_empty:
        return "ENOTEMPTY";
    case Errc::integrity:
    case Errc::key_unavailable:
    case Errc::storage:
    case Errc::not_fresh:
    case Errc::in_doubt:
    case Errc::audit_unavailable:
        return "EIO";
    case Errc::no_space:
        return "ENOSPC";
    case Errc::out_of_memory:
        return "ENOMEM";
    case Errc::busy:
        return "EBUSY";
    case Errc::too_many_open:
        return "EMFILE";
    case Errc::stale:
        return "ESTALE";
    case Errc::no_attribute:
        return "ENODATA";
    }
    return "EIO";
}

bool Core::is_admin(const Caller& caller) const
{
    return caller.who.uid == 0 || (admin_gid_ && caller.who.in_group(*admin_gid_));
}

Result<void> Core::record(const audit::Event& event)
{
    if (auto r = audit_.append(event); !r)
        return fail(Errc::audit_unavailable, r.error().message);
    return {};
}

tl::unexpected<Error> Core::refuse(audit::Event event, Errc code, std::string message)
{
    const auto name = result_name(code);
    event.result = name;
    if (auto r = record(event); !r)
        return tl::unexpected(r.error());
    return tl::unexpected(Error{code, std::move(message)});
}

Result<void> Core::write_audited(audit::Event event,
                                          const std::function<Result<void>(Store::Transaction&)>& work)
{
    auto w = store_.write([&](Store::Transaction& tx) -> Result<void> {
        if (auto r = work(tx); !r)
            return r;
        return record(event);
    });
    if (!w) {
        if (w.error().code == Errc::audit_unavailable)
            return w;
        if (w.error().code == Errc::in_doubt)
            event.reason = w.error().message;  // names the transaction its commit_outcome record will
        return refuse(event, w.error().code, w.error().message);
    }
    return {};
}

Result<std::shared_ptr<const VaultEntry>> Core::load_vault(VaultId id)
{
    // Entries are good for one store generation: any committed write — a
    // policy, a setting, a vault removed — makes the next use reload, so no
    // path can leave an older policy in force.
    const std::uint64_t generation = store_.generation();
    {
        std::shared_lock lock(vaults_mutex_);
        if (const auto it = vaults_.find(id.value); it != vaults_.end() && it->second->generation == generation)
            return it->second;
    }
    auto row = store_.vault_by_id(id);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row)
        return fail(Errc::not_found);
    auto text = store_.policy(id);
    if (!text)
        return tl::unexpected(text.error());
    // A stored policy was valid when written; if a name it used has gone,
    // it still parses because stored policies hold ids only.
    auto parsed = policy::Policy::parse(*text ? (*text)->text : std::string(), names_, policy::Policy::Origin::stored);
    if (!parsed) {
        spdlog::error("vault {}: stored policy does not parse ({}); denying everything", (*row)->name,
                      parsed.error().message());
        parsed = policy::Policy();
    }
    auto entry = make_entry(std::move(**row), std::move(*parsed), generation);
    std::unique_lock lock(vaults_mutex_);
    vaults_[id.value] = entry;
    return entry;
}

std::shared_ptr<const VaultEntry> Core::make_entry(VaultRow row, policy::Policy policy,
                                                                          std::uint64_t generation)
{
    const std::size_t size = policy.print().size();
    return std::make_shared<const VaultEntry>(
        VaultEntry{std::move(row), std::make_shared<const policy::Policy>(std::move(policy)), size, generation});
}

Result<std::shared_ptr<const VaultEntry>> Core::load_vault(std::string_view name)
{
    if (!is_valid_vault_name(name))
        return fail(Errc::not_found);
    {
        const std::uint64_t generation = store_.generation();
        std::shared_lock lock(vaults_mutex_);
        for (const auto& [id, entry] : vaults_)
            if (entry->row.name == name && entry->generation == generation)
                return entry;
    }
    auto row = store_.vault_by_name(name);
    if (!row)
        return tl::unexpected(row.error());
    if (!*row)
        return fail(Errc::not_found);
    return load_vault((*row)->id);
}

void Core::forget_vault(VaultId id)
{
    std::unique_lock lock(vaults_mutex_);
    vaults_.erase(id.value);
}

Decided Core::decide_any(const Caller& caller, const VaultEntry& v, std::initializer_list<Permission> wanted,
                         std::string_view object) const
{
    std::optional<Decided> first;
    for (const Permission p : wanted) {
        Decided d = decide(caller, v, p, object);
        if (d.allowed)
            return d;
        if (!first)
            first = std::move(d);
    }
    return *first;
}

}  // namespace vaultfs::vault
