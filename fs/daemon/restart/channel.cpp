#include "fs/daemon/restart/channel.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>

namespace vaultfs::fs::restart {

namespace {

constexpr std::size_t max_message = std::size_t{64} << 20;
constexpr std::size_t max_fds = 4;

// kind \n (name = value \n)*  -- names and values hold no newline.
std::string encode(const Message& m)
{
    std::string text = m.kind + "\n";
    for (const auto& [k, v] : m.fields) {
        std::string value = v;
        std::replace(value.begin(), value.end(), '\n', ' ');  // a message's reason may hold one
        text += k + "=" + value + "\n";
    }
    return text;
}

std::optional<Message> decode(const std::string& text)
{
    Message m;
    std::size_t at = text.find('\n');
    if (at == std::string::npos)
        return std::nullopt;
    m.kind = text.substr(0, at);
    ++at;
    while (at < text.size()) {
        const std::size_t end = text.find('\n', at);
        const std::size_t eq = text.find('=', at);
        if (end == std::string::npos || eq == std::string::npos || eq > end)
            return std::nullopt;
        m.fields[text.substr(at, eq - at)] = text.substr(eq + 1, end - eq - 1);
        at = end + 1;
    }
    return m;
}

bool wait_readable(int socket, int timeout_ms)
{
    pollfd p{socket, POLLIN, 0};
    for (;;) {
        const int r = ::poll(&p, 1, timeout_ms);
        if (r > 0)
            return true;
        if (r == 0) {
            errno = ETIMEDOUT;
            return false;
        }
        if (errno != EINTR)
            return false;
    }
}

bool read_all(int socket, char* at, std::size_t n, int timeout_ms)
{
    while (n > 0) {
        if (!wait_readable(socket, timeout_ms))
            return false;
        const ssize_t r = ::recv(socket, at, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EPIPE;
            return false;
        }
        at += r;
        n -= static_cast<std::size_t>(r);
    }
    return true;
}

}  // namespace

std::string Message::get(const std::string& name) const
{
    const auto it = fields.find(name);
    return it == fields.end() ? std::string() : it->second;
}

std::uint64_t Message::number(const std::string& name) const
{
    const std::string v = get(name);
    std::uint64_t n = 0;
    const auto r = std::from_chars(v.data(), v.data() + v.size(), n);
    return r.ec == std::errc() && r.ptr == v.data() + v.size() ? n : 0;
}

bool send_message(int socket, const Message& m)
{
    const std::string body = encode(m);
    const std::uint32_t length = static_cast<std::uint32_t>(body.size());
    std::string frame(reinterpret_cast<const char*>(&length), sizeof length);
    frame += body;

    msghdr msg{};
    iovec iov{frame.data(), frame.size()};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds)] = {};
    if (!m.fds.empty()) {
        if (m.fds.size() > max_fds) {
            errno = EINVAL;
            return false;
        }
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * m.fds.size());
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * m.fds.size());
        std::memcpy(CMSG_DATA(c), m.fds.data(), sizeof(int) * m.fds.size());
    }
    std::size_t sent = 0;
    while (sent < frame.size()) {
        const ssize_t r = ::sendmsg(socket, &msg, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return false;
        sent += static_cast<std::size_t>(r);
        iov.iov_base = frame.data() + sent;
        iov.iov_len = frame.size() - sent;
        msg.msg_control = nullptr;  // the fds went with the first bytes
        msg.msg_controllen = 0;
    }
    return true;
}

std::optional<Message> receive_message(int socket, int timeout_ms)
{
    std::uint32_t length = 0;
    msghdr msg{};
    iovec iov{&length, sizeof length};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds)] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    if (!wait_readable(socket, timeout_ms))
        return std::nullopt;
    ssize_t r;
    do
        r = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    // (The fds come with the first bytes; the rest of the header may follow.)
    if (r > 0 && r < static_cast<ssize_t>(sizeof length) &&
        read_all(socket, reinterpret_cast<char*>(&length) + r, sizeof length - static_cast<std::size_t>(r),
                 timeout_ms))
        r = sizeof length;
    std::vector<int> fds;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < n; ++i) {
                int fd = -1;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                fds.push_back(fd);
            }
        }
    const auto drop = [&] {
        for (const int fd : fds)
            ::close(fd);
    };
    if (r != static_cast<ssize_t>(sizeof length) || length > max_message) {
        if (r == 0)
            errno = 0;
        else if (r > 0)
            errno = EPROTO;
        drop();
        return std::nullopt;
    }
    std::string body(length, '\0');
    if (!read_all(socket, body.data(), body.size(), timeout_ms)) {
        drop();
        return std::nullopt;
    }
    auto m = decode(body);
    if (!m) {
        errno = EPROTO;
        drop();
        return std::nullopt;
    }
    m->fds = std::move(fds);
    return m;
}

}  // namespace vaultfs::fs::restart
