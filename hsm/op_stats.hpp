// op_stats: how many operations the token did, and how long they took, for
// the daemon's metrics (vault/monitor/metrics.hpp). Counted where the
// operation is asked for, so a call includes its session borrow and any
// reconnect. Lock-free: a worker adds to a few atomics.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string_view>

namespace vaultfs::hsm {

enum class TokenOp { seal, unseal, sign, decrypt, ping };
inline constexpr std::array<std::string_view, 5> token_op_names{"seal", "unseal", "sign", "decrypt", "ping"};

// Upper bounds of the latency buckets, in seconds (Prometheus `le`).
inline constexpr std::array<double, 12> token_latency_buckets{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                              0.01,   0.025,   0.05,   0.1,   0.5,    2.5};

class OpStats {
public:
    struct Histogram {
        std::uint64_t count = 0;
        double sum_seconds = 0;
        std::array<std::uint64_t, token_latency_buckets.size()> cumulative{};  // per bucket, <= its bound
    };

    void observe(TokenOp op, std::chrono::nanoseconds took);
    Histogram of(TokenOp op) const;

    // Times one operation: records it when it goes out of scope.
    class Timer {
    public:
        Timer(OpStats& stats, TokenOp op) : stats_(stats), op_(op), start_(std::chrono::steady_clock::now()) {}
        ~Timer() { stats_.observe(op_, std::chrono::steady_clock::now() - start_); }
        Timer(const Timer&) = delete;
        Timer& operator=(const Timer&) = delete;

    private:
        OpStats& stats_;
        TokenOp op_;
        std::chrono::steady_clock::time_point start_;
    };

private:
    struct Counters {
        std::atomic<std::uint64_t> count{0};
        std::atomic<std::uint64_t> nanos{0};
        std::array<std::atomic<std::uint64_t>, token_latency_buckets.size()> buckets{};  // not cumulative
    };
    std::array<Counters, token_op_names.size()> ops_;
};

}  // namespace vaultfs::hsm
