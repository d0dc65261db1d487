// Log: appending records -- coalescing refusals, the coverage bound's
// checkpoints, the low-space reserve, reopening, the background duties,
// hand-over and close (see log.hpp).
#include "vault/audit/log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "vault/audit/log_fields.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit {

namespace {

// Names in coalesced refusals (chosen by whoever repeats them) are cut short.
constexpr std::size_t coalesced_name_bytes = 64;

std::string cut(std::string_view s)
{
    if (s.size() <= coalesced_name_bytes)
        return std::string(s);
    return std::string(s.substr(0, coalesced_name_bytes)) + "...";
}

}  // namespace

Result<void> Log::append(const Event& event)
{
    Fields f = Fields::of(event);  // outside the lock: exe lookup
    auto r = append_fields(f, event);
    if (r && options_.on_event)
        options_.on_event(event);
    if (anchor_due_)
        sync_and_anchor(false);  // a rotation: the new file's start is anchored at once
    return r;
}

Result<void> Log::append_fields(Fields& f, const Event& event)
{
    std::lock_guard lock(mutex_);
    if (closed_ || !started_)
        return fail(Errc::audit_unavailable, started_ ? "the audit log is closed" : "the audit log is not started");
    if (auto r = reopen_if_needed_locked(); !r)
        return r;
    const Micros now = options_.clock();
    if (!event.allowed) {
        // Every refusal is coalesced (audit/coalescer.hpp): by its names for
        // a caller who holds something where it knocked, by (uid, op,
        // result) alone for one who holds nothing (its names, its own
        // invention, are cut short).
        RefusalCoalescer::Key key{f.uid, f.op, f.result, {}, {}, {}};
        if (event.coalesce) {
            f.vault = cut(f.vault);
            f.secret = cut(f.secret);
        } else {
            key.vault = f.vault.empty() ? "-" : f.vault;
            key.secret = f.secret;
            key.reason = f.reason;
        }
        const auto verdict = coalescer_.admit(key, f.gid, now);
        if (verdict.flush)
            if (auto r = summary_locked(*verdict.flush, now); !r) {
                unwritten_.push_back(*verdict.flush);
                return r;
            }
        if (!verdict.write) {
            ++coalesced_total_;
            return {};
        }
        if (low_on_space_locked(now)) {
            ++dropped_since_signed_;
            ++dropped_total_;
            return {};
        }
    }
    return covered_write_locked(f, now);
}

// An unsigned record, kept within the bound: a checkpoint that is due comes
// first, and must succeed.
Result<void> Log::covered_write_locked(const Fields& f, Micros now)
{
    if (auto r = ensure_covered_locked(now); !r)
        return r;
    if (auto r = write_locked(f, now, false, {}); !r)
        return r;
    if (unsigned_ >= options_.bound.records)
        (void)signed_locked("checkpoint", now);  // if it fails, the next append retries it first
    return {};
}

Result<void> Log::ensure_covered_locked(Micros now)
{
    const bool due = unsigned_ >= options_.bound.records ||
                     (unsigned_ > 0 && now - first_unsigned_ >= static_cast<Micros>(options_.bound.seconds) * 1000000);
    if (!due)
        return {};
    if (auto r = signed_locked("checkpoint", now); !r) {
        spdlog::error("audit: a due checkpoint cannot be signed ({}); refusing operations until it can",
                      r.error().message);
        return r;
    }
    return {};
}

Result<void> Log::signed_locked(std::string_view op, Micros now, Extras extras)
{
    extras.emplace_back("records", unsigned_);
    if (dropped_since_signed_ > 0)
        extras.emplace_back("dropped", dropped_since_signed_);
    extras.emplace_back("bound_records", options_.bound.records);
    extras.emplace_back("bound_seconds", options_.bound.seconds);
    return write_locked(Fields::daemon(op), now, true, extras);
}

Result<void> Log::write_locked(const Fields& f, Micros now, bool signed_record, const Extras& extras)
{
    // Times never go backwards (verify fails a record that does): a clock
    // stepped back leaves records at the last time written until it passes.
    if (now < last_time_) {
        if (last_time_ - now > 1000000 && !clock_behind_)
            spdlog::warn("audit: the clock is {} ms behind the last record's time; records keep that time until "
                         "it catches up",
                         (last_time_ - now) / 1000);
        clock_behind_ = true;
        now = last_time_;
    } else {
        clock_behind_ = false;
    }
    last_time_ = now;
    const std::string body = f.body(seq_ + 1, now, head_, extras);
    std::vector<std::uint8_t> sig;
    if (signed_record) {
        auto s = signer_.keys->sign_digest(signer_.key, body_digest(body));
        if (!s) {
            spdlog::error("audit: cannot sign a {} record: {}", f.op, s.error().message);
            healthy_.store(false);
            return fail(Errc::audit_unavailable, "cannot sign audit record: " + s.error().message);
        }
        sig = std::move(*s);
    }
    const SealedLine line = seal(body, sig);
    if (auto w = write_line_locked(line.text + "\n"); !w)
        return w;
    ++seq_;
    head_ = line.hash;
    dirty_ = true;
    if (options_.on_record)
        options_.on_record(line.text);
    if (signed_record) {
        unsigned_ = 0;
        dropped_since_signed_ = 0;
    } else if (unsigned_++ == 0) {
        first_unsigned_ = now;
    }
    return {};
}

Result<void> Log::summary_locked(const RefusalCoalescer::Summary& s, Micros now)
{
    if (low_on_space_locked(now)) {
        dropped_since_signed_ += s.count;
        dropped_total_ += s.count;
        return {};
    }
    Fields f;
    f.op = "repeats";
    f.uid = s.key.uid;
    f.gid = s.gid;
    f.result = s.key.result;
    if (s.key.vault != "-")
        f.vault = s.key.vault;
    f.secret = s.key.secret;
    if (s.key.vault.empty())
        f.reason = "refusals of a caller who holds nothing, counted, not written one by one";
    else if (s.key.reason.empty() || s.key.reason == "*")
        f.reason = "refusals repeated within the window, counted, not written one by one";
    else
        f.reason = "refusals repeated within the window, counted, not written one by one: " + s.key.reason;
    if (auto r = ensure_covered_locked(now); !r)
        return r;
    if (auto r = write_locked(f, now, false,
                              {{"of", s.key.op},
                               {"count", s.count},
                               {"first", time_text(s.first)},
                               {"last", time_text(s.last)}});
        !r)
        return r;
    if (unsigned_ >= options_.bound.records)
        (void)signed_locked("checkpoint", now);
    return {};
}

Result<void> Log::ready()
{
    std::lock_guard lock(mutex_);
    if (closed_ || !started_)
        return fail(Errc::audit_unavailable, started_ ? "the audit log is closed" : "the audit log is not started");
    if (!healthy_.load())
        return fail(Errc::audit_unavailable, "the audit log " + options_.path + " is failing (see the daemon's log)");
    struct statvfs vfs{};
    // Room for a record and the checkpoint that may have to come first.
    constexpr std::uint64_t room = 64 * 1024;
    if (fd_ >= 0 && ::fstatvfs(fd_, &vfs) == 0 && static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize < room)
        return fail(Errc::audit_unavailable, "the disk of the audit log " + options_.path + " is full");
    return {};
}

bool Log::low_on_space_locked(Micros now)
{
    if (options_.reserve_bytes == 0)
        return false;
    if (space_checked_ != 0 && now - space_checked_ < 250000 && now >= space_checked_)
        return low_space_;
    space_checked_ = now;
    struct statvfs vfs{};
    if (::fstatvfs(fd_, &vfs) != 0)
        return low_space_;
    const bool low = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize < options_.reserve_bytes;
    if (low && !low_space_)
        spdlog::warn("audit: less than {} bytes free for {}; refusals of callers who hold nothing are counted, not "
                     "written, until there is room",
                     options_.reserve_bytes, options_.path);
    else if (!low && low_space_)
        spdlog::info("audit: more than {} bytes are free again for {}; all records are written",
                     options_.reserve_bytes, options_.path);
    low_space_ = low;
    return low_space_;
}

Result<void> Log::write_line_locked(const std::string& line)
{
    const ssize_t n = ::write(fd_, line.data(), line.size());
    if (n != static_cast<ssize_t>(line.size())) {
        const int err = n < 0 ? errno : ENOSPC;
        // Never leave half a record behind: cut back to the last complete one.
        if (n > 0)
            (void)!::ftruncate(fd_, size_);
        if (healthy_.exchange(false))
            spdlog::error("audit: cannot write {}: {}; refusing operations until it is writable", options_.path,
                          std::strerror(err));
        return fail(Errc::audit_unavailable, std::string("audit write failed: ") + std::strerror(err));
    }
    if (options_.sync == AuditSync::always && ::fdatasync(fd_) != 0) {
        const int err = errno;
        (void)!::ftruncate(fd_, size_);
        if (healthy_.exchange(false))
            spdlog::error("audit: cannot sync {}: {}", options_.path, std::strerror(err));
        return fail(Errc::audit_unavailable, std::string("audit sync failed: ") + std::strerror(err));
    }
    size_ += n;
    if (!healthy_.exchange(true))
        spdlog::info("audit: {} is writable again", options_.path);
    return {};
}

// Reopens when asked to (SIGHUP) or when the file was removed under us (its
// records would vanish with it). A failed reopen stays pending, so every
// append fails until one succeeds: records never go to a file that is gone.
Result<void> Log::reopen_if_needed_locked()
{
    struct stat st{};
    bool removed = ::fstat(fd_, &st) == 0 && st.st_nlink == 0;
    // The path may name another file while the old one lives on under
    // another link (moved away, or a hard link kept while the path was
    // replaced): compared, at most every 100 ms, by device and inode. The
    // records go on in the file the path names, as after a rotation, so
    // that nobody can hide them behind a link.
    bool replaced = false;
    const Micros now = options_.clock();
    if (!removed && (identity_checked_ == 0 || now - identity_checked_ >= 100000 || now < identity_checked_)) {
        identity_checked_ = now;
        struct stat at_path{};
        if (::stat(options_.path.c_str(), &at_path) != 0)
            replaced = errno == ENOENT;
        else
            replaced = at_path.st_dev != st.st_dev || at_path.st_ino != st.st_ino;
        if (replaced && !reopen_requested_.load(std::memory_order_relaxed))
            spdlog::warn("audit: {} is no longer the file the daemon writes (moved or replaced without SIGHUP); "
                         "the records go on in the file it names now",
                         options_.path);
    }
    if (removed && !reopen_requested_.load(std::memory_order_relaxed))
        spdlog::error("audit: {} was removed while the daemon ran; a new file records the break", options_.path);
    if (replaced)
        reopen_requested_.store(true, std::memory_order_relaxed);
    if (!removed && !reopen_requested_.load(std::memory_order_relaxed))
        return {};
    if (auto r = reopen_locked(removed); !r)
        return r;
    reopen_requested_.store(false, std::memory_order_relaxed);
    return {};
}

Result<void> Log::reopen_locked(bool removed)
{
    const Micros now = options_.clock();
    // The file being left ends covered by a signature of its own (unless it
    // is gone: then there is nothing left to cover).
    if (unsigned_ > 0 && !removed)
        if (auto r = signed_locked("checkpoint", now); !r)
            return r;
    const int fd = ::open(options_.path.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        healthy_.store(false);
        spdlog::error("audit: cannot reopen {}: {}", options_.path, std::strerror(errno));
        return fail(Errc::audit_unavailable, "cannot reopen the audit file");
    }
    if (::fdatasync(fd_) != 0)
        spdlog::warn("audit: sync of the previous file failed: {}", std::strerror(errno));
    ::close(fd_);
    fd_ = fd;
    struct stat st{};
    ::fstat(fd_, &st);
    size_ = st.st_size;
    space_checked_ = 0;
    spdlog::info("audit: reopened {}", options_.path);
    // The new file starts with a signed record linking it to the old one,
    // anchored at once as the new file's start. A removed file's records
    // are gone: that is a break.
    file_start_ = seq_ + 1;
    anchor_due_ = true;
    Extras extras;
    if (removed) {
        extras.emplace_back("break", std::string("the audit file was removed while the daemon ran"));
        extras.emplace_back("trusted_seq", seq_);
    }
    return signed_locked("rotate", now, std::move(extras));
}

void Log::duties_locked(Micros now)
{
    if (closed_ || !started_)
        return;
    (void)reopen_if_needed_locked();
    write_summaries_locked(coalescer_.drain(now), now);
    (void)ensure_covered_locked(now);
}

// Summaries that cannot be written now are kept and tried again: a count
// of refusals is never lost to a passing audit fault.
void Log::write_summaries_locked(std::vector<RefusalCoalescer::Summary> more, Micros now)
{
    std::vector<RefusalCoalescer::Summary> all = std::move(unwritten_);
    unwritten_.clear();
    all.insert(all.end(), more.begin(), more.end());
    for (const auto& s : all)
        if (!summary_locked(s, now))
            unwritten_.push_back(s);
}

void Log::tick()
{
    {
        std::lock_guard lock(mutex_);
        duties_locked(options_.clock());
    }
    sync_and_anchor(false);
}

Result<void> Log::hand_over(Signer next, const std::string& token)
{
    auto old_pem = public_key_pem(*signer_.keys, signer_.key);
    if (!old_pem)
        return tl::unexpected(old_pem.error());
    auto new_pem = public_key_pem(*next.keys, next.key);
    if (!new_pem)
        return tl::unexpected(new_pem.error());
    {
        std::lock_guard anchor_lock(anchor_mutex_);
        std::lock_guard lock(mutex_);
        const Micros now = options_.clock();
        if (auto r = signed_locked("handover", now, {{"old_key", *old_pem}, {"new_key", *new_pem}, {"token", token}});
            !r)
            return r;
        signer_ = std::move(next);
        if (auto r = signed_locked("checkpoint", now); !r)
            return r;
        anchor_due_ = true;
    }
    sync_and_anchor(false);
    return {};
}

void Log::sync_and_anchor(bool clean)
{
    std::lock_guard anchor_lock(anchor_mutex_);
    AuditAnchor anchor;
    {
        std::lock_guard lock(mutex_);
        if (!dirty_ && !clean)
            return;
        if (::fdatasync(fd_) != 0) {
            spdlog::error("audit: sync of {} failed: {}", options_.path, std::strerror(errno));
            return;
        }
        dirty_ = false;
        anchor = AuditAnchor{seq_, head_, clean, options_.clock(), file_start_, {}};
    }
    if (anchor_store_ == nullptr || (anchor.seq <= anchored_seq_ && !clean && !anchor_due_))
        return;
    anchor_due_ = false;
    auto sig = signer_.keys->sign_digest(signer_.key, anchor_digest(anchor));
    if (!sig) {
        spdlog::error("audit: cannot sign the chain head for the database anchor: {}", sig.error().message);
        return;
    }
    anchor.sig = std::move(*sig);
    auto r = anchor_store_->write([&](Store::Transaction& tx) { return tx.set_audit_anchor(anchor); });
    if (!r) {
        spdlog::error("audit: cannot anchor the chain head in the database: {}", r.error().message);
        return;
    }
    anchored_seq_ = anchor.seq;
}

void Log::background()
{
    const auto period = std::min<std::chrono::milliseconds>(options_.sync_interval, std::chrono::milliseconds(500));
    auto last_sync = std::chrono::steady_clock::now();
    std::unique_lock stop(stop_mutex_);
    while (!stopping_) {
        stop_cv_.wait_for(stop, period);
        if (stopping_)
            break;
        stop.unlock();
        {
            std::lock_guard lock(mutex_);
            duties_locked(options_.clock());
        }
        if (anchor_due_ || std::chrono::steady_clock::now() - last_sync >= options_.sync_interval) {
            sync_and_anchor(false);
            last_sync = std::chrono::steady_clock::now();
        }
        stop.lock();
    }
}

Result<void> Log::acknowledge(std::uint64_t through, std::uint32_t uid)
{
    {
        std::lock_guard lock(mutex_);
        if (closed_ || !started_)
            return fail(Errc::audit_unavailable, "the audit log is not open");
        if (through == 0 || through > seq_)
            return fail(Errc::invalid_argument, "--through " + std::to_string(through) +
                                                    " is not a record of this trail (its last is " +
                                                    std::to_string(seq_) + ")");
        const Micros now = options_.clock();
        if (auto r = signed_locked("acknowledge", now, {{"through", through}, {"uid", std::uint64_t{uid}}}); !r)
            return r;
        anchor_due_ = true;
    }
    sync_and_anchor(false);
    return {};
}

Result<void> Log::close()
{
    {
        std::lock_guard lock(mutex_);
        if (closed_ || !started_)
            return {};
        const Micros now = options_.clock();
        write_summaries_locked(coalescer_.drain(now, true), now);
        // What still could not be written is at least counted in the
        // shutdown record.
        for (const auto& s : unwritten_)
            dropped_since_signed_ += s.count;
        unwritten_.clear();
        if (auto r = signed_locked("shutdown", now); !r)
            return r;
        closed_ = true;
    }
    sync_and_anchor(true);
    return {};
}

}  // namespace vaultfs::vault::audit
