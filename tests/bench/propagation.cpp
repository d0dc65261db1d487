// propagation: how long a write on one host takes to be read on another
// (docs/hosts.md "Several hosts"). Each round writes a new value to WRITE (a
// secret on host A's mount; the close commits) and reads READ (the same
// secret on host B's mount) until it returns that value, as programs do
// (open, read until EOF, close). Prints the median and the 99th percentile
// in milliseconds, and how many rounds exceeded LIMIT_MS.
//
//   propagation WRITE READ ROUNDS LIMIT_MS
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

bool write_value(const std::string& path, const std::string& v)
{
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return false;
    const bool ok = ::write(fd, v.data(), v.size()) == static_cast<ssize_t>(v.size());
    return ::close(fd) == 0 && ok;
}

std::string read_value(const std::string& path)
{
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0)
        return {};
    std::string out;
    char buf[4096];
    for (;;) {
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0)
            break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    ::close(fd);
    return out;
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc != 5) {
        std::fprintf(stderr, "usage: propagation WRITE READ ROUNDS LIMIT_MS\n");
        return 2;
    }
    const std::string write_path = argv[1], read_path = argv[2];
    const int rounds = std::atoi(argv[3]);
    const double limit = std::atof(argv[4]);
    std::vector<double> ms;
    int late = 0;
    for (int i = 0; i < rounds; ++i) {
        const std::string v = "value-" + std::to_string(i) + "-" + std::to_string(::getpid());
        if (!write_value(write_path, v)) {
            std::fprintf(stderr, "propagation: write %d failed\n", i);
            return 1;
        }
        const auto start = std::chrono::steady_clock::now();
        for (;;) {
            if (read_value(read_path) == v)
                break;
            if (std::chrono::steady_clock::now() - start > std::chrono::seconds(30)) {
                std::fprintf(stderr, "propagation: round %d never arrived\n", i);
                return 1;
            }
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        const double d =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        ms.push_back(d);
        if (d > limit)
            ++late;
    }
    std::sort(ms.begin(), ms.end());
    const auto at = [&](double q) { return ms[std::min(ms.size() - 1, static_cast<std::size_t>(q * ms.size()))]; };
    std::printf("%.1f %.1f %d\n", at(0.5), at(0.99), late);
    return 0;
}
