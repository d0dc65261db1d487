// stat_loop: average microseconds per stat() of DIR/PREFIX<i>, over COUNT
// names spread evenly across 0..RANGE-1 (each name once, so no cache
// answers twice).
//
//   stat_loop DIR PREFIX RANGE COUNT
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv)
{
    if (argc != 5) {
        std::fprintf(stderr, "usage: stat_loop DIR PREFIX RANGE COUNT\n");
        return 2;
    }
    const std::string base = std::string(argv[1]) + "/" + argv[2];
    const long range = std::atol(argv[3]);
    const long count = std::atol(argv[4]);
    const long step = range / count > 0 ? range / count : 1;
    long failures = 0;
    const auto start = std::chrono::steady_clock::now();
    for (long i = 0; i < count; ++i) {
        struct stat st{};
        if (::stat((base + std::to_string((i * step + i % step) % range)).c_str(), &st) != 0)
            ++failures;
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (failures != 0) {
        std::fprintf(stderr, "stat_loop: %ld stats failed\n", failures);
        return 1;
    }
    std::printf("%.1f\n", us / static_cast<double>(count));
    return 0;
}
