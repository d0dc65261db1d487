// read_loop: open + read + close of one file, N times per thread, as a given
// uid. Prints "ops_per_second". Used by scripts/bench for every system
// measured, so the loop is the same everywhere. `eof` reads until read()
// returns 0, as cat, nginx, OpenSSL and every config loader do; `once` makes
// one read() per open.
//
//   read_loop eof|once PATH ITERATIONS THREADS [UID GID]
#include <fcntl.h>
#include <grp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char** argv)
{
    const bool to_eof = argc > 1 && std::string(argv[1]) == "eof";
    if ((argc != 5 && argc != 7) || (!to_eof && std::string(argv[1]) != "once")) {
        std::fprintf(stderr, "usage: read_loop eof|once PATH ITERATIONS THREADS [UID GID]\n");
        return 2;
    }
    ++argv;
    --argc;
    const std::string path = argv[1];
    const long iterations = std::atol(argv[2]);
    const int threads = std::atoi(argv[3]);
    if (argc == 6) {
        const gid_t gid = static_cast<gid_t>(std::atol(argv[5]));
        if (::setgroups(0, nullptr) != 0 || ::setresgid(gid, gid, gid) != 0 ||
            ::setresuid(std::atol(argv[4]), std::atol(argv[4]), std::atol(argv[4])) != 0) {
            std::perror("dropping privileges");
            return 1;
        }
    }
    std::atomic<long> failures{0};
    std::atomic<long> expected{-1};
    const auto one = [&] {
        char buf[4096];
        for (long i = 0; i < iterations; ++i) {
            const int fd = ::open(path.c_str(), O_RDONLY);
            if (fd < 0) {
                ++failures;
                continue;
            }
            ssize_t n = ::read(fd, buf, sizeof buf);
            if (to_eof && n > 0 && ::read(fd, buf, sizeof buf) != 0)
                n = -1;  // a 1 KiB file: the second read() is at EOF
            ::close(fd);
            long want = -1;
            if (!expected.compare_exchange_strong(want, n) && want != n)
                ++failures;
        }
    };
    one();  // warm-up, and the expected size
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back(one);
    for (auto& t : pool)
        t.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (failures != 0) {
        std::fprintf(stderr, "read_loop: %ld failed opens or short reads on %s\n", failures.load(), path.c_str());
        return 1;
    }
    std::printf("%.0f\n", static_cast<double>(iterations) * threads / seconds);
    return 0;
}
