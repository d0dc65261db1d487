#include "vault/audit/log_fields.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <unordered_map>

#include "vault/audit/format.hpp"

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

}  // namespace

Log::Fields Log::Fields::of(const Event& e)
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

Log::Fields Log::Fields::daemon(std::string_view op)
{
    return of(Event{.op = op, .allowed = true, .result = "ok"});
}

std::string Log::Fields::body(std::uint64_t seq, Micros time, const std::string& prev, const Extras& extras) const
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

}  // namespace vaultfs::vault::audit
