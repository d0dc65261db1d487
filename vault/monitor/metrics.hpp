// monitor/metrics: what the daemon counts, in Prometheus text exposition
// format (docs/operations.md "Monitoring"). `vaultfs metrics` prints it through the
// control socket; with `metrics_textfile = PATH` the daemon also writes it
// to PATH for node_exporter's textfile collector.
//
// Counters come from the audit trail's events as they are appended (every
// open, commit and refusal is one), so what the metrics count is what the
// audit records; gauges are read when the text is rendered.
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "hsm/op_stats.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit {
struct Event;
}

namespace vaultfs::vault::monitor {

// The part of a denial's rule that is a reason, not a policy line: the
// daemon's own rule names pass, a policy's deny line is `deny-rule`.
std::string denial_reason(std::string_view rule);

// Escapes a label value (backslash, double quote, newline).
std::string label_value(std::string_view v);

// "secret", "key" or "certificate".
std::string_view kind_name(Expiring::Kind kind);

// How many of `items` have expired at `now`, and how many expire within
// `lead` of it (the metrics' gauges and `vaultfs status` count the same).
struct ExpiryCounts {
    std::uint64_t soon = 0;
    std::uint64_t expired = 0;
};
ExpiryCounts count_expiring(const std::vector<Expiring>& items, Micros now, Micros lead);

class Metrics {
public:
    // The audit log's observers (audit/log.hpp Options).
    void count(const audit::Event& event);
    // Called under the audit writer's lock: one atomic add.
    void record_written() { records_written_.fetch_add(1, std::memory_order_relaxed); }

    // Read when rendering.
    struct Gauges {
        bool token_up = false;
        bool audit_up = false;
        bool store_up = false;
        std::uint64_t audit_refusals_coalesced = 0;
        std::uint64_t audit_dropped_low_space = 0;
        // Shipping (audit/shipping.hpp), when configured.
        bool shipping = false;
        std::uint64_t shipped = 0, ship_dropped = 0, ship_queued = 0, ship_errors = 0;
        const hsm::OpStats* token_ops = nullptr;
        std::uint64_t dek_hits = 0, dek_misses = 0, dek_entries = 0;
        std::uint64_t open_handles = 0;
        std::uint64_t locked_bytes = 0, locked_limit = 0;
        std::optional<double> feed_age_seconds;  // a shared store's
        std::vector<Expiring> expiring;
        Micros expiry_lead = 0;  // the longest lead time: what counts as soon
        Micros now = 0;
    };
    // Events of the expiry watch (monitor/expiry.hpp).
    void count_expiry_event(std::string_view kind, std::string_view event);

    std::string render(const Gauges& gauges) const;

private:
    mutable std::mutex mutex_;
    // (vault, mode, result)
    std::map<std::tuple<std::string, std::string, std::string>, std::uint64_t> opens_;
    std::map<std::tuple<std::string, std::string>, std::uint64_t> writes_;  // (vault, result)
    std::map<std::string, std::uint64_t> read_bytes_;                      // vault
    std::map<std::string, std::uint64_t> denials_;                         // reason
    std::map<std::tuple<std::string, std::string>, std::uint64_t> expiry_events_;  // (kind, event)
    std::atomic<std::uint64_t> records_written_{0};
};

}  // namespace vaultfs::vault::monitor
