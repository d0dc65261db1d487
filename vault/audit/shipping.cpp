#include "vault/audit/shipping.hpp"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/time.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <utility>

#include <spdlog/spdlog.h>


namespace vaultfs::vault::audit {

namespace {

using namespace std::chrono_literals;

// How the sender batches: what has queued up every this long, or as soon as
// this many records wait.
constexpr auto batch_interval = 20ms;
constexpr std::size_t batch_records = 512;

constexpr std::array<std::pair<std::string_view, int>, 16> facilities{{{"kern", 0},
                                                                       {"user", 1},
                                                                       {"daemon", 3},
                                                                       {"auth", 4},
                                                                       {"authpriv", 10},
                                                                       {"local0", 16},
                                                                       {"local1", 17},
                                                                       {"local2", 18},
                                                                       {"local3", 19},
                                                                       {"local4", 20},
                                                                       {"local5", 21},
                                                                       {"local6", 22},
                                                                       {"local7", 23},
                                                                       {"security", 13},
                                                                       {"console", 14},
                                                                       {"syslog", 5}}};

// An SD-PARAM value: ", \ and ] escaped (RFC 5424 §6.3.3).
void param(std::string& out, std::string_view name, std::string_view value)
{
    out += ' ';
    out += name;
    out += "=\"";
    for (const char c : value) {
        if (c == '"' || c == '\\' || c == ']')
            out += '\\';
        out += c;
    }
    out += '"';
}

// The top-level fields of a record line, read without parsing it as JSON or
// checking its hash (the writer just made it; `audit verify` checks): a
// record's body is one flat object of strings, numbers, booleans and nulls
// (audit/format.hpp). Strings are unescaped except \uXXXX, kept as written.
std::vector<std::pair<std::string_view, std::string>> flat_fields(std::string_view line)
{
    std::vector<std::pair<std::string_view, std::string>> out;
    std::size_t i = 1;  // after '{'
    while (i < line.size() && line[i] == '"') {
        const std::size_t key_end = line.find('"', i + 1);
        if (key_end == std::string_view::npos || key_end + 1 >= line.size() || line[key_end + 1] != ':')
            break;
        const std::string_view key = line.substr(i + 1, key_end - i - 1);
        i = key_end + 2;
        std::string value;
        if (i < line.size() && line[i] == '"') {
            for (++i; i < line.size() && line[i] != '"'; ++i) {
                if (line[i] == '\\' && i + 1 < line.size()) {
                    const char e = line[++i];
                    if (e == 'u')
                        value += "\\u";
                    else
                        value += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
                } else {
                    value += line[i];
                }
            }
            ++i;  // the closing quote
        } else {
            const std::size_t end = line.find_first_of(",}", i);
            value.assign(line.substr(i, end == std::string_view::npos ? std::string_view::npos : end - i));
            i = end == std::string_view::npos ? line.size() : end;
            if (value == "null")
                value.clear();
        }
        out.emplace_back(key, std::move(value));
        if (i >= line.size() || line[i] != ',')
            break;
        ++i;
    }
    return out;
}

std::string field_text(const std::vector<std::pair<std::string_view, std::string>>& fields, std::string_view key)
{
    for (const auto& [k, v] : fields)
        if (k == key)
            return v;
    return {};
}

}  // namespace

Result<int> parse_facility(std::string_view name)
{
    for (const auto& [n, f] : facilities)
        if (n == name)
            return f;
    return fail(Errc::invalid_argument, "unknown syslog facility '" + std::string(name) +
                                            "' (local0 to local7, auth, authpriv, daemon, user, ...)");
}

std::string facility_name(int facility)
{
    for (const auto& [n, f] : facilities)
        if (f == facility)
            return std::string(n);
    return "local5";
}

Result<SyslogTarget> parse_syslog_target(std::string_view text)
{
    SyslogTarget t;
    const auto bad = [&](std::string_view why) {
        return fail(Errc::invalid_argument, "audit_syslog '" + std::string(text) + "': " + std::string(why) +
                                                " (udp:HOST:PORT or tcp:HOST:PORT)");
    };
    std::string_view rest;
    if (text.starts_with("udp:"))
        t.transport = SyslogTarget::Transport::udp;
    else if (text.starts_with("tcp:"))
        t.transport = SyslogTarget::Transport::tcp;
    else
        return bad("unknown transport");
    rest = text.substr(4);
    const auto colon = rest.rfind(':');
    if (colon == std::string_view::npos || colon == 0)
        return bad("no port");
    std::string_view host = rest.substr(0, colon);
    const std::string_view port = rest.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    unsigned value = 0;
    const auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc() || p != port.data() + port.size() || value == 0 || value > 65535)
        return bad("the port is not 1-65535");
    if (host.empty())
        return bad("no host");
    t.host = std::string(host);
    t.port = std::string(port);
    return t;
}

std::string render_syslog_target(const SyslogTarget& t)
{
    const bool v6 = t.host.find(':') != std::string::npos;
    return std::string(t.transport == SyslogTarget::Transport::tcp ? "tcp:" : "udp:") + (v6 ? "[" : "") + t.host +
           (v6 ? "]" : "") + ":" + t.port;
}

std::string rfc5424(std::string_view line, int facility, std::string_view hostname)
{
    const auto fields = flat_fields(line);
    std::string op = field_text(fields, "op");
    if (op.empty())
        op = "unknown";
    const std::string seq = field_text(fields, "seq");
    const std::string time = field_text(fields, "time");
    const std::string decision = field_text(fields, "decision");
    const std::string result = field_text(fields, "result");
    // info for what was allowed and done, notice for a refusal, warning for a failure
    int severity = 6;
    if (decision == "deny")
        severity = 5;
    else if (!result.empty() && result != "ok")
        severity = 4;
    std::string out = "<" + std::to_string(facility * 8 + severity) + ">1 ";
    out += time.empty() ? std::string("-") : time;
    out += ' ';
    out += hostname.empty() ? "-" : hostname;
    out += " vaultfs-audit ";
    out += std::to_string(::getpid());
    out += ' ';
    out += op.empty() || op.size() > 32 ? std::string("-") : op;
    out += " [vaultfs@32473";
    param(out, "seq", seq);
    param(out, "op", op);
    for (const char* key : {"uid", "gid", "pid", "vault", "secret", "version", "decision", "result"})
        if (const std::string v = field_text(fields, key); !v.empty())
            param(out, key, v);
    param(out, "signed", line.find(",\"sig\":\"") != std::string_view::npos ? "1" : "0");
    out += "] ";
    out += line;
    return out;
}

Shipper::Shipper(SyslogTarget target) : target_(std::move(target))
{
    std::array<char, 256> name{};
    if (::gethostname(name.data(), name.size() - 1) == 0)
        hostname_ = name.data();
    thread_ = std::thread([this] { run(); });
}

Shipper::~Shipper()
{
    (void)drain(2s);
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    if (fd_ >= 0)
        ::close(fd_);
}

void Shipper::enqueue(std::string_view line)
{
    bool wake = false;
    {
        std::lock_guard lock(mutex_);
        if (queue_.size() >= target_.queue) {
            dropped_.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        queue_.emplace_back(line);
        // The sender looks every batch_interval; a full batch wakes it
        // sooner. No wake-up per record: a reader never pays for one.
        wake = queue_.size() == batch_records && !sending_;
    }
    if (wake)
        cv_.notify_one();
}

Shipper::Stats Shipper::stats() const
{
    std::lock_guard lock(mutex_);
    return Stats{shipped_.load(), dropped_.load(), static_cast<std::uint64_t>(queue_.size() + in_flight_),
                 errors_.load()};
}

bool Shipper::drain(std::chrono::milliseconds timeout)
{
    cv_.notify_one();
    std::unique_lock lock(mutex_);
    return idle_cv_.wait_for(lock, timeout, [&] { return queue_.empty() && !sending_; });
}

void Shipper::run()
{
    std::unique_lock lock(mutex_);
    while (true) {
        cv_.wait_for(lock, batch_interval, [&] { return stop_ || queue_.size() >= batch_records; });
        if (queue_.empty()) {
            if (stop_)
                break;
            continue;
        }
        // Everything queued, in one go: one send for many records over TCP.
        std::deque<std::string> batch;
        batch.swap(queue_);
        sending_ = true;
        in_flight_ = batch.size();
        lock.unlock();
        std::vector<std::string> messages;
        messages.reserve(batch.size());
        for (auto& line : batch) {
            while (!line.empty() && line.back() == '\n')
                line.pop_back();
            messages.push_back(rfc5424(line, target_.facility, hostname_));
        }
        const std::size_t sent = send_batch(messages);
        shipped_.fetch_add(sent, std::memory_order_relaxed);
        dropped_.fetch_add(messages.size() - sent, std::memory_order_relaxed);
        lock.lock();
        sending_ = false;
        in_flight_ = 0;
        if (queue_.empty())
            idle_cv_.notify_all();
    }
    sending_ = false;
    idle_cv_.notify_all();
}

bool Shipper::connect_now()
{
    if (fd_ >= 0)
        return true;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_connect_)
        return false;
    next_connect_ = now + 1s;
    addrinfo hints{};
    hints.ai_socktype = target_.transport == SyslogTarget::Transport::tcp ? SOCK_STREAM : SOCK_DGRAM;
    addrinfo* found = nullptr;
    if (const int rc = ::getaddrinfo(target_.host.c_str(), target_.port.c_str(), &hints, &found); rc != 0) {
        errors_.fetch_add(1, std::memory_order_relaxed);
        spdlog::warn("audit shipping: cannot resolve {}: {}", target_.host, ::gai_strerror(rc));
        return false;
    }
    for (addrinfo* a = found; a != nullptr && fd_ < 0; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        // A stalled server costs the worker at most this, never a reader.
        const timeval tv{2, 0};
        ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            fd_ = fd;
        } else {
            ::close(fd);
        }
    }
    ::freeaddrinfo(found);
    if (fd_ < 0) {
        errors_.fetch_add(1, std::memory_order_relaxed);
        spdlog::warn("audit shipping: cannot connect to {}: {}", render_syslog_target(target_), std::strerror(errno));
        return false;
    }
    return true;
}

bool Shipper::send_all(std::string_view data)
{
    while (!data.empty()) {
        const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            errors_.fetch_add(1, std::memory_order_relaxed);
            spdlog::warn("audit shipping: sending to {} failed: {}", render_syslog_target(target_),
                         n < 0 ? std::strerror(errno) : "nothing sent");
            ::close(fd_);
            fd_ = -1;
            return false;
        }
        data.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
}

std::size_t Shipper::send_batch(const std::vector<std::string>& messages)
{
    if (!connect_now())
        return 0;
    if (target_.transport == SyslogTarget::Transport::udp) {
        // A datagram each (RFC 5426).
        std::size_t sent = 0;
        for (const auto& m : messages) {
            if (!send_all(m))
                return sent;
            ++sent;
        }
        return sent;
    }
    // Octet-counted frames (RFC 6587), up to 64 KiB a send. A failed send
    // may have delivered part of its frames: they count as dropped.
    std::size_t sent = 0, framed = 0;
    std::string buffer;
    for (std::size_t i = 0; i < messages.size(); ++i) {
        buffer += std::to_string(messages[i].size());
        buffer += ' ';
        buffer += messages[i];
        ++framed;
        if (buffer.size() >= 65536 || i + 1 == messages.size()) {
            if (!send_all(buffer))
                return sent;
            sent += framed;
            framed = 0;
            buffer.clear();
        }
    }
    return sent;
}

}  // namespace vaultfs::vault::audit
