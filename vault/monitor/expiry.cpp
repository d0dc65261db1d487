#include "vault/monitor/expiry.hpp"

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <limits>
#include <map>

#include "vault/audit/log.hpp"
#include "vault/monitor/metrics.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::monitor {

namespace {

constexpr const char* notified_setting = "expiry_notified";
// What was last sent for a version: a lead in days, or 0 for expired.
constexpr std::int64_t expired_stage = 0;

std::string shown_name(const Expiring& e)
{
    if (e.kind == Expiring::Kind::key)
        return ".keys/" + e.name;
    if (e.kind == Expiring::Kind::certificate)
        return ".certs/" + e.name;
    return e.name;
}

// The version and its expiry: a new expiry on the same version starts over.
std::string key_of(const Expiring& e)
{
    return std::string(e.kind == Expiring::Kind::secret ? "v" : "o") + std::to_string(e.version_id) + "@" +
           std::to_string(e.expires);
}

// Smaller is further along: no event yet, then longer leads, then expired.
std::int64_t rank(std::optional<std::int64_t> stage)
{
    if (!stage)
        return std::numeric_limits<std::int64_t>::max();
    return *stage;
}

}  // namespace

ExpiryWatch::ExpiryWatch(Store& store, audit::Log& audit, Metrics& metrics, std::vector<std::int64_t> lead_days,
                         std::int64_t day_ms)
    : store_(store), audit_(audit), metrics_(metrics), lead_days_(std::move(lead_days)), day_ms_(day_ms)
{
}

Micros ExpiryWatch::longest_lead() const
{
    return lead_days_.empty() ? 0 : lead_days_.front() * day_ms_ * 1000;
}

Result<std::size_t> ExpiryWatch::run(Micros now)
{
    auto items = store_.expiring();
    if (!items)
        return tl::unexpected(items.error());
    // What any host sent (the rounds move to another host when one goes).
    auto saved = store_.setting_on_all_hosts(notified_setting);
    if (!saved)
        return tl::unexpected(saved.error());
    auto mine = store_.setting(notified_setting);
    if (!mine)
        return tl::unexpected(mine.error());
    std::map<std::string, std::int64_t> sent;
    for (const std::string& text : *saved) {
        const auto j = nlohmann::json::parse(text, nullptr, false);
        if (j.is_object())
            for (const auto& [k, v] : j.items())
                if (v.is_number_integer()) {
                    const auto [it, added] = sent.emplace(k, v.get<std::int64_t>());
                    if (!added)
                        it->second = std::min(it->second, v.get<std::int64_t>());  // the furthest along
                }
    }
    std::map<std::string, std::int64_t> kept;
    std::size_t events = 0;
    bool changed = false;
    for (const Expiring& e : *items) {
        const std::string key = key_of(e);
        std::optional<std::int64_t> before;
        if (const auto it = sent.find(key); it != sent.end())
            before = it->second;
        std::optional<std::int64_t> stage;
        if (e.expires <= now) {
            stage = expired_stage;
        } else {
            for (const std::int64_t days : lead_days_)  // longest first: the last reached is the shortest
                if (e.expires - now <= days * day_ms_ * 1000)
                    stage = days;
        }
        if (!stage || rank(stage) >= rank(before)) {
            if (before)
                kept[key] = *before;
            continue;
        }
        const bool expired = *stage == expired_stage;
        const std::string name = shown_name(e);
        const std::string when = audit::time_text(e.expires);
        const std::string reason =
            expired ? "expired at " + when
                    : "expires at " + when + ", within the " + std::to_string(*stage) + "-day warning";
        audit::Event ev{.op = expired ? "expired" : "near_expiry", .vault = e.vault, .secret = name,
                        .version = e.version, .allowed = true, .rule = "expiry-watch", .result = "ok",
                        .reason = reason};
        if (auto r = audit_.append(ev); !r) {
            // Not recorded as sent: the next round tries again.
            spdlog::error("expiry: the audit record of {}/{} cannot be written: {}", e.vault, name, r.error().message);
            if (before)
                kept[key] = *before;
            continue;
        }
        spdlog::warn("expiry: {} {}/{} version {} {}", kind_name(e.kind), e.vault, name, e.version, reason);
        metrics_.count_expiry_event(kind_name(e.kind), ev.op);
        if (hook_)
            hook_(hooks::Runner::Event{e.vault, name, std::string(kind_name(e.kind)), std::string(ev.op), e.version});
        kept[key] = *stage;
        changed = true;
        ++events;
    }
    if (kept.size() != sent.size() || saved->size() > (*mine ? 1u : 0u))
        changed = true;  // forgotten versions go; another host's record becomes this one's
    if (changed) {
        nlohmann::json j = nlohmann::json::object();
        for (const auto& [k, v] : kept)
            j[k] = v;
        if (auto r = store_.write([&](Store::Transaction& tx) { return tx.set_setting(notified_setting, j.dump()); }); !r)
            return tl::unexpected(r.error());
    }
    return events;
}

}  // namespace vaultfs::vault::monitor
