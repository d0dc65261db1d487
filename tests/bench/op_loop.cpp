// op_loop: a key operation through its file, N times per thread: open
// O_RDWR, write the input, read the result until read() returns 0, close.
// Prints "ops_per_second". Used by scripts/bench for sign/s and decrypt/s.
//
//   op_loop PATH INPUT-FILE ITERATIONS THREADS
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char** argv)
{
    if (argc != 5) {
        std::fprintf(stderr, "usage: op_loop PATH INPUT-FILE ITERATIONS THREADS\n");
        return 2;
    }
    const std::string path = argv[1];
    std::ifstream in(argv[2], std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string input = ss.str();
    const long iterations = std::atol(argv[3]);
    const int threads = std::atoi(argv[4]);
    std::atomic<long> failures{0};
    const auto one = [&] {
        char buf[4096];
        for (long i = 0; i < iterations; ++i) {
            const int fd = ::open(path.c_str(), O_RDWR);
            if (fd < 0) {
                ++failures;
                continue;
            }
            bool ok = ::write(fd, input.data(), input.size()) == static_cast<ssize_t>(input.size());
            ssize_t total = 0;
            for (ssize_t n; ok && (n = ::read(fd, buf, sizeof buf)) != 0;) {
                if (n < 0) {
                    ok = false;
                    break;
                }
                total += n;
            }
            if (::close(fd) != 0 || !ok || total == 0)
                ++failures;
        }
    };
    one();  // warm-up
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
        pool.emplace_back(one);
    for (auto& t : pool)
        t.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (failures != 0) {
        std::fprintf(stderr, "op_loop: %ld failed operations on %s\n", failures.load(), path.c_str());
        return 1;
    }
    std::printf("%.0f\n", static_cast<double>(iterations) * threads / seconds);
    return 0;
}
