#include "vault/audit/log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "vault/audit/log_fields.hpp"
#include "vault/audit/verify.hpp"

namespace vaultfs::vault::audit {

namespace {

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

}  // namespace vaultfs::vault::audit
