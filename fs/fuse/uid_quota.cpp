#include "fs/fuse/uid_quota.hpp"

#include <utility>

namespace vaultfs::fs {

std::optional<UidQuota::Charge> UidQuota::open(uid_t uid)
{
    std::lock_guard lock(mutex_);
    Usage& u = used_[uid];
    if (u.handles >= max_handles_)
        return std::nullopt;
    ++u.handles;
    return Charge(this, uid);
}

UidQuota::Usage UidQuota::usage(uid_t uid) const
{
    std::lock_guard lock(mutex_);
    const auto it = used_.find(uid);
    return it == used_.end() ? Usage{} : it->second;
}

bool UidQuota::Charge::grow(std::size_t more)
{
    if (quota_ == nullptr || more == 0)
        return true;
    std::lock_guard lock(quota_->mutex_);
    Usage& u = quota_->used_[uid_];
    if (u.bytes + more > quota_->max_bytes_ || quota_->total_bytes_ + more > quota_->max_total_bytes_)
        return false;
    u.bytes += more;
    quota_->total_bytes_ += more;
    bytes_ += more;
    return true;
}

void UidQuota::Charge::release()
{
    if (quota_ == nullptr)
        return;
    std::lock_guard lock(quota_->mutex_);
    const auto it = quota_->used_.find(uid_);
    quota_->total_bytes_ -= bytes_;
    if (it != quota_->used_.end()) {
        it->second.bytes -= bytes_;
        if (--it->second.handles == 0)
            quota_->used_.erase(it);
    }
    quota_ = nullptr;
}

UidQuota::Charge::Charge(Charge&& other) noexcept
    : quota_(std::exchange(other.quota_, nullptr)), uid_(other.uid_), bytes_(std::exchange(other.bytes_, 0))
{
}

UidQuota::Charge& UidQuota::Charge::operator=(Charge&& other) noexcept
{
    if (this != &other) {
        release();
        quota_ = std::exchange(other.quota_, nullptr);
        uid_ = other.uid_;
        bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
}

UidQuota::Charge::~Charge() { release(); }

}  // namespace vaultfs::fs
