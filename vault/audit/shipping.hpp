// audit/shipping: every audit record also sent to a syslog server, for
// rsyslog (or any RFC 5424 receiver) to route to a central store (docs/audit.md
// "Shipping the audit").
//
//   audit_syslog = udp:HOST:PORT | tcp:HOST:PORT
//   audit_syslog_facility = local5        (the records' own facility)
//   audit_syslog_queue = 10000            (records waiting, at most)
//
// Each record is one RFC 5424 message: APP-NAME `vaultfs-audit`, MSGID the
// record's op, structured data `[vaultfs@32473 seq= op= uid= gid= pid=
// vault= secret= version= decision= result=]` for routing and filtering
// (32473 is the enterprise number RFC 5612 sets aside for examples), and
// the record's exact line as MSG, so a receiver holds what `audit verify`
// checks. Over TCP, messages are octet-counted (RFC 6587).
//
// The audit file stays the record of truth; shipping is best effort. The
// writer hands each line to a bounded queue and goes on (it never waits on
// the network, nor wakes anything up); a worker sends what has queued up
// every 20 ms (or at 512 records), in one go: one send for many records over
// TCP. A full queue, or a send that fails, drops
// the record and counts it (metrics), and the worker reconnects at most once
// a second.
#pragma once

#include <sys/socket.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "vault/model/error.hpp"

namespace vaultfs::vault::audit {

struct SyslogTarget {
    enum class Transport { udp, tcp };
    Transport transport = Transport::udp;
    std::string host;
    std::string port;
    int facility = 21;  // local5
    std::size_t queue = 10000;
};

// "udp:HOST:PORT" or "tcp:HOST:PORT" (HOST may be [v6]); a facility name.
Result<SyslogTarget> parse_syslog_target(std::string_view text);
Result<int> parse_facility(std::string_view name);
std::string facility_name(int facility);
std::string render_syslog_target(const SyslogTarget& t);

// One record line (without its newline) as an RFC 5424 message.
std::string rfc5424(std::string_view line, int facility, std::string_view hostname);

class Shipper {
public:
    explicit Shipper(SyslogTarget target);
    ~Shipper();
    Shipper(const Shipper&) = delete;
    Shipper& operator=(const Shipper&) = delete;

    // Queues one record line; never blocks on the network.
    void enqueue(std::string_view line);

    struct Stats {
        std::uint64_t shipped = 0;
        std::uint64_t dropped = 0;
        std::uint64_t queued = 0;
        std::uint64_t errors = 0;
    };
    Stats stats() const;
    // Waits up to `timeout` for the queue to empty (at shutdown; tests).
    bool drain(std::chrono::milliseconds timeout);

private:
    void run();
    bool connect_now();
    bool send_all(std::string_view data);
    // Returns how many of `messages` were sent.
    std::size_t send_batch(const std::vector<std::string>& messages);

    const SyslogTarget target_;
    std::string hostname_;
    int fd_ = -1;
    std::chrono::steady_clock::time_point next_connect_{};

    mutable std::mutex mutex_;
    std::condition_variable cv_;
    std::condition_variable idle_cv_;
    std::deque<std::string> queue_;
    bool sending_ = false;
    std::size_t in_flight_ = 0;  // taken from the queue, being sent
    bool stop_ = false;
    std::atomic<std::uint64_t> shipped_{0}, dropped_{0}, errors_{0};
    std::thread thread_;
};

}  // namespace vaultfs::vault::audit
