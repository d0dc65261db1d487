#include "vault/audit/log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>

#include "vault/audit/verify.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/store/store.hpp"

namespace vaultfs::vault::audit {

namespace {

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

// Names in coalesced refusals (chosen by whoever repeats them) are cut short.
constexpr std::size_t coalesced_name_bytes = 64;

std::string cut(std::string_view s)
{
    if (s.size() <= coalesced_name_bytes)
        return std::string(s);
    return std::string(s.substr(0, coalesced_name_bytes)) + "...";
}

// The last lines of the file, from its last signed record (if one is found
// within `limit` lines) to its end, and the offset of the first of them.
struct Back {
    std::vector<std::string> lines;
    off_t first_offset = 0;
};

Result<Back> read_back(int fd, off_t end, std::size_t limit)
{
    Back back;
    std::vector<std::string> reversed;
    std::string pending;  // bytes [pos, start of the earliest line taken); ends with '\n'
    off_t pos = end;
    bool done = false;
    while (!done) {
        while (!pending.empty() && !done) {
            const auto k = pending.size() >= 2 ? pending.rfind('\n', pending.size() - 2) : std::string::npos;
            if (k == std::string::npos && pos > 0)
                break;  // the line starts in an earlier chunk
            const std::size_t start = k == std::string::npos ? 0 : k + 1;
            reversed.push_back(pending.substr(start, pending.size() - 1 - start));
            pending.resize(start);
            done = looks_signed(reversed.back()) || reversed.size() > limit;
        }
        if (done || pos == 0)
            break;
        const off_t n = std::min<off_t>(pos, 64 * 1024);
        std::string chunk(static_cast<std::size_t>(n), '\0');
        if (::pread(fd, chunk.data(), chunk.size(), pos - n) != n)
            return fail(Errc::audit_unavailable, std::string("cannot read the audit file: ") + std::strerror(errno));
        pos -= n;
        pending = chunk + pending;
    }
    back.first_offset = pos + static_cast<off_t>(pending.size());
    back.lines.assign(reversed.rbegin(), reversed.rend());
    return back;
}

// The seq of the file's first record (nullopt when it is not a record).
std::optional<std::uint64_t> first_seq(int fd)
{
    std::string buf(64 * 1024, '\0');
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), 0);
    if (n <= 0)
        return std::nullopt;
    buf.resize(static_cast<std::size_t>(n));
    const auto nl = buf.find('\n');
    if (nl == std::string::npos)
        return std::nullopt;
    auto r = parse(std::string_view(buf).substr(0, nl));
    return r ? std::optional<std::uint64_t>(r->seq) : std::nullopt;
}

// 1-based number of the line that starts at `offset`.
std::uint64_t line_number_at(int fd, off_t offset)
{
    std::uint64_t lines = 1;
    std::string buf(1 << 20, '\0');
    for (off_t pos = 0; pos < offset;) {
        const auto n = ::pread(fd, buf.data(), static_cast<std::size_t>(std::min<off_t>(offset - pos, 1 << 20)), pos);
        if (n <= 0)
            return 0;
        lines += static_cast<std::uint64_t>(std::count(buf.data(), buf.data() + n, '\n'));
        pos += n;
    }
    return lines;
}

}  // namespace

struct Log::Fields {
    std::string op;
    std::string vault;
    std::string secret;
    std::optional<std::uint64_t> version;
    std::int64_t uid = 0;
    std::int64_t gid = 0;
    std::int64_t pid = 0;
    std::string exe;
    bool allowed = false;
    std::string rule;
    std::string result;
    std::optional<std::uint64_t> bytes;
    std::string reason;
    std::string attribute;
    std::string from;

    static Fields of(const Event& e)
    {
        Fields f;
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
        f.result = e.result.empty() ? std::string_view("ok") : e.result;
        f.bytes = e.bytes;
        f.reason = e.reason;
        f.attribute = e.attribute;
        f.from = e.from;
        return f;
    }

    // The daemon's own record.
    static Fields daemon(std::string_view op) { return of(Event{.op = op, .allowed = true, .result = "ok"}); }

    std::string body(std::uint64_t seq, Micros time, const std::string& prev, const Extras& extras) const
    {
        Body b;
        b.number("seq", seq)
            .text("time", time_text(time))
            .text("op", op)
            .text("vault", vault)
            .text("secret", secret)
            .number("version", version)
            .integer("uid", uid)
            .integer("gid", gid)
            .integer("pid", pid)
            .text("exe", exe)
            .text("decision", allowed ? "allow" : "deny")
            .text("rule", rule)
            .text("result", result)
            .number("bytes", bytes);
        if (!reason.empty())
            b.text("reason", reason);
        if (!attribute.empty())
            b.text("attribute", attribute);
        if (!from.empty())
            b.text("from", from);
        for (const auto& [key, value] : extras)
            b.value(key, value);
        b.text("prev", prev);
        return std::move(b).finish();
    }
};

Log::Log(Options options, Signer signer, Store* anchor_store)
    : options_(std::move(options)),
      signer_(std::move(signer)),
      anchor_store_(anchor_store),
      coalescer_(static_cast<Micros>(options_.coalesce_window.count()) * 1000000)
{
    if (!options_.clock)
        options_.clock = now_micros;
}

Result<void> Log::create(const std::string& path, const Signer& signer, Bound bound, Store* anchor_store)
{
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return fail(Errc::audit_unavailable, "cannot create " + path + ": " + std::strerror(errno));
    const Micros now = now_micros();
    const std::string body = Fields::daemon("init").body(
        1, now, genesis_hash(),
        {{"records", std::uint64_t{0}}, {"bound_records", bound.records}, {"bound_seconds", bound.seconds}});
    auto sig = signer.keys->sign_digest(signer.key, body_digest(body));
    if (!sig) {
        ::close(fd);
        ::unlink(path.c_str());
        return fail(Errc::audit_unavailable, "cannot sign the first audit record: " + sig.error().message);
    }
    const SealedLine line = seal(body, *sig);
    const std::string text = line.text + "\n";
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok)
        return fail(Errc::audit_unavailable, "cannot write " + path);
    if (anchor_store == nullptr)
        return {};
    AuditAnchor anchor{1, line.hash, true, now, 1, {}};
    auto anchor_sig = signer.keys->sign_digest(signer.key, anchor_digest(anchor));
    if (!anchor_sig)
        return fail(Errc::audit_unavailable, "cannot sign the audit anchor: " + anchor_sig.error().message);
    anchor.sig = std::move(*anchor_sig);
    return anchor_store->write([&](Store::Transaction& tx) { return tx.set_audit_anchor(anchor); });
}

Result<std::unique_ptr<Log>> Log::open(Options options, Signer signer, Store* anchor_store)
{
    if (options.bound.records == 0 || options.bound.seconds == 0 || options.bound.records > max_bound.records ||
        options.bound.seconds > max_bound.seconds)
        return fail(Errc::invalid_argument, "the audit checkpoint bound is out of range");
    std::unique_ptr<Log> log(new Log(std::move(options), std::move(signer), anchor_store));
    if (!log->options_.defer_start)
        if (auto r = log->start({}); !r)
            return tl::unexpected(r.error());
    return log;
}

Result<void> Log::start(Notes notes)
{
    {
        std::lock_guard lock(mutex_);
        if (started_)
            return fail(Errc::invalid_argument, "the audit log is started already");
        if (auto r = start_locked(std::move(notes)); !r)
            return r;
        started_ = true;
    }
    // Anchored at once: from here on the anchor says "running, not clean",
    // so that records added after a clean stop are never mistaken for ours.
    anchor_due_ = true;
    sync_and_anchor(false);
    worker_ = std::thread([this] { background(); });
    return {};
}

// The check of the header comment, then the `start` record.
Result<void> Log::start_locked(Extras extras)
{
    const std::string& path = options_.path;
    fd_ = ::open(path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
    if (fd_ < 0)
        return fail(Errc::audit_unavailable, "cannot open audit file " + path + ": " + std::strerror(errno) +
                                                 "; run `vaultfs init`, or restore the file (an empty file starts a "
                                                 "new segment that records the break)");
    auto pem = public_key_pem(*signer_.keys, signer_.key);
    if (!pem)
        return fail(pem.error().code, "the audit signing key: " + pem.error().message);
    const SignatureVerifier key(*pem);

    std::optional<AuditAnchor> anchor;
    if (anchor_store_ != nullptr) {
        auto a = anchor_store_->audit_anchor();
        if (!a)
            return fail(a.error().code, "cannot read the audit anchor: " + a.error().message);
        anchor = *a;
    }
    const bool anchor_signed = anchor && !anchor->sig.empty() && key.verify(anchor_digest(*anchor), anchor->sig);

    struct stat st{};
    if (::fstat(fd_, &st) != 0)
        return fail(Errc::audit_unavailable, "cannot stat " + path + ": " + std::strerror(errno));
    // A record torn by a crash was never acknowledged: it is dropped, and the
    // start record says how many bytes went.
    off_t complete = st.st_size;
    while (complete > 0) {
        char c = 0;
        if (::pread(fd_, &c, 1, complete - 1) != 1)
            return fail(Errc::audit_unavailable, "cannot read " + path);
        if (c == '\n')
            break;
        --complete;
    }
    if (complete < st.st_size) {
        if (::ftruncate(fd_, complete) != 0)
            return fail(Errc::audit_unavailable, "cannot truncate the torn tail of " + path);
        extras.emplace_back("torn_bytes", static_cast<std::uint64_t>(st.st_size - complete));
        spdlog::warn("audit: dropped a torn last record ({} bytes) left by a crash", st.st_size - complete);
    }
    size_ = complete;

    auto back = read_back(fd_, complete, max_bound.records + 1);
    if (!back)
        return tl::unexpected(back.error());

    std::string broken;           // why the chain is not continued, if it is not
    std::uint64_t break_line = 0;
    std::uint64_t trusted_seq = 0;
    std::string trusted_hash = genesis_hash();
    if (back->lines.empty()) {
        // Emptied, or rotated away while the daemon was down (rotation is
        // done with SIGHUP while it runs): either way the history this file
        // held is not here to check.
        broken = !anchor         ? "the audit file is empty, and the database holds no anchor"
                 : anchor_signed ? "the audit file is empty: emptied, or rotated away while the daemon was down"
                                 : "the audit file is empty, and the database anchor is not signed by the audit key";
        seq_ = anchor ? anchor->seq : 0;
        if (anchor_signed) {
            trusted_seq = anchor->seq;
            trusted_hash = anchor->hash;
        }
    } else {
        VerifyOptions vo;
        vo.anchor = anchor;
        vo.anchor_expected = anchor_store_ != nullptr;
        VerifyReport rep = verify_tail(path, back->lines, 0, *pem, vo);
        auto first = parse(back->lines.front());
        if (first && first->is_signed() && key.verify(body_digest(first->body), first->sig)) {
            trusted_seq = first->seq;
            trusted_hash = first->hash;
        }
        auto last = parse(back->lines.back());
        if (last)
            last_time_ = last->time;
        const auto file_start = first_seq(fd_);
        // (Records appended after a clean shutdown fail verify_tail: only a
        // signed start or rotate may follow a shutdown.)
        if (rep.ok && last && anchor_signed && file_start && anchor->seq >= *file_start &&
                   anchor->file_start != *file_start) {
            broken = "the audit file begins at seq " + std::to_string(*file_start) + ", the anchored file at seq " +
                     std::to_string(anchor->file_start) + ": it was replaced or cut while the daemon was down";
        } else if (!rep.ok || !last) {
            const std::uint64_t first_line = line_number_at(fd_, back->first_offset);
            rep = verify_tail(path, back->lines, first_line, *pem, vo);
            break_line = rep.line;
            broken = rep.ok ? "the last record cannot be read" : rep.problem;
        }
        if (broken.empty()) {
            seq_ = last->seq;
            head_ = last->hash;
            unsigned_ = rep.unsigned_tail;
            file_start_ = file_start.value_or(last->seq);
            // After an unclean stop, what follows both the last signature and
            // the last signed anchor is vouched for by nothing: the daemon
            // may have written it in its last moment, or anyone who can write
            // the file may have chained it since. Named, never covered as
            // this process's own (audit/verify.hpp).
            const bool clean = anchor && anchor->clean_shutdown && anchor->seq == seq_;
            const std::uint64_t proven = std::max(trusted_seq, anchor_signed ? anchor->seq : 0);
            if (!clean && seq_ > proven) {
                extras.emplace_back("unproven_from", proven + 1);
                extras.emplace_back("unproven_through", seq_);
                spdlog::warn("audit: records {} to {} of {} follow the last signature of a daemon that stopped "
                             "uncleanly: unproven until an admin examines them and runs `vaultfs audit acknowledge "
                             "--through {}`",
                             proven + 1, seq_, path, seq_);
            }
        } else {
            seq_ = std::max({trusted_seq + back->lines.size() - 1, last ? last->seq : 0, anchor ? anchor->seq : 0});
        }
    }

    const Micros now = options_.clock();
    if (!broken.empty()) {
        spdlog::error("audit: the chain in {} is broken ({}{}); a new signed segment records the break, and "
                      "`vaultfs audit verify` will report it",
                      path, break_line != 0 ? "line " + std::to_string(break_line) + ": " : std::string(), broken);
        head_ = trusted_hash;
        unsigned_ = 0;
        if (back->lines.empty())
            file_start_ = seq_ + 1;  // the start record is this file's first
        else if (const auto fs = first_seq(fd_))
            file_start_ = *fs;
        extras.emplace_back("break", broken);
        if (break_line != 0)
            extras.emplace_back("break_line", break_line);
        extras.emplace_back("trusted_seq", trusted_seq);
        extras.emplace_back("clean", false);
    } else {
        extras.emplace_back("clean", anchor && anchor->clean_shutdown && anchor->seq == seq_);
    }
    return signed_locked("start", now, std::move(extras));
}

Log::~Log()
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

Log::Stats Log::stats() const
{
    std::lock_guard lock(mutex_);
    return Stats{seq_, coalesced_total_, dropped_total_, low_space_};
}

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
