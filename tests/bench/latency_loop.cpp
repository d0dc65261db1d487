// latency_loop: open + read until read() returns 0 + close of one file in a
// loop, as a given uid, for SECONDS; prints "reads failures longest_us".
// scripts/bench runs it while `vaultfs restart` replaces the server, and
// again without, to report the restart pause a reader sees.
//
//   latency_loop PATH SECONDS UID GID
#include <fcntl.h>
#include <grp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv)
{
    if (argc != 5) {
        std::fprintf(stderr, "usage: latency_loop PATH SECONDS UID GID\n");
        return 2;
    }
    const gid_t gid = static_cast<gid_t>(std::atol(argv[4]));
    const uid_t uid = static_cast<uid_t>(std::atol(argv[3]));
    if (::setgroups(0, nullptr) != 0 || ::setresgid(gid, gid, gid) != 0 || ::setresuid(uid, uid, uid) != 0) {
        std::perror("dropping privileges");
        return 1;
    }
    using Clock = std::chrono::steady_clock;
    const auto end = Clock::now() + std::chrono::seconds(std::atol(argv[2]));
    long reads = 0, failures = 0, longest_us = 0;
    char buf[4096];
    while (Clock::now() < end) {
        const auto t0 = Clock::now();
        bool ok = false;
        const int fd = ::open(argv[1], O_RDONLY);
        if (fd >= 0) {
            ssize_t n;
            while ((n = ::read(fd, buf, sizeof buf)) > 0) {
            }
            ok = n == 0;
            ok = ::close(fd) == 0 && ok;
        }
        const long us = static_cast<long>(
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count());
        longest_us = std::max(longest_us, us);
        ok ? ++reads : ++failures;
    }
    std::printf("%ld %ld %ld\n", reads, failures, longest_us);
    return 0;
}
