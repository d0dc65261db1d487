#include "vault/monitor/metrics.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdio>

#include "vault/audit/log.hpp"

namespace vaultfs::vault::monitor {

namespace {

// The daemon's own rule names (docs/audit.md "The audit trail").
constexpr std::array<std::string_view, 9> own_rules{"default-deny",   "not-admin",     "holds-nothing",
                                                    "per-uid-limit",  "fail-closed",   "invalid-name",
                                                    "retention-ended", "permission-bits-only", "rotation-policy"};

// The shortest text that reads back as `v` (0.00025, not 0.00025000000000000001).
std::string number(double v)
{
    char buf[64];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
    return ec == std::errc() ? std::string(buf, end) : std::string("NaN");
}

class Text {
public:
    void family(std::string_view name, std::string_view type, std::string_view help)
    {
        out_ += "# HELP ";
        out_ += name;
        out_ += ' ';
        out_ += help;
        out_ += "\n# TYPE ";
        out_ += name;
        out_ += ' ';
        out_ += type;
        out_ += '\n';
    }
    // labels: name="value" pairs, values unescaped
    void sample(std::string_view name, std::initializer_list<std::pair<std::string_view, std::string_view>> labels,
                double value)
    {
        out_ += name;
        if (labels.size() > 0) {
            out_ += '{';
            bool first = true;
            for (const auto& [k, v] : labels) {
                if (!first)
                    out_ += ',';
                first = false;
                out_ += k;
                out_ += "=\"";
                out_ += label_value(v);
                out_ += '"';
            }
            out_ += '}';
        }
        out_ += ' ';
        out_ += number(value);
        out_ += '\n';
    }
    void one(std::string_view name, std::string_view type, std::string_view help, double value)
    {
        family(name, type, help);
        sample(name, {}, value);
    }
    std::string take() { return std::move(out_); }

private:
    std::string out_;
};

}  // namespace

std::string denial_reason(std::string_view rule)
{
    if (std::find(own_rules.begin(), own_rules.end(), rule) != own_rules.end())
        return std::string(rule);
    // A policy line as the audit names it: "3: deny uid:7 get".
    if (const auto colon = rule.find(": "); colon != std::string_view::npos && colon > 0 &&
                                            rule.find_first_not_of("0123456789") == colon)
        rule.remove_prefix(colon + 2);
    if (rule.starts_with("deny"))
        return "deny-rule";
    // An allow line without the permission, or the permission a refusal names.
    if (rule.starts_with("allow") || rule.starts_with("needs ") || rule.find(" or ") != std::string_view::npos)
        return "missing-permission";
    return rule.empty() ? "unknown" : "other";
}

std::string_view kind_name(Expiring::Kind kind)
{
    switch (kind) {
    case Expiring::Kind::secret:
        return "secret";
    case Expiring::Kind::key:
        return "key";
    case Expiring::Kind::certificate:
        return "certificate";
    }
    return "secret";
}

ExpiryCounts count_expiring(const std::vector<Expiring>& items, Micros now, Micros lead)
{
    ExpiryCounts c;
    for (const auto& e : items) {
        if (e.expires <= now)
            ++c.expired;
        else if (e.expires - now <= lead)
            ++c.soon;
    }
    return c;
}

std::string label_value(std::string_view v)
{
    std::string out;
    out.reserve(v.size());
    for (const char c : v) {
        if (c == '\\')
            out += "\\\\";
        else if (c == '"')
            out += "\\\"";
        else if (c == '\n')
            out += "\\n";
        else
            out += c;
    }
    return out;
}

void Metrics::count(const audit::Event& event)
{
    const std::string_view op = event.op;
    const std::string result(event.result.empty() ? (event.allowed ? "ok" : "EACCES") : event.result);
    std::lock_guard lock(mutex_);
    if (op == "get" || op == "cert_get" || op == "key_get" || op == "set") {
        ++opens_[{std::string(event.vault), op == "set" ? "write" : "read", result}];
        if (op != "set" && result == "ok" && event.bytes)
            read_bytes_[std::string(event.vault)] += *event.bytes;
    } else if (op == "commit") {
        ++writes_[{std::string(event.vault), result}];
    }
    if (!event.allowed && result != "ok")
        ++denials_[denial_reason(event.rule)];
}

void Metrics::count_expiry_event(std::string_view kind, std::string_view event)
{
    std::lock_guard lock(mutex_);
    ++expiry_events_[{std::string(kind), std::string(event)}];
}

std::string Metrics::render(const Gauges& g) const
{
    Text t;
    t.one("vaultfs_up", "gauge", "1 while the daemon serves.", 1);
    t.one("vaultfs_token_up", "gauge", "1 while the PKCS#11 token answers.", g.token_up ? 1 : 0);
    t.one("vaultfs_audit_up", "gauge", "1 while audit records can be written (0: operations fail closed).",
          g.audit_up ? 1 : 0);
    t.one("vaultfs_store_up", "gauge", "1 while the store serves reads (a shared store: confirmed fresh).",
          g.store_up ? 1 : 0);
    {
        std::lock_guard lock(mutex_);
        t.family("vaultfs_opens_total", "counter",
                 "Opens of secrets, keys and certificates (mode read or write), by vault and result; a read's "
                 "value is decrypted and audited at its open.");
        for (const auto& [k, n] : opens_)
            t.sample("vaultfs_opens_total",
                     {{"vault", std::get<0>(k)}, {"mode", std::get<1>(k)}, {"result", std::get<2>(k)}},
                     static_cast<double>(n));
        t.family("vaultfs_read_bytes_total", "counter", "Plaintext bytes served by opens for reading, by vault.");
        for (const auto& [v, n] : read_bytes_)
            t.sample("vaultfs_read_bytes_total", {{"vault", v}}, static_cast<double>(n));
        t.family("vaultfs_writes_total", "counter", "Commits of a written secret (a new version or not), by vault and result.");
        for (const auto& [k, n] : writes_)
            t.sample("vaultfs_writes_total", {{"vault", std::get<0>(k)}, {"result", std::get<1>(k)}},
                     static_cast<double>(n));
        t.family("vaultfs_denials_total", "counter", "Operations refused, by reason (the deciding rule's kind).");
        for (const auto& [r, n] : denials_)
            t.sample("vaultfs_denials_total", {{"reason", r}}, static_cast<double>(n));
        t.one("vaultfs_audit_records_written_total", "counter", "Audit records this process wrote.",
              static_cast<double>(records_written_.load(std::memory_order_relaxed)));
        t.family("vaultfs_expiry_events_total", "counter", "Near-expiry and expired events, by object kind.");
        for (const auto& [k, n] : expiry_events_)
            t.sample("vaultfs_expiry_events_total", {{"kind", std::get<0>(k)}, {"event", std::get<1>(k)}},
                     static_cast<double>(n));
    }
    t.one("vaultfs_audit_refusals_coalesced_total", "counter",
          "Repeated refusals of callers who hold nothing, counted in a summary record instead of written one by one.",
          static_cast<double>(g.audit_refusals_coalesced));
    t.one("vaultfs_audit_records_dropped_total", "counter",
          "Such refusals not written because the audit disk was below its reserve (counted in the next signed record).",
          static_cast<double>(g.audit_dropped_low_space));
    if (g.shipping) {
        t.one("vaultfs_audit_shipped_total", "counter", "Audit records sent to syslog.", static_cast<double>(g.shipped));
        t.one("vaultfs_audit_ship_dropped_total", "counter",
              "Audit records not sent to syslog (queue full or send failed); the audit file has them.",
              static_cast<double>(g.ship_dropped));
        t.one("vaultfs_audit_ship_queued", "gauge", "Audit records waiting to be sent to syslog.",
              static_cast<double>(g.ship_queued));
        t.one("vaultfs_audit_ship_errors_total", "counter", "Failed sends or connects to the syslog server.",
              static_cast<double>(g.ship_errors));
    }
    if (g.token_ops != nullptr) {
        t.family("vaultfs_token_operation_seconds", "histogram", "PKCS#11 token operations and their latency, by operation.");
        for (std::size_t i = 0; i < hsm::token_op_names.size(); ++i) {
            const auto h = g.token_ops->of(static_cast<hsm::TokenOp>(i));
            const std::string_view op = hsm::token_op_names[i];
            for (std::size_t b = 0; b < hsm::token_latency_buckets.size(); ++b)
                t.sample("vaultfs_token_operation_seconds_bucket", {{"op", op}, {"le", number(hsm::token_latency_buckets[b])}},
                         static_cast<double>(h.cumulative[b]));
            t.sample("vaultfs_token_operation_seconds_bucket", {{"op", op}, {"le", "+Inf"}}, static_cast<double>(h.count));
            t.sample("vaultfs_token_operation_seconds_sum", {{"op", op}}, h.sum_seconds);
            t.sample("vaultfs_token_operation_seconds_count", {{"op", op}}, static_cast<double>(h.count));
        }
    }
    t.one("vaultfs_dek_cache_hits_total", "counter", "Opens whose data key was in the locked-memory cache.",
          static_cast<double>(g.dek_hits));
    t.one("vaultfs_dek_cache_misses_total", "counter", "Opens whose data key the token had to unseal.",
          static_cast<double>(g.dek_misses));
    t.one("vaultfs_dek_cache_entries", "gauge", "Data keys in the cache now.", static_cast<double>(g.dek_entries));
    t.one("vaultfs_open_handles", "gauge", "Files open on the mount now.", static_cast<double>(g.open_handles));
    t.one("vaultfs_locked_memory_bytes", "gauge", "Locked memory in use for plaintext and keys.",
          static_cast<double>(g.locked_bytes));
    t.one("vaultfs_locked_memory_limit_bytes", "gauge", "The locked memory the daemon has (secure_heap_kib).",
          static_cast<double>(g.locked_limit));
    if (g.feed_age_seconds)
        t.one("vaultfs_feed_staleness_seconds", "gauge",
              "Since the shared store's change feed last confirmed freshness (reads fail closed past the bound).",
              *g.feed_age_seconds);
    t.family("vaultfs_expiry_timestamp_seconds", "gauge",
             "When the current version of a secret, key or certificate expires (Unix time).");
    for (const auto& e : g.expiring)
        t.sample("vaultfs_expiry_timestamp_seconds", {{"vault", e.vault}, {"name", e.name}, {"kind", kind_name(e.kind)}},
                 static_cast<double>(e.expires) / 1e6);
    const ExpiryCounts counts = count_expiring(g.expiring, g.now, g.expiry_lead);
    t.one("vaultfs_expiring_soon", "gauge", "Current versions that expire within the longest warning lead time.",
          static_cast<double>(counts.soon));
    t.one("vaultfs_expired", "gauge", "Current versions already past their expiry.", static_cast<double>(counts.expired));
    return t.take();
}

}  // namespace vaultfs::vault::monitor
