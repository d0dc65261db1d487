#include "fs/control/metrics.hpp"

#include "fs/fuse/filesystem.hpp"
#include "hsm/secure_buffer.hpp"

namespace vaultfs::fs {

namespace {

vault::monitor::Metrics::Gauges gauges_of(vault::State& state)
{
    vault::monitor::Metrics::Gauges g;
    g.token_up = static_cast<bool>(state.keys->ping());
    g.audit_up = static_cast<bool>(state.audit->ready());
    g.store_up = static_cast<bool>(state.store->fresh());
    const auto audit = state.audit->stats();
    g.audit_refusals_coalesced = audit.coalesced;
    g.audit_dropped_low_space = audit.dropped;
    if (state.shipper) {
        const auto s = state.shipper->stats();
        g.shipping = true;
        g.shipped = s.shipped;
        g.ship_dropped = s.dropped;
        g.ship_queued = s.queued;
        g.ship_errors = s.errors;
    }
    g.token_ops = &state.keys->op_stats();
    const auto dek = state.deks->stats();
    g.dek_hits = dek.hits;
    g.dek_misses = dek.misses;
    g.dek_entries = dek.entries;
    g.locked_bytes = hsm::secure_heap_used();
    g.locked_limit = hsm::secure_heap_size();
    if (const auto age = state.store->feed_age())
        g.feed_age_seconds = static_cast<double>(age->count()) / 1000.0;
    if (auto items = state.store->expiring())
        g.expiring = std::move(*items);
    g.expiry_lead = state.expiry->longest_lead();
    g.now = vault::now_micros();
    return g;
}

}  // namespace

std::string render_metrics(vault::State& state, const Filesystem& filesystem)
{
    auto g = gauges_of(state);
    g.open_handles = filesystem.open_handles();
    return state.metrics->render(g);
}

vault::Result<void> write_metrics_textfile(const std::string& path, const std::string& text)
{
    return vault::replace_file(path, text, 0644);
}

void add_health(vault::State& state, nlohmann::json& status)
{
    const auto items = state.store->expiring();
    const auto counts =
        items ? vault::monitor::count_expiring(*items, vault::now_micros(), state.expiry->longest_lead())
              : vault::monitor::ExpiryCounts{};
    status["expiring_soon"] = items ? static_cast<std::int64_t>(counts.soon) : -1;
    status["expired"] = items ? static_cast<std::int64_t>(counts.expired) : -1;
    status["expiry_lead_days"] = state.config.expiry_warn_days.empty() ? 0 : state.config.expiry_warn_days.front();
    if (const auto age = state.store->feed_age()) {
        status["feed_staleness_ms"] = age->count();
        status["staleness_bound_ms"] = state.store->staleness_bound().count();
    }
    // KEKs a token lets out under any key (made by an older vaultfs), or
    // that a shared store cannot share: each needs `vaultfs vault rekey`.
    nlohmann::json rekey = nlohmann::json::array();
    if (state.rekey)
        for (const auto& f : state.rekey->findings())
            rekey.push_back({{"vault", f.vault}, {"reason", f.reason}});
    status["keks_to_rekey"] = std::move(rekey);
    if (state.shipper) {
        const auto s = state.shipper->stats();
        status["shipping"] = nlohmann::json{{"target", vault::audit::render_syslog_target(*state.config.audit_syslog)},
                                            {"shipped", s.shipped},
                                            {"dropped", s.dropped},
                                            {"queued", s.queued},
                                            {"errors", s.errors}};
    }
}

}  // namespace vaultfs::fs
