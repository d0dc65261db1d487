// monitor/expiry: warnings before secrets, keys and certificates expire
// (docs/operations.md "Monitoring").
//
// Every expiry_check_seconds the background leader looks at the current
// version of everything with an expiry (Store::expiring). When one comes
// within a lead time (expiry_warn_days, default 30 and 7), it gets one
// `near_expiry` event for the shortest lead reached; when it is past its
// expiry, one `expired` event. An event is an audit record (`near_expiry`
// or `expired`, the lead and the expiry in its reason), a log line, a
// metric (vaultfs_expiry_events_total) and the `on_expiry` hooks that match.
//
// What was sent is kept in the store (the `expiry_notified` setting, by
// version and expiry), so a restart does not send it again, nor another host
// that takes over the rounds (each reads every host's); a new version, or a
// new expiry on the same one, starts over.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "vault/model/error.hpp"
#include "vault/hooks/hooks.hpp"
#include "vault/model/types.hpp"

namespace vaultfs::vault {
class Store;
namespace audit {
class Log;
}
namespace monitor {
class Metrics;
}
}  // namespace vaultfs::vault

namespace vaultfs::vault::monitor {

class ExpiryWatch {
public:
    // `lead_days` longest first; a day is `day_ms` (retention_day_ms).
    ExpiryWatch(Store& store, audit::Log& audit, Metrics& metrics, std::vector<std::int64_t> lead_days,
                std::int64_t day_ms);

    // Where events go besides the audit, log and metrics (the hook runner).
    void on_event(std::function<void(hooks::Runner::Event)> f) { hook_ = std::move(f); }

    // One round at `now`: returns the number of events sent.
    Result<std::size_t> run(Micros now);

    // The longest lead time (what counts as "soon").
    Micros longest_lead() const;

private:
    Store& store_;
    audit::Log& audit_;
    Metrics& metrics_;
    const std::vector<std::int64_t> lead_days_;
    const std::int64_t day_ms_;
    std::function<void(hooks::Runner::Event)> hook_;
};

}  // namespace vaultfs::vault::monitor
