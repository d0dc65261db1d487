// cli/objects: the `vaultfs key ...` and `vaultfs cert ...` commands, sent
// to the running daemon's management plane (fs/control/objects.hpp). Verifying
// a signature is done here, with the public key the daemon hands out: it
// needs nothing secret (nor does encrypting or wrapping: `openssl pkeyutl
// -encrypt -pubin -inkey V/.keys/NAME/public.pem`).
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "fs/control/protocol.hpp"

namespace vaultfs::fs {

// Sends a request to the daemon of `state` (or `socket`) and runs `show` on
// a successful reply; returns the exit status.
using ManageFn = std::function<int(const std::string& state, const std::string& socket, const ControlRequest& request,
                                   const std::function<int(const nlohmann::json&)>& show)>;

class ObjectCommands {
public:
    // Adds `key` and `cert` to `app`; `default_state` for --state.
    ObjectCommands(CLI::App& app, const std::string& default_state);
    ~ObjectCommands();
    // The exit status of the key or cert command given, or nullopt when
    // neither was.
    std::optional<int> run(const ManageFn& manage);

private:
    struct Options;
    std::unique_ptr<Options> o_;
};

}  // namespace vaultfs::fs
