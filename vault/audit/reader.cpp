#include "vault/audit/reader.hpp"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <fstream>

namespace vaultfs::vault::audit {

namespace {

std::optional<std::uint64_t> first_seq(const std::string& path)
{
    std::ifstream in(path);
    std::string line;
    if (!std::getline(in, line))
        return std::nullopt;
    auto r = parse(line);
    if (!r)
        return std::nullopt;
    return r->seq;
}

std::string field(const Record& r, const char* key)
{
    const auto it = r.fields.find(key);
    if (it == r.fields.end() || it->is_null())
        return {};
    return it->is_string() ? it->get<std::string>() : it->dump();
}

}  // namespace

std::vector<std::string> trail_files(const std::string& live)
{
    namespace fsys = std::filesystem;
    const fsys::path p(live);
    const std::string base = p.filename().string();
    std::vector<std::pair<std::uint64_t, std::string>> rotated;
    std::error_code ec;
    for (const auto& entry : fsys::directory_iterator(p.parent_path(), ec)) {
        const std::string name = entry.path().filename().string();
        if (name.size() <= base.size() + 1 || name.compare(0, base.size(), base) != 0 ||
            (name[base.size()] != '.' && name[base.size()] != '-') || name.ends_with(".gz") ||
            name.ends_with(".xz") || name.ends_with(".zst") || !entry.is_regular_file(ec))
            continue;
        if (const auto seq = first_seq(entry.path().string()))
            rotated.emplace_back(*seq, entry.path().string());
    }
    std::sort(rotated.begin(), rotated.end());
    std::vector<std::string> files;
    for (auto& [seq, path] : rotated)
        files.push_back(std::move(path));
    files.push_back(live);
    return files;
}

bool Filter::matches(const Record& r) const
{
    if (since && r.time < *since)
        return false;
    if (until && r.time > *until)
        return false;
    if (!vaults.empty() && std::find(vaults.begin(), vaults.end(), field(r, "vault")) == vaults.end())
        return false;
    if (!ops.empty() && std::find(ops.begin(), ops.end(), r.op) == ops.end())
        return false;
    if (!uids.empty()) {
        const auto it = r.fields.find("uid");
        if (it == r.fields.end() || !it->is_number_integer() ||
            std::find(uids.begin(), uids.end(), static_cast<uid_t>(it->get<std::int64_t>())) == uids.end())
            return false;
    }
    return true;
}

std::string human(const Record& r)
{
    std::string out = time_text(r.time) + " #" + std::to_string(r.seq) + " " + r.op;
    const std::string decision = field(r, "decision");
    const std::string result = field(r, "result");
    if (!decision.empty())
        out += " " + decision;
    if (!result.empty())
        out += " " + result;
    const std::string uid = field(r, "uid");
    if (!uid.empty() && uid != "-1")
        out += " uid=" + uid;
    const std::string pid = field(r, "pid");
    if (!pid.empty() && pid != "0" && pid != "-1")
        out += " pid=" + pid;
    const std::string vault = field(r, "vault");
    const std::string secret = field(r, "secret");
    if (!vault.empty()) {
        out += " " + vault;
        if (!secret.empty())
            out += "/" + secret;
        const std::string version = field(r, "version");
        if (!version.empty())
            out += "@" + version;
    }
    const std::string rule = field(r, "rule");
    if (!rule.empty())
        out += " rule=\"" + rule + "\"";
    const std::string reason = field(r, "reason");
    if (!reason.empty())
        out += " (" + reason + ")";
    if (r.is_signed())
        out += " [signed]";
    return out;
}

Result<Slice> export_slice(const std::vector<std::string>& files, std::optional<Micros> since,
                           std::optional<Micros> until)
{
    std::vector<std::string> lines;
    std::vector<Record> records;
    for (const auto& file : files) {
        std::ifstream in(file);
        if (!in)
            return fail(Errc::storage, "cannot read " + file);
        std::string line;
        while (std::getline(in, line)) {
            if (in.eof())
                break;  // a torn last line, being written
            auto r = parse(line);
            if (!r)
                return fail(Errc::invalid_argument, file + ": " + r.error() + " (run `vaultfs audit verify`)");
            records.push_back(std::move(*r));
            lines.push_back(std::move(line));
        }
    }
    std::optional<std::size_t> first, last;
    for (std::size_t i = 0; i < records.size(); ++i) {
        const Micros t = records[i].time;
        if ((since && t < *since) || (until && t > *until))
            continue;
        if (!first)
            first = i;
        last = i;
    }
    if (!first)
        return fail(Errc::not_found, "no audit records in that time range");
    Slice slice;
    std::size_t start = *first;
    while (start > 0 && !records[start].is_signed())
        --start;
    if (!records[start].is_signed())
        return fail(Errc::invalid_argument, "no signed record before the range: the trail does not begin with its "
                                            "init record (run `vaultfs audit verify`)");
    std::size_t end = *last;
    while (end < records.size() && !records[end].is_signed())
        ++end;
    if (end == records.size()) {
        // Not covered yet: stop at the last signature within the range.
        end = *last;
        while (end > start && !records[end].is_signed())
            --end;
    }
    for (std::size_t i = *first; i <= *last; ++i) {
        if (i > end)
            ++slice.uncovered;
        else
            ++slice.in_range;
    }
    if (slice.in_range == 0)
        return fail(Errc::not_found, "no signature covers those records yet; try again after the next checkpoint");
    for (std::size_t i = start; i <= end; ++i)
        slice.lines.push_back(std::move(lines[i]));
    slice.first_seq = records[start].seq;
    slice.last_seq = records[end].seq;
    return slice;
}

std::optional<Micros> parse_when(const std::string& text, Micros now)
{
    if (auto t = parse_time(text))
        return t;
    // 2026-12-04T10:00:00Z
    if (text.size() == 20 && text[10] == 'T' && text[19] == 'Z')
        return parse_time(text.substr(0, 19) + ".000000Z");
    // 2026-12-04
    if (text.size() == 10 && text[4] == '-' && text[7] == '-')
        return parse_time(text + "T00:00:00.000000Z");
    // 30s, 10m, 2h, 7d ago
    if (text.size() >= 2) {
        std::int64_t n = 0;
        const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size() - 1, n);
        if (ec == std::errc() && p == text.data() + text.size() - 1 && n >= 0) {
            const char unit = text.back();
            const std::int64_t s = unit == 's' ? 1 : unit == 'm' ? 60 : unit == 'h' ? 3600 : unit == 'd' ? 86400 : 0;
            if (s != 0)
                return now - n * s * 1000000;
        }
    }
    return std::nullopt;
}

}  // namespace vaultfs::vault::audit
