// `vaultfs metrics`, `vaultfs audit tail`, `vaultfs audit export`: watching
// what the daemon does (docs/operations.md "Monitoring"; vault/monitor/, vault/audit/).
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <optional>

#include "fs/cli/objects.hpp"

namespace vaultfs::fs {

class MonitorCommands {
public:
    // `audit`: the `vaultfs audit` subcommand, which tail and export join.
    MonitorCommands(CLI::App& app, CLI::App& audit, const std::string& default_state);
    ~MonitorCommands();
    // The exit status of the command given, or nullopt when none of these was.
    std::optional<int> run(const ManageFn& manage);

private:
    struct Options;
    std::unique_ptr<Options> o_;
};

// `vaultfs status`'s verdict on a status reply, for monitoring checks
// (the exit codes of Nagios plugins): 0 healthy, 1 a warning (something
// expired or expires within the longest warning lead, the audit disk below
// its reserve, the feed past half its staleness bound), 2 critical (the
// token, the audit trail or the store failing). 3, unknown, is the
// caller's: no daemon answered, or it refused the caller.
struct Health {
    int code = 0;
    std::string line;  // "vaultfs OK: ..." for the first line of the output
};
Health health_of(const nlohmann::json& status);

}  // namespace vaultfs::fs
