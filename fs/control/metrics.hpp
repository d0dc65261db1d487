// metrics: the serving daemon's metrics and health, for `vaultfs metrics`,
// `vaultfs status` and the metrics textfile (docs/operations.md "Monitoring"). The
// counting is vault/monitor/metrics.hpp's; this adds what only the mount
// knows (open handles) and reads the gauges.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "vault/model/error.hpp"
#include "vault/state/state.hpp"

namespace vaultfs::fs {

class Filesystem;

// The Prometheus text of a serving state, now.
std::string render_metrics(vault::State& state, const Filesystem& filesystem);

// Writes the text to PATH whole (a new file renamed over it), mode 0644:
// node_exporter runs as its own user. It names vaults and secrets (expiry
// gauges), never a value.
vault::Result<void> write_metrics_textfile(const std::string& path, const std::string& text);

// What `vaultfs status` adds for monitoring: expiry counts, feed staleness,
// shipping. Fields of the status reply.
void add_health(vault::State& state, nlohmann::json& status);

}  // namespace vaultfs::fs
