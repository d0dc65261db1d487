// Consumers learning that a secret changed: poll() on a reader of S.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

#include "fs_support.hpp"

using namespace vaultfs::testing;

namespace {

// poll() for POLLPRI on fd; the events it reported (0 on timeout).
short poll_pri(int fd, int timeout_ms)
{
    pollfd p{fd, POLLPRI, 0};
    const int n = ::poll(&p, 1, timeout_ms);
    return n > 0 ? p.revents : 0;
}

std::string read_fd(int fd)
{
    std::string out;
    char buf[256];
    ::lseek(fd, 0, SEEK_SET);
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
        out.append(buf, static_cast<std::size_t>(n));
    return out;
}

}  // namespace

TEST_CASE("poll on a reader of S wakes within 100 ms of a newer version; S@N never does", "[fs][poll]")
{
    Mount m;
    REQUIRE(make_dir(m.path("rot")).err == 0);
    REQUIRE(write_file(m.path("rot/s"), "one").err == 0);
    const int reader = ::open(m.path("rot/s").c_str(), O_RDONLY);
    REQUIRE(reader >= 0);
    const int pinned = ::open(m.path("rot/s@1").c_str(), O_RDONLY);
    REQUIRE(pinned >= 0);
    // Nothing newer yet: no event, and readable, as any regular file.
    CHECK(poll_pri(reader, 0) == 0);
    pollfd in{reader, POLLIN, 0};
    CHECK(::poll(&in, 1, 0) == 1);
    CHECK(in.revents == POLLIN);

    // A waiter blocks until a commit; it wakes within 100 ms of the writer's close().
    std::chrono::steady_clock::time_point woke;
    short events = 0;
    std::thread waiter([&] {
        events = poll_pri(reader, 10000);
        woke = std::chrono::steady_clock::now();
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const Outcome w = write_file(m.path("rot/s"), "two");
    const auto committed = std::chrono::steady_clock::now();
    waiter.join();
    REQUIRE(w.err == 0);
    CHECK((events & (POLLPRI | POLLERR)) == (POLLPRI | POLLERR));
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(woke - committed).count();
    INFO("woke " << ms << " ms after the commit");
    CHECK(ms < 100);

    // The event stays until the reader reopens; what it reads is still the
    // version it opened. S@1 has nothing newer to report.
    CHECK((poll_pri(reader, 0) & POLLPRI) != 0);
    CHECK(read_fd(reader) == "one");
    CHECK(poll_pri(pinned, 0) == 0);
    const int reopened = ::open(m.path("rot/s").c_str(), O_RDONLY);
    REQUIRE(reopened >= 0);
    CHECK(read_fd(reopened) == "two");
    CHECK(poll_pri(reopened, 0) == 0);

    // Disabling the version a reader has (S stands for the one before) and
    // deleting S wake waiters too.
    std::thread disable_waiter([&] { events = poll_pri(reopened, 10000); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(set_xattr(m.path("rot/s@2"), "user.vault.enabled", "false").err == 0);
    disable_waiter.join();
    CHECK((events & POLLPRI) != 0);
    const int third = ::open(m.path("rot/s").c_str(), O_RDONLY);
    REQUIRE(third >= 0);
    std::thread delete_waiter([&] { events = poll_pri(third, 10000); });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(remove_file(m.path("rot/s")).err == 0);
    delete_waiter.join();
    CHECK((events & POLLPRI) != 0);
    for (const int fd : {reader, pinned, reopened, third})
        ::close(fd);
}
