#include "fs/cli/monitor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <deque>
#include <thread>

#include "fs/cli/support.hpp"
#include "vault/audit/reader.hpp"
#include "vault/state/config.hpp"
#include "vault/state/state.hpp"

namespace vaultfs::fs {

using nlohmann::json;

namespace {

// Writes all of `text` to `fd`; false on error (errno set).
bool write_all(int fd, std::string_view text)
{
    while (!text.empty()) {
        const ssize_t n = ::write(fd, text.data(), text.size());
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        text.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
}

// Reads records from one file by descriptor, a whole line at a time.
class LineReader {
public:
    explicit LineReader(int fd) : fd_(fd) {}
    ~LineReader()
    {
        if (fd_ >= 0)
            ::close(fd_);
    }
    LineReader(const LineReader&) = delete;
    LineReader& operator=(const LineReader&) = delete;
    // Appends the complete lines read now to `out`; false at EOF with none.
    bool read(std::vector<std::string>& out)
    {
        char buf[65536];
        const ssize_t n = ::read(fd_, buf, sizeof buf);
        if (n <= 0)
            return false;
        offset_ += n;
        partial_.append(buf, static_cast<std::size_t>(n));
        std::size_t start = 0;
        for (std::size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1)
            out.emplace_back(partial_, start, nl - start);
        partial_.erase(0, start);
        return true;
    }
    int fd() const { return fd_; }
    off_t offset() const { return offset_; }
    // Reads on from `at` (the file was cut back): what was read past it is gone.
    void rewind(off_t at)
    {
        ::lseek(fd_, at, SEEK_SET);
        offset_ = at;
        partial_.clear();
    }

private:
    int fd_;
    off_t offset_ = 0;
    std::string partial_;
};

}  // namespace

struct MonitorCommands::Options {
    std::string state;
    std::string socket;
    CLI::App* metrics = nullptr;
    CLI::App* tail = nullptr;
    CLI::App* exporter = nullptr;
    CLI::App* acknowledge = nullptr;
    std::uint64_t through = 0;
    bool follow = false;
    bool as_json = false;
    std::size_t lines = 10;
    std::string since, until;
    std::vector<std::string> vaults, uids, ops;
    std::string output;
    std::string file;  // an audit file instead of the state's
};

MonitorCommands::MonitorCommands(CLI::App& app, CLI::App& audit, const std::string& default_state)
    : o_(std::make_unique<Options>())
{
    auto& o = *o_;
    o.state = default_state;
    const auto state_opt = [&](CLI::App* sub) {
        sub->add_option("--state", o.state, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
    };
    o.metrics = app.add_subcommand("metrics", "Print the daemon's metrics (Prometheus text format)");
    state_opt(o.metrics);
    o.metrics->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");

    o.tail = audit.add_subcommand("tail", "Print the last audit records, filtered; -f follows, across rotations");
    state_opt(o.tail);
    o.tail->add_flag("-f,--follow", o.follow, "Keep printing records as they are written");
    o.tail->add_option("-n,--lines", o.lines, "How many of the last matching records to print first (default 10)");
    o.tail->add_option("--since", o.since,
                       "Records from this time on, rotated files included (2026-12-04T10:00:00Z, 2026-12-04, or 30m, "
                       "2h, 7d ago)");
    o.tail->add_option("--vault", o.vaults, "Only this vault's records (repeatable)");
    o.tail->add_option("--uid", o.uids, "Only this caller's (uid or user name; repeatable)");
    o.tail->add_option("--op", o.ops, "Only this operation (get, commit, list, ...; repeatable)");
    o.tail->add_flag("--json", o.as_json, "Print the records as written (one JSON object per line)");
    o.tail->add_option("--file", o.file, "Read this audit file instead of the state's");

    o.exporter = audit.add_subcommand(
        "export", "Write the records of a time range with the signatures that cover them, for `audit verify --slice`");
    state_opt(o.exporter);
    o.exporter->add_option("--since", o.since, "From this time (as for tail)")->required();
    o.exporter->add_option("--until", o.until, "Up to this time (default: now)");
    o.exporter->add_option("-o,--output", o.output, "File to write (mode 0600; must not exist), or - for stdout")
        ->required();

    o.acknowledge = audit.add_subcommand(
        "acknowledge", "Say that you examined the records an unclean stop left unproven (`audit verify` names them): "
                       "a signed record, after which verify no longer fails on them");
    state_opt(o.acknowledge);
    o.acknowledge->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    o.acknowledge->add_option("--through", o.through, "The last seq you examined (the end of the range verify named)")
        ->required();
}

MonitorCommands::~MonitorCommands() = default;

std::optional<int> MonitorCommands::run(const ManageFn& manage)
{
    auto& o = *o_;
    if (*o.metrics) {
        ControlRequest request;
        request.command = ControlRequest::Command::metrics;
        return manage(o.state, o.socket, request, [](const json& reply) {
            const std::string text = reply.value("result", std::string());
            return write_all(STDOUT_FILENO, text) ? 0 : fail(std::string("stdout: ") + std::strerror(errno));
        });
    }
    if (*o.acknowledge) {
        ControlRequest request;
        request.command = ControlRequest::Command::audit_acknowledge;
        request.through = o.through;
        return manage(o.state, o.socket, request, [&](const json& reply) {
            const auto& r = reply["result"];
            std::printf("acknowledged records through seq %llu (the signed record is seq %llu)\n",
                        static_cast<unsigned long long>(r.value("through", std::uint64_t{0})),
                        static_cast<unsigned long long>(r.value("seq", std::uint64_t{0})));
            return 0;
        });
    }
    if (!*o.tail && !*o.exporter)
        return std::nullopt;

    std::string live = o.file;
    if (live.empty()) {
        auto config = vault::load_config(vault::absolute_path(o.state));
        if (!config)
            return fail(config.error().message);
        live = config->path_of(config->audit_file);
    }
    const vault::Micros now = vault::now_micros();
    vault::audit::Filter filter;
    if (!o.since.empty()) {
        filter.since = vault::audit::parse_when(o.since, now);
        if (!filter.since)
            return fail("--since '" + o.since + "': not a time (2026-12-04T10:00:00Z, 2026-12-04, 30m, 2h, 7d)");
    }
    if (!o.until.empty()) {
        filter.until = vault::audit::parse_when(o.until, now);
        if (!filter.until)
            return fail("--until '" + o.until + "': not a time (2026-12-04T10:00:00Z, 2026-12-04, 30m, 2h, 7d)");
    }

    if (*o.exporter) {
        auto slice = vault::audit::export_slice(vault::audit::trail_files(live), filter.since,
                                                filter.until ? filter.until : std::optional<vault::Micros>(now));
        if (!slice)
            return fail(slice.error().message);
        std::string text;
        for (const auto& l : slice->lines)
            text += l + "\n";
        const bool to_stdout = o.output == "-";
        const int fd =
            to_stdout ? STDOUT_FILENO : ::open(o.output.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 || !write_all(fd, text) || (!to_stdout && (::fsync(fd) != 0 || ::close(fd) != 0)))
            return fail("cannot write " + (to_stdout ? std::string("stdout") : o.output) + ": " + std::strerror(errno));
        std::fprintf(stderr, "exported %llu record(s) of the range, seq %llu to %llu with the signatures around them (%zu "
                             "lines)%s\n",
                     static_cast<unsigned long long>(slice->in_range), static_cast<unsigned long long>(slice->first_seq),
                     static_cast<unsigned long long>(slice->last_seq), slice->lines.size(),
                     to_stdout ? "" : (" to " + o.output).c_str());
        if (slice->uncovered > 0)
            std::fprintf(stderr, "note: the last %llu record(s) of the range are not signed over yet and were left "
                                 "out; the next checkpoint covers them\n",
                         static_cast<unsigned long long>(slice->uncovered));
        std::fprintf(stderr, "check it with: vaultfs audit verify --slice --public-key KEY.pem %s\n",
                     to_stdout ? "FILE" : o.output.c_str());
        return 0;
    }

    // tail
    for (const auto& u : o.uids) {
        uid_t uid = 0;
        const auto [p, ec] = std::from_chars(u.data(), u.data() + u.size(), uid);
        if (ec == std::errc() && p == u.data() + u.size()) {
            filter.uids.push_back(uid);
            continue;
        }
        const passwd* pw = ::getpwnam(u.c_str());
        if (pw == nullptr)
            return fail("--uid " + u + ": no such user");
        filter.uids.push_back(pw->pw_uid);
    }
    filter.vaults = o.vaults;
    filter.ops = o.ops;
    std::string out;
    // Lines that are not intact records (their hash does not match their
    // bytes, or they are not records at all) are never shown, and never
    // passed over in silence either.
    std::size_t skipped = 0;
    const auto skip = [&](const std::string& why) {
        if (skipped++ == 0 || o.follow)
            std::fprintf(stderr, "vaultfs: skipped a line that is not an intact audit record (%s)\n", why.c_str());
    };
    const auto emit = [&](const std::string& line) {
        auto r = vault::audit::parse(line);
        if (!r) {
            skip(r.error());
            return;
        }
        if (!filter.matches(*r))
            return;
        out += o.as_json ? line : vault::audit::human(*r);
        out += '\n';
    };
    const auto flush = [&] {
        const bool ok = write_all(STDOUT_FILENO, out);
        out.clear();
        return ok;
    };

    // What is there: the whole range with --since, else the last N matching.
    const std::vector<std::string> files =
        filter.since ? vault::audit::trail_files(live) : std::vector<std::string>{live};
    std::unique_ptr<LineReader> current;
    struct stat current_st{};
    std::deque<std::string> last;
    for (std::size_t i = 0; i < files.size(); ++i) {
        const int fd = ::open(files[i].c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            if (i + 1 == files.size())
                return fail("cannot read " + files[i] + ": " + std::strerror(errno));
            continue;
        }
        auto reader = std::make_unique<LineReader>(fd);
        std::vector<std::string> got;
        while (reader->read(got)) {
            for (auto& line : got) {
                if (filter.since) {
                    emit(line);
                } else {
                    auto r = vault::audit::parse(line);
                    if (!r)
                        skip(r.error());
                    if (r && filter.matches(*r)) {
                        last.push_back(std::move(line));
                        if (last.size() > o.lines)
                            last.pop_front();
                    }
                }
            }
            got.clear();
            if (!flush())
                return 0;  // the reader went away (a pipe closed)
        }
        if (i + 1 == files.size()) {
            ::fstat(fd, &current_st);
            current = std::move(reader);
        }
    }
    for (const auto& line : last)
        emit(line);
    if (skipped > 0 && !o.follow)
        std::fprintf(stderr,
                     "vaultfs: %zu line(s) skipped: not intact audit records (tampered with, or not records); "
                     "`vaultfs audit verify` names the first\n",
                     skipped);
    if (!flush() || !o.follow)
        return skipped > 0 ? 1 : 0;

    // Follow: new lines of the file. When the path is another file (rotated),
    // the old one is read too until the new one has a record: the daemon
    // ends the old file (its checkpoint) before it starts the new one.
    std::unique_ptr<LineReader> previous;
    while (true) {
        std::vector<std::string> got;
        bool any = false;
        bool current_any = false;
        for (LineReader* reader : {previous.get(), current.get()}) {
            if (reader == nullptr)
                continue;
            while (reader->read(got)) {
                any = true;
                current_any = current_any || reader == current.get();
                for (const auto& line : got)
                    emit(line);
                got.clear();
            }
        }
        if (previous && current_any)
            previous.reset();
        if (!flush())
            return 0;
        if (any)
            continue;
        struct stat now_st{};
        if (::stat(live.c_str(), &now_st) == 0 &&
            (now_st.st_ino != current_st.st_ino || now_st.st_dev != current_st.st_dev)) {
            const int fd = ::open(live.c_str(), O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                ::fstat(fd, &current_st);
                previous = std::move(current);
                current = std::make_unique<LineReader>(fd);
                continue;
            }
        } else if (struct stat open_st{}; ::fstat(current->fd(), &open_st) == 0 && open_st.st_size < current->offset()) {
            // Cut back (a torn tail truncated at start): read on from there.
            current->rewind(open_st.st_size);
        }
        pollfd p{STDOUT_FILENO, 0, 0};
        if (::poll(&p, 1, 200) > 0 && (p.revents & (POLLERR | POLLHUP)) != 0)
            return 0;  // whoever reads us has gone
    }
}

Health health_of(const json& r)
{
    const auto text = [&](const char* key) { return r.value(key, std::string("?")); };
    const auto number = [&](const char* key) { return r.value(key, std::int64_t{-1}); };
    Health h;
    std::vector<std::string> critical, warning;
    if (text("token") != "ok")
        critical.push_back("token " + text("token"));
    if (text("audit") != "ok")
        critical.push_back("audit " + text("audit"));
    if (text("store_fresh") != "ok")
        critical.push_back("store " + text("store_fresh"));
    if (r.value("audit_disk_below_reserve", false))
        warning.push_back("the audit disk is below its reserve");
    if (r.contains("keks_to_rekey") && r["keks_to_rekey"].is_array() && !r["keks_to_rekey"].empty()) {
        std::string vaults;
        for (const auto& f : r["keks_to_rekey"])
            vaults += (vaults.empty() ? "" : " ") + f.value("vault", std::string("?"));
        warning.push_back("KEKs to replace (vaultfs vault rekey VAULT): " + vaults);
    }
    const auto expired = number("expired");
    const auto soon = number("expiring_soon");
    const auto lead = number("expiry_lead_days");
    if (expired > 0)
        warning.push_back(std::to_string(expired) + " expired");
    if (soon > 0)
        warning.push_back(std::to_string(soon) + " expiring within " + std::to_string(lead) + " days");
    std::string feed;
    if (r.contains("feed_staleness_ms")) {
        const auto age = number("feed_staleness_ms");
        feed = ", feed " + std::to_string(age) + " ms";
        if (age * 2 > number("staleness_bound_ms"))
            warning.push_back("the change feed is " + std::to_string(age) + " ms behind (bound " +
                              std::to_string(number("staleness_bound_ms")) + " ms)");
    }
    h.code = !critical.empty() ? 2 : !warning.empty() ? 1 : 0;
    const char* verdict[] = {"OK", "WARNING", "CRITICAL"};
    h.line = std::string("vaultfs ") + verdict[h.code] + ": ";
    if (h.code == 0) {
        h.line += "token ok, audit ok, store ok" + feed + ", " + std::to_string(std::max<std::int64_t>(soon, 0)) +
                  " expiring within " + std::to_string(lead) + " days";
    } else {
        std::vector<std::string> all = critical;
        all.insert(all.end(), warning.begin(), warning.end());
        for (std::size_t i = 0; i < all.size(); ++i)
            h.line += (i ? "; " : "") + all[i];
    }
    return h;
}

}  // namespace vaultfs::fs
