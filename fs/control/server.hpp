// control: the management plane — operations that are not file-shaped
// (vault create/show/list, status, backup, restore, policy set and reset)
// over a Unix socket. Every error reply names the thing, what went wrong
// and what to do.
//
// The caller is who the kernel says is on the other end (SO_PEERCRED and
// SO_PEERGROUPS), never what the request claims. Only uid 0 and members of
// the admin group are served; every call, refused or not, is audited.
// The socket file is world-connectable (0666) on purpose: the daemon must
// see a refused caller to audit it. Its directory decides who can reach it
// (by default the 0700 state directory: root only).
//
// Clients are served concurrently, each on a thread of its own, so a slow
// one holds up no one else: at most `max_clients` at once, at most
// `max_clients_per_uid` of one uid, and at most `max_outsider_clients` of
// callers who are not admins, so that outsiders (who are only ever refused)
// can never take the slots admins need; past any of them, an immediate EBUSY
// reply. Each exchange must be done within `deadline` -- the request read
// and the reply written -- or the connection is dropped.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "vault/model/error.hpp"
#include "vault/state/state.hpp"

namespace vaultfs::fs {

class Filesystem;

// Replies: {"ok":false,"errno":...,"error":...}; failure() names `what`,
// what went wrong and what to do.
nlohmann::json error_reply(const vault::Error& e);
nlohmann::json failure(const vault::Error& e, const std::string& what);

class ControlServer {
public:
    static constexpr int max_clients = 32;
    static constexpr int max_clients_per_uid = 4;
    static constexpr int max_outsider_clients = 8;
    static constexpr std::chrono::seconds deadline{10};

    // Binds the socket (replacing a stale one) and starts serving.
    static vault::Result<std::unique_ptr<ControlServer>> start(vault::State& state, const Filesystem& filesystem,
                                                               std::string mountpoint);
    ~ControlServer();
    ControlServer(const ControlServer&) = delete;
    ControlServer& operator=(const ControlServer&) = delete;

private:
    ControlServer(vault::State& state, const Filesystem& filesystem, int listen_fd, int stop_fd, std::string path,
                  std::string mountpoint);
    void serve();
    // Serves one connection to the end (on its own thread); closes `fd`.
    void handle(int fd, const vault::Caller& caller);
    nlohmann::json dispatch(const vault::Caller& caller, const std::string& text);
    // Takes a client slot for the uid, or false when none is free.
    bool admit(uid_t uid, bool admin);
    void leave(uid_t uid, bool admin);

    vault::State& state_;
    const Filesystem& filesystem_;
    int listen_fd_;
    int stop_fd_;  // eventfd that ends serve() and every client's wait
    std::string path_;
    std::string mountpoint_;
    std::thread thread_;

    std::mutex clients_mutex_;
    int clients_ = 0;
    int outsiders_ = 0;
    std::unordered_map<uid_t, int> clients_by_uid_;
    // Client threads, started and joined by serve() only; the flag says done.
    std::vector<std::pair<std::shared_ptr<std::atomic<bool>>, std::thread>> workers_;
};

// Sends one request to the daemon serving `state_dir` (through `socket`
// when not empty) and returns its reply. Errc::not_found when no daemon
// answers.
vault::Result<nlohmann::json> control_call(const std::string& state_dir, const std::string& socket,
                                           const std::string& request);

}  // namespace vaultfs::fs
