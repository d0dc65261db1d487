// uid_quota: per-uid limits on what open files hold in the daemon.
//
// Every open handle is charged to the uid that opened it: one handle, and
// the bytes it buffers (a value being written, a policy being written; a
// reader's handle buffers none -- it keeps ciphertext and decrypts per read).
// A uid at its handle limit gets EMFILE on the next open, a uid at its byte
// limit ENOMEM on the next write; other uids are not affected. That is what
// stops one caller from filling the locked heap (16 MiB by default) that
// every caller's plaintext and keys come from. The limits are
// `max_open_files_per_uid` and `max_buffered_kib_per_uid` in vaultfs.conf.
// All uids together buffer at most `max_total_bytes` (half the locked heap):
// many uids at their limits still leave the other half to readers' transient
// plaintext and to DEKs.
//
// Thread-safety: all methods may be called concurrently; a Charge belongs to
// one handle and is used under that handle's lock.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace vaultfs::fs {

class UidQuota {
public:
    UidQuota(std::size_t max_handles, std::size_t max_bytes, std::size_t max_total_bytes)
        : max_handles_(max_handles), max_bytes_(max_bytes), max_total_bytes_(max_total_bytes)
    {
    }

    // What one handle holds; given back when it is destroyed.
    class Charge {
    public:
        Charge() = default;
        Charge(Charge&& other) noexcept;
        Charge& operator=(Charge&& other) noexcept;
        Charge(const Charge&) = delete;
        Charge& operator=(const Charge&) = delete;
        ~Charge();
        // Charges `more` bytes; false (and nothing charged) past the uid's
        // limit or the total.
        bool grow(std::size_t more);
        uid_t uid() const { return uid_; }

    private:
        friend class UidQuota;
        Charge(UidQuota* quota, uid_t uid) : quota_(quota), uid_(uid) {}
        void release();
        UidQuota* quota_ = nullptr;
        uid_t uid_ = 0;
        std::size_t bytes_ = 0;
    };

    // One more handle for `uid`, or nullopt at its limit.
    std::optional<Charge> open(uid_t uid);

    struct Usage {
        std::size_t handles = 0;
        std::size_t bytes = 0;
    };
    Usage usage(uid_t uid) const;

private:
    const std::size_t max_handles_;
    const std::size_t max_bytes_;
    const std::size_t max_total_bytes_;
    mutable std::mutex mutex_;
    std::size_t total_bytes_ = 0;
    std::unordered_map<uid_t, Usage> used_;
};

}  // namespace vaultfs::fs
