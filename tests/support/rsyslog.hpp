// Test support: a real rsyslogd of the test's own -- Debian's rsyslog, in
// the foreground with a private config in a temporary directory, receiving
// RFC 5424 over TCP on a free port of 127.0.0.1 and writing what arrives
// from APP-NAME vaultfs-audit to a file, one line per message:
//   FACILITY APP-NAME MSGID STRUCTURED-DATA MSG
// Killed by pid and its directory removed when this goes.
#pragma once

#include <sys/types.h>

#include <string>

namespace vaultfs::testing {

class RsyslogServer {
public:
    RsyslogServer();
    ~RsyslogServer();
    RsyslogServer(const RsyslogServer&) = delete;
    RsyslogServer& operator=(const RsyslogServer&) = delete;

    int port() const { return port_; }
    // What it has written so far.
    std::string received() const;
    void kill();

private:
    std::string dir_;
    int port_ = 0;
    pid_t pid_ = -1;
};

}  // namespace vaultfs::testing
