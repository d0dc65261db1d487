// control: the management plane — operations that are not file-shaped
// (vault create/show/list, status, backup, restore) over a Unix socket.
//
// The caller is who the kernel says is on the other end (SO_PEERCRED and
// SO_PEERGROUPS), never what the request claims. Only uid 0 and members of
// the admin group are served; every call, refused or not, is audited.
// The socket file is world-connectable (0666) on purpose: the daemon must
// see a refused caller to audit it. Its directory decides who can reach it
// (by default the 0700 state directory: root only).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "vault/error.hpp"
#include "vault/state.hpp"

namespace vaultfs::fs {

class Filesystem;

class ControlServer {
public:
    // Binds the socket (replacing a stale one) and starts serving.
    static vault::Result<std::unique_ptr<ControlServer>> start(vault::State& state, const Filesystem& filesystem);
    ~ControlServer();
    ControlServer(const ControlServer&) = delete;
    ControlServer& operator=(const ControlServer&) = delete;

private:
    ControlServer(vault::State& state, const Filesystem& filesystem, int listen_fd, int stop_fd, std::string path);
    void serve();
    void handle(int fd);
    nlohmann::json dispatch(const vault::Caller& caller, const std::string& text);

    vault::State& state_;
    const Filesystem& filesystem_;
    int listen_fd_;
    int stop_fd_;  // eventfd that ends serve()
    std::string path_;
    std::thread thread_;
};

// Sends one request to the daemon serving `state_dir` (through `socket`
// when not empty) and returns its reply. Errc::not_found when no daemon
// answers.
vault::Result<nlohmann::json> control_call(const std::string& state_dir, const std::string& socket,
                                           const std::string& request);

}  // namespace vaultfs::fs
