#include "vault/audit.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <unordered_map>
#include <variant>

#include <nlohmann/json.hpp>

#include "vault/audit_format.hpp"
#include "vault/store.hpp"

namespace vaultfs::vault {

namespace {

using json = nlohmann::json;

std::string read_exe(pid_t pid)
{
    char link[64];
    std::snprintf(link, sizeof link, "/proc/%d/exe", static_cast<int>(pid));
    char target[4096];
    const ssize_t n = ::readlink(link, target, sizeof target - 1);
    return n > 0 ? std::string(target, static_cast<std::size_t>(n)) : std::string();
}

// `exe` is best effort (the process may be gone, or exec something else);
// a pid's answer is reused for a second, from a table of at most 1024.
std::string exe_of(pid_t pid)
{
    if (pid <= 0)
        return {};
    struct Seen {
        std::string exe;
        std::chrono::steady_clock::time_point at;
    };
    static std::mutex mutex;
    static std::unordered_map<pid_t, Seen> seen;
    const auto now = std::chrono::steady_clock::now();
    {
        std::lock_guard lock(mutex);
        if (const auto it = seen.find(pid); it != seen.end() && now - it->second.at < std::chrono::seconds(1))
            return it->second.exe;
    }
    std::string exe = read_exe(pid);
    std::lock_guard lock(mutex);
    if (seen.size() >= 1024)
        seen.clear();
    seen[pid] = Seen{exe, now};
    return exe;
}

// The fields of `event`, but for the time, which is taken under the lock
// so that times follow the sequence.
RecordFields fields_of(const AuditEvent& e)
{
    RecordFields f;
    f.op = e.op;
    f.vault = e.vault;
    f.secret = e.secret;
    f.version = e.version;
    if (e.caller != nullptr) {
        f.uid = e.caller->who.uid;
        f.gid = e.caller->who.gid;
        f.pid = e.caller->pid;
        f.exe = exe_of(e.caller->pid);
    } else {
        f.uid = ::geteuid();
        f.gid = ::getegid();
        f.pid = ::getpid();
        f.exe = "vaultfs";
    }
    f.allowed = e.allowed;
    f.rule = e.rule;
    f.result = e.result;
    f.bytes = e.bytes;
    f.reason = e.reason;
    f.attribute = e.attribute;
    return f;
}

// Reads the last complete line of the file and the offset where complete
// lines end (anything after it is a torn record).
struct Tail {
    std::string last_line;
    off_t complete_size = 0;
    off_t file_size = 0;
};

Result<Tail> read_tail(int fd)
{
    struct stat st{};
    if (::fstat(fd, &st) != 0)
        return fail(Errc::audit_unavailable, std::string("cannot stat the audit file: ") + std::strerror(errno));
    Tail t;
    t.file_size = st.st_size;
    // Records are well under 8 KiB; read enough to hold the last two lines.
    const off_t window = std::min<off_t>(st.st_size, 64 * 1024);
    std::string buf(static_cast<std::size_t>(window), '\0');
    if (window > 0 && ::pread(fd, buf.data(), buf.size(), st.st_size - window) != window)
        return fail(Errc::audit_unavailable, "cannot read the audit file's tail");
    const auto last_nl = buf.rfind('\n');
    if (last_nl == std::string::npos) {
        t.complete_size = st.st_size - window;
        if (t.complete_size != 0)
            return fail(Errc::audit_unavailable, "audit file's last 64 KiB hold no complete record");
        return t;
    }
    t.complete_size = st.st_size - window + static_cast<off_t>(last_nl) + 1;
    const auto prev_nl = last_nl == 0 ? std::string::npos : buf.rfind('\n', last_nl - 1);
    const std::size_t start = prev_nl == std::string::npos ? 0 : prev_nl + 1;
    t.last_line = buf.substr(start, last_nl - start);
    return t;
}

}  // namespace

AuditLog::AuditLog(Options options, AuditSigner signer, Store* anchor_store)
    : options_(std::move(options)), signer_(std::move(signer)), anchor_store_(anchor_store)
{
}

Result<void> AuditLog::create(const std::string& path, const AuditSigner& signer)
{
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return fail(Errc::audit_unavailable, "cannot create " + path + ": " + std::strerror(errno));
    RecordFields init = fields_of(AuditEvent{.op = "init", .allowed = true, .result = "ok"});
    init.time = audit_time(now_micros());
    json r = to_json(init);
    r["seq"] = 1;
    r["prev"] = genesis_hash();
    auto sealed = seal_record(
        r, [&](std::span<const std::uint8_t, 32> d) { return signer.keys->sign_digest(signer.key, d); });
    if (!sealed) {
        ::close(fd);
        ::unlink(path.c_str());
        return fail(Errc::audit_unavailable, "cannot sign the first audit record: " + sealed.error());
    }
    const std::string text = sealed->line + "\n";
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok)
        return fail(Errc::audit_unavailable, "cannot write " + path);
    return {};
}

Result<std::unique_ptr<AuditLog>> AuditLog::open(Options options, AuditSigner signer, Store* anchor_store)
{
    std::unique_ptr<AuditLog> log(new AuditLog(std::move(options), std::move(signer), anchor_store));
    std::lock_guard lock(log->mutex_);
    log->fd_ = ::open(log->options_.path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
    if (log->fd_ < 0)
        return fail(Errc::audit_unavailable, "cannot open audit file " + log->options_.path + ": " +
                                                 std::strerror(errno) + "; run `vaultfs init` or restore the file");
    auto tail = read_tail(log->fd_);
    if (!tail)
        return fail(tail.error().code, log->options_.path + ": " + tail.error().message);

    ExtraFields extra;
    std::optional<AuditAnchor> anchor;
    if (anchor_store != nullptr) {
        if (auto a = anchor_store->audit_anchor(); a && *a)
            anchor = **a;
    }
    if (tail->complete_size < tail->file_size) {
        // A record torn by a crash: never acknowledged, so dropped; the
        // start record says how many bytes went.
        if (::ftruncate(log->fd_, tail->complete_size) != 0)
            return fail(Errc::audit_unavailable, "cannot truncate the torn tail of " + log->options_.path);
        extra.emplace_back("torn_bytes", static_cast<std::int64_t>(tail->file_size - tail->complete_size));
        spdlog::warn("audit: dropped a torn last record ({} bytes) left by a crash",
                     tail->file_size - tail->complete_size);
    }
    log->size_ = tail->complete_size;

    bool file_is_new = tail->last_line.empty();
    if (!file_is_new) {
        const auto last = json::parse(tail->last_line, nullptr, false);
        if (last.is_discarded() || !last.contains("seq") || !last.contains("hash") || !last["seq"].is_number_unsigned() ||
            !last["hash"].is_string())
            return fail(Errc::audit_unavailable, "the last record of " + log->options_.path +
                                                     " is not a vaultfs audit record; run `vaultfs audit verify`");
        log->seq_ = last["seq"].get<std::uint64_t>();
        log->head_ = last["hash"].get<std::string>();
        extra.emplace_back("clean", anchor && anchor->clean_shutdown && anchor->seq == log->seq_);
    } else if (anchor) {
        // An empty file: rotated away while we were down. Continue the chain
        // from the anchored head.
        log->seq_ = anchor->seq;
        log->head_ = anchor->hash;
        extra.emplace_back("clean", anchor->clean_shutdown);
    } else {
        return fail(Errc::audit_unavailable, "audit file " + log->options_.path + " is empty and the database holds no "
                                                 "anchor to continue the chain from");
    }
    const AuditEvent start{.op = file_is_new ? "rotate" : "start", .allowed = true, .result = "ok"};
    if (auto r = log->append_locked(start, true, extra); !r)
        return tl::unexpected(r.error());
    log->last_checkpoint_ = std::chrono::steady_clock::now();
    log->worker_ = std::thread([raw = log.get()] { raw->background(); });
    return log;
}

AuditLog::~AuditLog()
{
    {
        std::lock_guard lock(stop_mutex_);
        stopping_ = true;
    }
    stop_cv_.notify_all();
    if (worker_.joinable())
        worker_.join();
    if (fd_ >= 0)
        ::close(fd_);
}

std::uint64_t AuditLog::last_seq() const
{
    std::lock_guard lock(mutex_);
    return seq_;
}

Result<void> AuditLog::append(const AuditEvent& event)
{
    RecordFields fields = fields_of(event);  // outside the lock: exe lookup
    std::lock_guard lock(mutex_);
    if (auto r = reopen_if_needed_locked(); !r)
        return r;
    fields.time = audit_time(now_micros());
    if (auto fast = render_fast(fields, seq_ + 1, head_)) {
        if (auto w = write_line_locked(fast->line + "\n"); !w)
            return w;
        ++seq_;
        head_ = std::move(fast->hash);
        dirty_ = true;
    } else if (auto r = append_fields_locked(std::move(fields), false, {}); !r) {
        return r;
    }
    if (++since_checkpoint_ >= options_.checkpoint_records)
        (void)checkpoint_locked();
    return {};
}

Result<void> AuditLog::append_locked(const AuditEvent& event, bool signed_record, const ExtraFields& extra)
{
    RecordFields fields = fields_of(event);
    fields.time = audit_time(now_micros());
    return append_fields_locked(std::move(fields), signed_record, extra);
}

Result<void> AuditLog::append_fields_locked(RecordFields fields, bool signed_record, const ExtraFields& extra)
{
    json r = to_json(fields);
    for (const auto& [key, value] : extra)
        std::visit([&, &key = key](const auto& v) { r[key] = v; }, value);
    r["seq"] = seq_ + 1;
    r["prev"] = head_;
    SignDigest sign;
    if (signed_record)
        sign = [&](std::span<const std::uint8_t, 32> d) { return signer_.keys->sign_digest(signer_.key, d); };
    auto sealed = seal_record(r, sign);
    if (!sealed) {
        spdlog::error("audit: cannot sign a {} record: {}", fields.op, sealed.error());
        return fail(Errc::audit_unavailable, "cannot sign audit record: " + sealed.error());
    }
    if (auto w = write_line_locked(sealed->line + "\n"); !w)
        return w;
    ++seq_;
    head_ = std::move(sealed->hash);
    dirty_ = true;
    return {};
}

Result<void> AuditLog::write_line_locked(const std::string& line)
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
Result<void> AuditLog::reopen_if_needed_locked()
{
    struct stat st{};
    if (::fstat(fd_, &st) == 0 && st.st_nlink == 0 && !reopen_requested_.load(std::memory_order_relaxed)) {
        spdlog::error("audit: {} was removed; reopening it", options_.path);
        reopen_requested_.store(true, std::memory_order_relaxed);
    }
    if (!reopen_requested_.load(std::memory_order_relaxed))
        return {};
    if (auto r = reopen_locked(); !r)
        return r;
    reopen_requested_.store(false, std::memory_order_relaxed);
    return {};
}

Result<void> AuditLog::reopen_locked()
{
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
    spdlog::info("audit: reopened {}", options_.path);
    // The new file starts with a signed record linking it to the old one.
    return append_locked(AuditEvent{.op = "rotate", .allowed = true, .result = "ok"}, true, {});
}

Result<void> AuditLog::checkpoint_locked()
{
    auto r = append_locked(AuditEvent{.op = "checkpoint", .allowed = true, .result = "ok"}, true,
                           {{"records", static_cast<std::int64_t>(since_checkpoint_)}});
    if (r) {
        since_checkpoint_ = 0;
        last_checkpoint_ = std::chrono::steady_clock::now();
    }
    return r;
}

void AuditLog::sync_and_anchor(bool clean)
{
    std::uint64_t seq = 0;
    std::string head;
    {
        std::lock_guard lock(mutex_);
        if (!dirty_ && !clean)
            return;
        if (::fdatasync(fd_) != 0) {
            spdlog::error("audit: sync of {} failed: {}", options_.path, std::strerror(errno));
            return;
        }
        dirty_ = false;
        seq = seq_;
        head = head_;
    }
    if (anchor_store_ == nullptr)
        return;
    auto r = anchor_store_->write([&](Store::Transaction& tx) {
        return tx.set_audit_anchor(AuditAnchor{seq, head, clean});
    });
    if (!r)
        spdlog::error("audit: cannot anchor the chain head in the database: {}", r.error().message);
}

void AuditLog::background()
{
    std::unique_lock stop(stop_mutex_);
    while (!stopping_) {
        stop_cv_.wait_for(stop, options_.sync_interval);
        if (stopping_)
            break;
        stop.unlock();
        {
            std::lock_guard lock(mutex_);
            (void)reopen_if_needed_locked();
            if (since_checkpoint_ > 0 &&
                std::chrono::steady_clock::now() - last_checkpoint_ >= options_.checkpoint_interval)
                (void)checkpoint_locked();
        }
        sync_and_anchor(false);
        stop.lock();
    }
}

Result<void> AuditLog::close()
{
    {
        std::lock_guard lock(mutex_);
        if (auto r = append_locked(AuditEvent{.op = "shutdown", .allowed = true, .result = "ok"}, true,
                                   {{"records", static_cast<std::int64_t>(since_checkpoint_)}});
            !r)
            return r;
        since_checkpoint_ = 0;
    }
    sync_and_anchor(true);
    return {};
}

}  // namespace vaultfs::vault
