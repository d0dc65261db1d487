// `vaultfs migrate`, `vaultfs join request|grant|accept`, `vaultfs host
// list|remove`: several hosts on one PostgreSQL store (docs/hosts.md "Several
// hosts"; vault/hosts/).
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <optional>
#include <string>

namespace vaultfs::fs {

class HostCommands {
public:
    HostCommands(CLI::App& app, const std::string& default_state);
    ~HostCommands();
    // The exit status of the command given, or nullopt when none of these was.
    // They run on the state directory itself (the daemon stopped), never
    // through the control socket.
    std::optional<int> run();

private:
    struct Options;
    std::unique_ptr<Options> o_;
};

}  // namespace vaultfs::fs
