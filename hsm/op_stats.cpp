#include "hsm/op_stats.hpp"

#include <algorithm>

namespace vaultfs::hsm {

void OpStats::observe(TokenOp op, std::chrono::nanoseconds took)
{
    Counters& c = ops_[static_cast<std::size_t>(op)];
    c.count.fetch_add(1, std::memory_order_relaxed);
    c.nanos.fetch_add(static_cast<std::uint64_t>(took.count()), std::memory_order_relaxed);
    const double seconds = std::chrono::duration<double>(took).count();
    for (std::size_t i = 0; i < token_latency_buckets.size(); ++i)
        if (seconds <= token_latency_buckets[i]) {
            c.buckets[i].fetch_add(1, std::memory_order_relaxed);
            break;
        }
}

OpStats::Histogram OpStats::of(TokenOp op) const
{
    const Counters& c = ops_[static_cast<std::size_t>(op)];
    Histogram h;
    // Buckets first: a count read after them is never below their sum.
    std::uint64_t running = 0;
    for (std::size_t i = 0; i < token_latency_buckets.size(); ++i) {
        running += c.buckets[i].load(std::memory_order_relaxed);
        h.cumulative[i] = running;
    }
    h.count = std::max(running, c.count.load(std::memory_order_relaxed));
    h.sum_seconds = static_cast<double>(c.nanos.load(std::memory_order_relaxed)) / 1e9;
    return h;
}

}  // namespace vaultfs::hsm
