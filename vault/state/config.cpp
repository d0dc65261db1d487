#include "vault/state/config.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace vaultfs::vault {

namespace {

std::string_view trim(std::string_view s)
{
    const auto b = s.find_first_not_of(" \t\r");
    if (b == std::string_view::npos)
        return {};
    const auto e = s.find_last_not_of(" \t\r");
    return s.substr(b, e - b + 1);
}

template <class T>
std::optional<T> parse_number(std::string_view s, T min, T max)
{
    T v{};
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v < min || v > max)
        return std::nullopt;
    return v;
}

bool valid_env_name(std::string_view s)
{
    if (s.empty() || (s[0] >= '0' && s[0] <= '9'))
        return false;
    for (const char c : s)
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    return true;
}

bool valid_pin_source(std::string_view s)
{
    for (const std::string_view prefix : {"file:", "env:", "credential:"})
        if (s.substr(0, prefix.size()) == prefix && s.size() > prefix.size())
            return true;
    return false;
}

}  // namespace

std::string Config::path_of(const std::string& name) const
{
    if (!name.empty() && name[0] == '/')
        return name;
    return state_dir + "/" + name;
}

Result<Config> parse_config(std::string_view text, const std::string& state_dir)
{
    Config c;
    c.state_dir = state_dir;
    c.pkcs11_module.clear();
    int line_no = 0;
    std::size_t pos = 0;
    const auto bad = [&](const std::string& why) {
        return fail(Errc::invalid_argument, std::string(config_file_name) + " line " + std::to_string(line_no) + ": " + why);
    };
    while (pos <= text.size()) {
        const auto end = text.find('\n', pos);
        std::string_view line = text.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
        pos = end == std::string_view::npos ? text.size() + 1 : end + 1;
        ++line_no;
        if (line.find('\0') != std::string_view::npos)
            return bad("contains a NUL byte");
        if (const auto hash = line.find('#'); hash != std::string_view::npos)
            line = line.substr(0, hash);
        line = trim(line);
        if (line.empty())
            continue;
        const auto eq = line.find('=');
        if (eq == std::string_view::npos)
            return bad("expected `key = value`");
        const auto key = trim(line.substr(0, eq));
        const auto value = trim(line.substr(eq + 1));
        if (value.empty())
            return bad("`" + std::string(key) + "` has no value");
        const std::string v(value);
        const auto number = [&](auto min, auto max) { return parse_number<decltype(min)>(value, min, max); };

        if (key == "pkcs11_module") {
            c.pkcs11_module = v;
        } else if (key == "token_label") {
            if (v.size() > 32)
                return bad("token_label is longer than 32 bytes");
            c.token_label = v;
        } else if (key == "pin_source") {
            if (!valid_pin_source(v))
                return bad("pin_source must be file:PATH, env:NAME or credential:NAME");
            c.pin_source = v;
        } else if (key == "token_seal") {
            const auto scheme = hsm::seal_scheme_from(v);
            if (!scheme)
                return bad("token_seal must be aes-gcm or aes-cbc-pad+hmac-sha256");
            c.schemes.seal = *scheme;
        } else if (key == "token_signature") {
            const auto scheme = hsm::signature_scheme_from(v);
            if (!scheme)
                return bad("token_signature must be ecdsa-p256 or rsa-pss-sha256");
            c.schemes.signature = *scheme;
        } else if (key.substr(0, 11) == "module_env.") {
            const auto name = key.substr(11);
            if (!valid_env_name(name))
                return bad("bad environment variable name '" + std::string(name) + "'");
            c.module_env.emplace_back(std::string(name), v);
        } else if (key == "database") {
            c.database = v;
        } else if (key == "store") {
            if (v.rfind("postgresql://", 0) != 0 && v.rfind("postgres://", 0) != 0)
                return bad("store must be a postgresql:// connection string (the SQLite file is `database`)");
            c.store = v;
        } else if (key == "host") {
            if (v.empty() || v.size() > 64 || v.find_first_of(" \t/") != std::string_view::npos)
                return bad("host must be 1-64 characters without spaces or slashes");
            c.host = v;
        } else if (key == "staleness_bound_ms") {
            const auto n = number(std::int64_t{100}, std::int64_t{600000});
            if (!n)
                return bad("staleness_bound_ms must be 100..600000");
            c.staleness_bound = std::chrono::milliseconds(*n);
        } else if (key == "audit_file") {
            c.audit_file = v;
        } else if (key == "audit_public_key") {
            c.audit_public_key = v;
        } else if (key == "control_socket") {
            c.control_socket = v;
        } else if (key == "audit_sync") {
            if (v == "always")
                c.audit_sync = AuditSync::always;
            else if (v == "interval")
                c.audit_sync = AuditSync::interval;
            else
                return bad("audit_sync must be `always` or `interval`");
        } else if (key == "audit_sync_interval_ms") {
            const auto n = number(std::int64_t{1}, std::int64_t{3600000});
            if (!n)
                return bad("audit_sync_interval_ms must be 1..3600000");
            c.audit_sync_interval = std::chrono::milliseconds(*n);
        } else if (key == "audit_checkpoint_records") {
            const auto n = number(std::uint64_t{1}, std::uint64_t{10000});
            if (!n)
                return bad("audit_checkpoint_records must be 1..10000");
            c.audit_checkpoint_records = *n;
        } else if (key == "audit_checkpoint_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{3600});
            if (!n)
                return bad("audit_checkpoint_seconds must be 1..3600");
            c.audit_checkpoint_interval = std::chrono::seconds(*n);
        } else if (key == "audit_coalesce_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{3600});
            if (!n)
                return bad("audit_coalesce_seconds must be 1..3600");
            c.audit_coalesce_interval = std::chrono::seconds(*n);
        } else if (key == "audit_reserve_mib") {
            const auto n = number(std::uint64_t{0}, std::uint64_t{1} << 20);
            if (!n)
                return bad("audit_reserve_mib must be 0..1048576");
            c.audit_reserve_mib = *n;
        } else if (key == "max_open_files_per_uid") {
            const auto n = number(std::size_t{1}, std::size_t{1} << 20);
            if (!n)
                return bad("max_open_files_per_uid must be 1..1048576");
            c.max_open_files_per_uid = *n;
        } else if (key == "max_buffered_kib_per_uid") {
            const auto n = number(std::size_t{26}, std::size_t{4} << 20);
            if (!n)
                return bad("max_buffered_kib_per_uid must be 26..4194304 (a value is up to 25 KiB)");
            c.max_buffered_kib_per_uid = *n;
        } else if (key == "staging_idle_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{86400});
            if (!n)
                return bad("staging_idle_seconds must be 1..86400");
            c.staging_idle = std::chrono::seconds(*n);
        } else if (key == "dek_cache_entries") {
            const auto n = number(std::size_t{0}, std::size_t{1} << 20);
            if (!n)
                return bad("dek_cache_entries must be 0..1048576");
            c.dek_cache_entries = *n;
        } else if (key == "dek_cache_ttl_seconds") {
            const auto n = number(std::int64_t{0}, std::int64_t{86400});
            if (!n)
                return bad("dek_cache_ttl_seconds must be 0..86400");
            c.dek_cache_ttl = std::chrono::seconds(*n);
        } else if (key == "admin_group") {
            c.admin_group = v;
        } else if (key == "threads") {
            const auto n = v == "auto" ? std::optional<unsigned>(0u) : number(1u, 256u);
            if (!n)
                return bad("threads must be 1..256 or auto");
            c.threads = *n;
        } else if (key == "secure_heap_kib") {
            const auto n = number(std::size_t{64}, std::size_t{4} << 20);
            if (!n)
                return bad("secure_heap_kib must be 64..4194304");
            c.secure_heap_kib = *n;
        } else if (key == "retention_day_ms") {
            const auto n = number(std::int64_t{1}, std::int64_t{86400000});
            if (!n)
                return bad("retention_day_ms must be 1..86400000");
            c.retention_day_ms = *n;
        } else if (key == "purge_interval_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{86400});
            if (!n)
                return bad("purge_interval_seconds must be 1..86400");
            c.purge_interval = std::chrono::seconds(*n);
        } else if (key == "object_policy_interval_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{86400});
            if (!n)
                return bad("object_policy_interval_seconds must be 1..86400");
            c.object_policy_interval = std::chrono::seconds(*n);
        } else if (key == "on_change") {
            auto h = hooks::parse(value);
            if (!h)
                return bad(h.error().message);
            c.on_change.push_back(std::move(*h));
        } else if (key == "on_expiry") {
            auto h = hooks::parse(value);
            if (!h)
                return bad(h.error().message);
            c.on_expiry.push_back(std::move(*h));
        } else if (key == "audit_syslog") {
            auto t = audit::parse_syslog_target(value);
            if (!t)
                return bad(t.error().message);
            c.audit_syslog = std::move(*t);
        } else if (key == "audit_syslog_facility") {
            auto f = audit::parse_facility(value);
            if (!f)
                return bad(f.error().message);
            c.audit_syslog_facility = *f;
        } else if (key == "audit_syslog_queue") {
            const auto n = number(std::size_t{1}, std::size_t{1000000});
            if (!n)
                return bad("audit_syslog_queue must be 1..1000000");
            c.audit_syslog_queue = *n;
        } else if (key == "metrics_textfile") {
            if (v.size() < 6 || v.substr(v.size() - 5) != ".prom")
                return bad("metrics_textfile must end in .prom (node_exporter's textfile collector reads only those)");
            c.metrics_textfile = v;
        } else if (key == "metrics_interval_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{3600});
            if (!n)
                return bad("metrics_interval_seconds must be 1..3600");
            c.metrics_interval = std::chrono::seconds(*n);
        } else if (key == "expiry_check_seconds") {
            const auto n = number(std::int64_t{1}, std::int64_t{86400});
            if (!n)
                return bad("expiry_check_seconds must be 1..86400");
            c.expiry_check_interval = std::chrono::seconds(*n);
        } else if (key == "expiry_warn_days") {
            std::vector<std::int64_t> days;
            std::string_view rest = value;
            while (!rest.empty()) {
                const auto comma = rest.find(',');
                const auto n = parse_number<std::int64_t>(trim(rest.substr(0, comma)), 1, 3650);
                if (!n)
                    return bad("expiry_warn_days must be days 1..3650, separated by commas (e.g. 30,7)");
                days.push_back(*n);
                rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
            }
            std::sort(days.rbegin(), days.rend());
            days.erase(std::unique(days.begin(), days.end()), days.end());
            c.expiry_warn_days = std::move(days);
        } else {
            return bad("unknown key '" + std::string(key) + "'");
        }
    }
    if (c.pkcs11_module.empty())
        return fail(Errc::invalid_argument, std::string(config_file_name) + ": pkcs11_module is not set");
    return c;
}

std::vector<std::pair<std::string, std::string>> Config::environment() const
{
    std::vector<std::pair<std::string, std::string>> out;
    for (auto [name, value] : module_env) {
        for (std::size_t at; (at = value.find("${STATE}")) != std::string::npos;)
            value.replace(at, 8, state_dir);
        out.emplace_back(std::move(name), std::move(value));
    }
    return out;
}

namespace {

constexpr std::string_view softhsm_marker = "# SoftHSM2 configuration for this vaultfs state (written by vaultfs";

// Rewrites the embedded token's softhsm2.conf when its tokendir is not this
// state's (the directory was moved or copied). Best effort: a failure shows
// when the token is opened.
void keep_softhsm_conf(const std::string& state_dir)
{
    const std::string path = state_dir + "/softhsm2.conf";
    std::ifstream in(path);
    if (!in)
        return;
    std::stringstream text;
    text << in.rdbuf();
    const std::string body = text.str();
    if (body.rfind(softhsm_marker, 0) != 0)
        return;  // the admin's own file
    const std::string wanted = embedded_softhsm_conf(state_dir);
    if (body == wanted)
        return;
    const std::string tmp = path + ".new";
    {
        std::ofstream out(tmp, std::ios::trunc);
        out << wanted;
        if (!out.flush())
            return;
    }
    ::chmod(tmp.c_str(), 0600);
    ::rename(tmp.c_str(), path.c_str());
}

}  // namespace

std::string embedded_softhsm_conf(const std::string& state_dir)
{
    return std::string(softhsm_marker) + " init; vaultfs keeps tokendir pointing here)\n"
                                          "directories.tokendir = " + state_dir + "/tokens\n"
                                          "objectstore.backend = file\n"
                                          "log.level = ERROR\n"
                                          "slots.removable = false\n";
}

Result<Config> load_config(const std::string& state_dir)
{
    const std::string path = state_dir + "/" + config_file_name;
    std::ifstream in(path);
    if (!in)
        return fail(Errc::not_found, "cannot read " + path + ": " + std::strerror(errno) +
                                         "; run `vaultfs init --state " + state_dir + "` first");
    std::stringstream text;
    text << in.rdbuf();
    auto c = parse_config(text.str(), state_dir);
    if (!c)
        return fail(c.error().code, state_dir + "/" + c.error().message);
    keep_softhsm_conf(state_dir);
    return c;
}

std::string render_config(const Config& c)
{
    std::ostringstream out;
    out << "# vaultfs configuration. Relative paths are relative to this directory, and\n"
        << "# ${STATE} stands for it: the directory can be moved or copied whole.\n"
        << "# The keys live in the token: to move to another token (a hardware HSM),\n"
        << "# run `vaultfs token migrate` rather than editing the token lines.\n"
        << "pkcs11_module = " << c.pkcs11_module << "\n"
        << "token_label = " << c.token_label << "\n"
        << "pin_source = " << c.pin_source << "\n";
    for (const auto& [name, value] : c.module_env)
        out << "module_env." << name << " = " << value << "\n";
    out << "# What the token does for vaultfs, chosen from its mechanisms at init\n"
        << "token_seal = " << hsm::to_string(c.schemes.seal) << "\n"
        << "token_signature = " << hsm::to_string(c.schemes.signature) << "\n";
    if (c.store) {
        out << "# Several hosts share this PostgreSQL store (docs/hosts.md); this is one of them\n"
            << "store = " << *c.store << "\n";
        if (!c.host.empty())
            out << "host = " << c.host << "\n";
        out << "staleness_bound_ms = " << c.staleness_bound.count() << "\n";
    } else {
        out << "database = " << c.database << "\n";
    }
    out << "audit_file = " << c.audit_file << "\n"
        << "audit_public_key = " << c.audit_public_key << "\n"
        << "control_socket = " << c.control_socket << "\n"
        << "audit_sync = " << (c.audit_sync == AuditSync::always ? "always" : "interval") << "\n"
        << "audit_sync_interval_ms = " << c.audit_sync_interval.count() << "\n"
        << "audit_checkpoint_records = " << c.audit_checkpoint_records << "\n"
        << "audit_checkpoint_seconds = " << c.audit_checkpoint_interval.count() << "\n"
        << "audit_coalesce_seconds = " << c.audit_coalesce_interval.count() << "\n"
        << "audit_reserve_mib = " << c.audit_reserve_mib << "\n"
        << "dek_cache_entries = " << c.dek_cache_entries << "\n"
        << "dek_cache_ttl_seconds = " << c.dek_cache_ttl.count() << "\n";
    if (c.admin_group)
        out << "admin_group = " << *c.admin_group << "\n";
    out << "threads = " << (c.threads == 0 ? std::string("auto") : std::to_string(c.threads)) << "\n"
        << "secure_heap_kib = " << c.secure_heap_kib << "\n"
        << "max_open_files_per_uid = " << c.max_open_files_per_uid << "\n"
        << "max_buffered_kib_per_uid = " << c.max_buffered_kib_per_uid << "\n"
        << "staging_idle_seconds = " << c.staging_idle.count() << "\n";
    if (c.retention_day_ms != 86400000)
        out << "retention_day_ms = " << c.retention_day_ms << "\n";
    if (c.purge_interval != std::chrono::seconds(3600))
        out << "purge_interval_seconds = " << c.purge_interval.count() << "\n";
    if (c.object_policy_interval != std::chrono::seconds(60))
        out << "object_policy_interval_seconds = " << c.object_policy_interval.count() << "\n";
    for (const auto& h : c.on_change)
        out << "on_change = " << h.spec << "\n";
    if (c.audit_syslog)
        out << "audit_syslog = " << audit::render_syslog_target(*c.audit_syslog) << "\n"
            << "audit_syslog_facility = " << audit::facility_name(c.audit_syslog_facility) << "\n"
            << "audit_syslog_queue = " << c.audit_syslog_queue << "\n";
    if (!c.metrics_textfile.empty())
        out << "metrics_textfile = " << c.metrics_textfile << "\n"
            << "metrics_interval_seconds = " << c.metrics_interval.count() << "\n";
    if (c.expiry_warn_days != std::vector<std::int64_t>{30, 7}) {
        out << "expiry_warn_days = ";
        for (std::size_t i = 0; i < c.expiry_warn_days.size(); ++i)
            out << (i ? "," : "") << c.expiry_warn_days[i];
        out << "\n";
    }
    if (c.expiry_check_interval != std::chrono::seconds(60))
        out << "expiry_check_seconds = " << c.expiry_check_interval.count() << "\n";
    for (const auto& h : c.on_expiry)
        out << "on_expiry = " << h.spec << "\n";
    return out.str();
}

Result<hsm::SecureBuffer> read_pin(const Config& c)
{
    const auto colon = c.pin_source.find(':');
    const std::string kind = c.pin_source.substr(0, colon);
    const std::string arg = c.pin_source.substr(colon + 1);

    if (kind == "env") {
        const char* v = std::getenv(arg.c_str());
        if (v == nullptr || *v == '\0')
            return fail(Errc::key_unavailable, "pin_source " + c.pin_source + ": $" + arg + " is not set");
        auto pin = hsm::SecureBuffer::copy_of({reinterpret_cast<const std::uint8_t*>(v), std::strlen(v)});
        // Not left where /proc/PID/environ shows it.
        OPENSSL_cleanse(const_cast<char*>(v), std::strlen(v));
        ::unsetenv(arg.c_str());
        if (!pin)
            return fail(Errc::out_of_memory, pin.error().message);
        return std::move(*pin);
    }

    std::string path;
    if (kind == "file") {
        path = c.path_of(arg);
    } else {  // credential: systemd's LoadCredential= / SetCredentialEncrypted=
        const char* dir = std::getenv("CREDENTIALS_DIRECTORY");
        if (dir == nullptr)
            return fail(Errc::key_unavailable,
                        "pin_source " + c.pin_source + ": $CREDENTIALS_DIRECTORY is not set (not started by systemd?)");
        path = std::string(dir) + "/" + arg;
    }
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return fail(Errc::key_unavailable, "cannot read PIN file " + path + ": " + std::strerror(errno));
    struct stat st{};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        return fail(Errc::key_unavailable, "PIN file " + path + " is not a regular file");
    }
    if (kind == "file" && ((st.st_mode & 077) != 0 || st.st_uid != ::geteuid())) {
        ::close(fd);
        return fail(Errc::key_unavailable, "PIN file " + path + " must be owned by this user and mode 0600 (chmod 600 " +
                                               path + ")");
    }
    auto pin = hsm::SecureBuffer::allocate(0, 256);
    if (!pin) {
        ::close(fd);
        return fail(Errc::out_of_memory, pin.error().message);
    }
    if (auto r = pin->resize(256); !r) {
        ::close(fd);
        return fail(Errc::out_of_memory, r.error().message);
    }
    const ssize_t n = ::read(fd, pin->data(), pin->size());
    char more = 0;
    const bool too_long = n == static_cast<ssize_t>(pin->size()) && ::read(fd, &more, 1) == 1;
    ::close(fd);
    if (n < 0)
        return fail(Errc::key_unavailable, "cannot read PIN file " + path + ": " + std::strerror(errno));
    if (too_long)
        return fail(Errc::key_unavailable, "PIN file " + path + " is longer than 255 bytes");
    std::size_t len = static_cast<std::size_t>(n);
    while (len > 0 && (pin->data()[len - 1] == '\n' || pin->data()[len - 1] == '\r'))
        --len;
    if (len == 0)
        return fail(Errc::key_unavailable, "PIN file " + path + " is empty");
    (void)pin->resize(len);
    return std::move(*pin);
}

}  // namespace vaultfs::vault
