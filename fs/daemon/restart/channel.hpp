// channel: the messages the supervisor, the serving process and the
// process that takes over exchange (fs/daemon/restart/supervisor.hpp), over a
// Unix stream socket. A message is a kind and named fields (text; binary
// fields hex), framed by its length, and may carry file descriptors
// (SCM_RIGHTS): the FUSE connection, the state's lock.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace vaultfs::fs::restart {

// The version of these messages and of what they carry (the INIT exchange,
// the handle table). A process that speaks another refuses to take over.
inline constexpr int protocol_version = 1;

struct Message {
    std::string kind;
    std::map<std::string, std::string> fields;
    std::vector<int> fds;  // received: owned by the receiver

    std::string get(const std::string& name) const;
    std::uint64_t number(const std::string& name) const;  // 0 when absent or not a number
};

// Whole or not at all; false with errno set.
bool send_message(int socket, const Message& m);
// nullopt at end of stream or on error (errno set; 0 at a clean end).
// `timeout_ms` < 0: wait for ever.
std::optional<Message> receive_message(int socket, int timeout_ms = -1);

}  // namespace vaultfs::fs::restart
