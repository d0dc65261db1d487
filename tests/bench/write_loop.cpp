// write_loop: durable new versions per second. Each thread writes ITERATIONS
// values (open O_WRONLY|O_CREAT|O_TRUNC, write 64 bytes, close — the close
// commits, durably, before it returns). SHARED=1: every thread writes the
// same file; 0: each thread its own (PREFIX-T).
//
//   write_loop PREFIX ITERATIONS THREADS SHARED
#include <fcntl.h>
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
    if (argc != 5) {
        std::fprintf(stderr, "usage: write_loop PREFIX ITERATIONS THREADS SHARED\n");
        return 2;
    }
    const std::string prefix = argv[1];
    const long iterations = std::atol(argv[2]);
    const int threads = std::atoi(argv[3]);
    const bool shared = std::atoi(argv[4]) != 0;
    std::atomic<long> failures{0};
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            const std::string path = shared ? prefix : prefix + "-" + std::to_string(t);
            std::string value(64, static_cast<char>('a' + t));
            for (long i = 0; i < iterations; ++i) {
                const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
                if (fd < 0 || ::write(fd, value.data(), value.size()) != static_cast<ssize_t>(value.size()) ||
                    ::close(fd) != 0)
                    ++failures;
            }
        });
    }
    for (auto& t : pool)
        t.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (failures != 0) {
        std::fprintf(stderr, "write_loop: %ld failed writes\n", failures.load());
        return 1;
    }
    std::printf("%.0f\n", static_cast<double>(iterations) * threads / seconds);
    return 0;
}
