#include "fs/daemon/maintenance.hpp"

#include <spdlog/spdlog.h>

#include <chrono>

#include "fs/control/metrics.hpp"
#include "fs/fuse/filesystem.hpp"
#include "vault/hooks/hooks.hpp"
#include "vault/state/state.hpp"

namespace vaultfs::fs {

Maintenance::Maintenance(vault::State& state, Filesystem& filesystem, vault::hooks::Runner* hooks)
    : state_(state), filesystem_(filesystem)
{
    if (hooks)
        state_.expiry->on_event([hooks](vault::hooks::Runner::Event e) { hooks->expiry_event(std::move(e)); });
    thread_ = std::thread([this] { run(); });
}

Maintenance::~Maintenance()
{
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    state_.expiry->on_event(nullptr);  // the hook runner goes next
}

void Maintenance::run()
{
    auto next_purge = std::chrono::steady_clock::now();
    auto next_objects = std::chrono::steady_clock::now();
    auto next_expiry = std::chrono::steady_clock::now();
    auto next_metrics = std::chrono::steady_clock::now();
    std::unique_lock lock(mutex_);
    while (!stop_) {
        cv_.wait_for(lock, std::chrono::seconds(1));
        if (stop_)
            break;
        lock.unlock();
        state_.deks->sweep();
        filesystem_.sweep_staging();
        // Several hosts: one of them runs the rounds (vault/store/store.hpp).
        const bool leader = state_.store->background_leader();
        if (leader && std::chrono::steady_clock::now() >= next_purge) {
            next_purge = std::chrono::steady_clock::now() + state_.config.purge_interval;
            if (auto n = state_.service->purge_expired(); !n)
                spdlog::error("automatic purge failed: {}", n.error().message);
            else if (*n > 0)
                spdlog::info("automatic purge: {} secret(s) past their retention", *n);
        }
        if (leader && std::chrono::steady_clock::now() >= next_objects) {
            next_objects = std::chrono::steady_clock::now() + state_.config.object_policy_interval;
            const vault::Micros now = vault::now_micros();
            if (auto n = state_.key_vault->run_policies(now); !n)
                spdlog::error("key rotation policies failed: {}", n.error().message);
            if (auto n = state_.certificates->run_policies(now); !n)
                spdlog::error("certificate renewals failed: {}", n.error().message);
            if (auto n = state_.rekey->rotate_due(now); !n)
                spdlog::error("KEK rotations failed: {}", n.error().message);
        }
        if (leader && std::chrono::steady_clock::now() >= next_expiry) {
            next_expiry = std::chrono::steady_clock::now() + state_.config.expiry_check_interval;
            if (auto n = state_.expiry->run(vault::now_micros()); !n)
                spdlog::error("expiry warnings failed: {}", n.error().message);
        }
        if (!state_.config.metrics_textfile.empty() && std::chrono::steady_clock::now() >= next_metrics) {
            next_metrics = std::chrono::steady_clock::now() + state_.config.metrics_interval;
            const std::string path = state_.config.path_of(state_.config.metrics_textfile);
            if (auto w = write_metrics_textfile(path, render_metrics(state_, filesystem_)); !w && !textfile_failing_) {
                spdlog::error("metrics textfile: {}", w.error().message);
                textfile_failing_ = true;
            } else if (w) {
                textfile_failing_ = false;
            }
        }
        lock.lock();
    }
}

}  // namespace vaultfs::fs
