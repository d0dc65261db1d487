// Unit tests for vault/config: the config file round trip, error messages
// that name the offending line, and reading the token PIN from its source.
#include "vault/state/config.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <openssl/crypto.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "tests/support/temp_token.hpp"

namespace vaultfs::vault {
namespace {

using testing::TempDir;

Config parsed(const std::string& text, const std::string& state = "/state")
{
    auto c = parse_config(text, state);
    INFO("config text:\n" << text);
    if (!c)
        FAIL("parse failed: " << c.error().message);
    return *c;
}

Error parse_error(const std::string& text)
{
    auto c = parse_config(text, "/state");
    INFO("config text:\n" << text);
    if (c)
        FAIL("parse unexpectedly succeeded");
    return c.error();
}

void write_file(const std::string& path, const std::string& content, mode_t mode)
{
    std::ofstream(path, std::ios::binary) << content;
    REQUIRE(::chmod(path.c_str(), mode) == 0);
}

std::string text_of(const hsm::SecureBuffer& b) { return std::string(b.data(), b.data() + b.size()); }

// Sets an environment variable for one test and removes it afterwards.
struct EnvVar {
    std::string name;
    EnvVar(std::string n, const std::string& value) : name(std::move(n)) { ::setenv(name.c_str(), value.c_str(), 1); }
    ~EnvVar() { ::unsetenv(name.c_str()); }
};

void check_same(const Config& a, const Config& b)
{
    CHECK(a.state_dir == b.state_dir);
    CHECK(a.pkcs11_module == b.pkcs11_module);
    CHECK(a.token_label == b.token_label);
    CHECK(a.pin_source == b.pin_source);
    CHECK(a.module_env == b.module_env);
    CHECK(a.database == b.database);
    CHECK(a.audit_file == b.audit_file);
    CHECK(a.audit_public_key == b.audit_public_key);
    CHECK(a.control_socket == b.control_socket);
    CHECK(a.audit_sync == b.audit_sync);
    CHECK(a.audit_sync_interval == b.audit_sync_interval);
    CHECK(a.audit_checkpoint_records == b.audit_checkpoint_records);
    CHECK(a.audit_checkpoint_interval == b.audit_checkpoint_interval);
    CHECK(a.audit_coalesce_interval == b.audit_coalesce_interval);
    CHECK(a.audit_reserve_mib == b.audit_reserve_mib);
    CHECK(a.max_open_files_per_uid == b.max_open_files_per_uid);
    CHECK(a.max_buffered_kib_per_uid == b.max_buffered_kib_per_uid);
    CHECK(a.dek_cache_entries == b.dek_cache_entries);
    CHECK(a.dek_cache_ttl == b.dek_cache_ttl);
    CHECK(a.admin_group == b.admin_group);
    CHECK(a.threads == b.threads);
    CHECK(a.secure_heap_kib == b.secure_heap_kib);
    CHECK(a.retention_day_ms == b.retention_day_ms);
    CHECK(a.purge_interval == b.purge_interval);
    CHECK(a.audit_syslog.has_value() == b.audit_syslog.has_value());
    if (a.audit_syslog && b.audit_syslog) {
        CHECK(a.audit_syslog->host == b.audit_syslog->host);
        CHECK(a.audit_syslog->port == b.audit_syslog->port);
        CHECK(a.audit_syslog->transport == b.audit_syslog->transport);
    }
    CHECK(a.audit_syslog_facility == b.audit_syslog_facility);
    CHECK(a.audit_syslog_queue == b.audit_syslog_queue);
    CHECK(a.metrics_textfile == b.metrics_textfile);
    CHECK(a.metrics_interval == b.metrics_interval);
    CHECK(a.expiry_warn_days == b.expiry_warn_days);
    CHECK(a.expiry_check_interval == b.expiry_check_interval);
    CHECK(a.on_expiry.size() == b.on_expiry.size());
}

TEST_CASE("parse_config reads back what render_config wrote", "[config]")
{
    SECTION("every setting changed from its default")
    {
        Config c;
        c.state_dir = "/var/lib/vaultfs";
        c.pkcs11_module = "/usr/lib/x86_64-linux-gnu/pkcs11/some-hsm.so";
        c.token_label = "hsm-partition-7";
        c.pin_source = "env:VAULTFS_TEST_PIN";
        c.module_env = {{"SOFTHSM2_CONF", "/var/lib/vaultfs/softhsm2.conf"}, {"HSM_DEBUG", "0"}};
        c.database = "/srv/db/vault.sqlite";
        c.audit_file = "logs/audit.jsonl";
        c.audit_public_key = "keys/audit.pem";
        c.control_socket = "/run/vaultfs/control.sock";
        c.audit_sync = AuditSync::always;
        c.audit_sync_interval = std::chrono::milliseconds(250);
        c.audit_checkpoint_records = 77;
        c.audit_checkpoint_interval = std::chrono::seconds(30);
        c.audit_coalesce_interval = std::chrono::seconds(3);
        c.audit_reserve_mib = 5;
        c.max_open_files_per_uid = 17;
        c.max_buffered_kib_per_uid = 300;
        c.dek_cache_entries = 0;
        c.dek_cache_ttl = std::chrono::seconds(0);
        c.admin_group = "vault-admins";
        c.threads = 3;
        c.secure_heap_kib = 1024;
        c.retention_day_ms = 1500;
        c.purge_interval = std::chrono::seconds(5);
        c.audit_syslog = audit::SyslogTarget{audit::SyslogTarget::Transport::tcp, "::1", "6514"};
        c.audit_syslog_facility = 4;  // auth
        c.audit_syslog_queue = 50;
        c.metrics_textfile = "/var/lib/prometheus/node-exporter/vaultfs.prom";
        c.metrics_interval = std::chrono::seconds(30);
        c.expiry_warn_days = {60, 14, 1};
        c.expiry_check_interval = std::chrono::seconds(600);
        c.on_expiry = {*hooks::parse("*/* signal root /run/nginx.pid SIGHUP")};
        const std::string text = render_config(c);
        CHECK(text.find("audit_syslog = tcp:[::1]:6514\n") != std::string::npos);
        CHECK(text.find("expiry_warn_days = 60,14,1\n") != std::string::npos);
        check_same(parsed(text, c.state_dir), c);
    }
    SECTION("the defaults, with only the module set")
    {
        Config c;
        c.state_dir = "/state";
        c.pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so";
        const Config back = parsed(render_config(c));
        check_same(back, c);
        // A config that states only the module gets the same defaults.
        check_same(parsed("pkcs11_module = /usr/lib/softhsm/libsofthsm2.so\n"), c);
    }
}

TEST_CASE("comments, blank lines and spacing are accepted", "[config]")
{
    const Config c = parsed("# a comment\n"
                            "\n"
                            "   pkcs11_module=/lib/hsm.so   # trailing comment\n"
                            "\tthreads\t=\t12\r\n"
                            "module_env.SOFTHSM2_CONF = softhsm2.conf\n");
    CHECK(c.pkcs11_module == "/lib/hsm.so");
    CHECK(c.threads == 12);
    REQUIRE(c.module_env.size() == 1);
    CHECK(c.module_env[0].second == "softhsm2.conf");
    CHECK(c.path_of("vault.db") == "/state/vault.db");
    CHECK(c.path_of("/abs/vault.db") == "/abs/vault.db");
}

TEST_CASE("threads: auto by default, as written and read back; a number is kept", "[config]")
{
    Config c;
    c.pkcs11_module = "/lib/hsm.so";
    const std::string text = render_config(c);
    CHECK(text.find("\nthreads = auto\n") != std::string::npos);
    CHECK(parsed(text).threads == 0);
    CHECK(parsed("pkcs11_module = /lib/hsm.so\nthreads = 6\n").threads == 6);
}

TEST_CASE("each configuration error names its line", "[config]")
{
    struct Case {
        std::string text;
        int line;
        const char* mentions;
    };
    const std::string module = "pkcs11_module = /lib/hsm.so\n";
    const Case cases[] = {
        {module + "\n# comment\ncolour = blue\n", 4, "unknown key 'colour'"},
        {module + "threads = many\n", 2, "threads"},
        {module + "threads = 12x\n", 2, "threads"},
        {module + "threads = 0\n", 2, "threads"},
        {module + "threads = -1\n", 2, "threads"},
        {module + "dek_cache_entries = 99999999999999999999999\n", 2, "dek_cache_entries"},
        {module + "audit_checkpoint_records = 1.5\n", 2, "audit_checkpoint_records"},
        {"token_label = x\npin_source = ftp://example/pin\n" + module, 2, "pin_source"},
        {module + "pin_source = file:\n", 2, "pin_source"},
        {module + "audit_sync = sometimes\n", 2, "audit_sync"},
        {module + "module_env.1BAD = x\n", 2, "environment variable"},
        {module + "just some words\n", 2, "key = value"},
        {module + "database =\n", 2, "no value"},
        {module + "token_label = " + std::string(33, 'L') + "\n", 2, "token_label"},
        {module + "audit_syslog = smtp:host:25\n", 2, "unknown transport"},
        {module + "audit_syslog = udp:host\n", 2, "no port"},
        {module + "audit_syslog = tcp:host:70000\n", 2, "the port is not 1-65535"},
        {module + "audit_syslog_facility = local9\n", 2, "unknown syslog facility 'local9'"},
        {module + "audit_syslog_queue = 0\n", 2, "audit_syslog_queue"},
        {module + "metrics_textfile = /tmp/vaultfs.txt\n", 2, "must end in .prom"},
        {module + "expiry_warn_days = 30,,7\n", 2, "expiry_warn_days"},
        {module + "expiry_warn_days = 0\n", 2, "expiry_warn_days"},
        {module + "on_expiry = */* teleport\n", 2, "line 2"},
    };
    for (const auto& c : cases) {
        const Error e = parse_error(c.text);
        INFO(e.message);
        CHECK(e.code == Errc::invalid_argument);
        CHECK_THAT(e.message, Catch::Contains("line " + std::to_string(c.line) + ":"));
        CHECK_THAT(e.message, Catch::Contains(c.mentions));
    }
}

TEST_CASE("a NUL byte anywhere in a line is an error naming that line", "[config]")
{
    std::string text = "pkcs11_module = /lib/hsm.so\nthreads = 4\n";
    text += std::string("token_label = a\0b\n", 18);
    const Error e = parse_error(text);
    CHECK_THAT(e.message, Catch::Contains("line 3:"));
    CHECK_THAT(e.message, Catch::Contains("NUL"));
}

TEST_CASE("a config without pkcs11_module is refused", "[config]")
{
    const Error e = parse_error("token_label = vaultfs\nthreads = 2\n");
    CHECK(e.code == Errc::invalid_argument);
    CHECK_THAT(e.message, Catch::Contains("pkcs11_module"));
    CHECK_THAT(e.message, Catch::Contains("not set"));
    // An empty file too.
    CHECK_THAT(parse_error("").message, Catch::Contains("pkcs11_module"));
}

TEST_CASE("load_config reads STATE/vaultfs.conf and says what to do when it is missing", "[config]")
{
    TempDir dir;
    auto missing = load_config(dir.path());
    REQUIRE_FALSE(missing);
    CHECK(missing.error().code == Errc::not_found);
    CHECK_THAT(missing.error().message, Catch::Contains("vaultfs init"));

    write_file(dir / config_file_name, "pkcs11_module = /lib/hsm.so\nthreads = 5\n", 0600);
    auto c = load_config(dir.path());
    REQUIRE(c);
    CHECK(c->state_dir == dir.path());
    CHECK(c->threads == 5);

    write_file(dir / config_file_name, "pkcs11_module = /lib/hsm.so\nthreads = five\n", 0600);
    auto bad = load_config(dir.path());
    REQUIRE_FALSE(bad);
    CHECK_THAT(bad.error().message, Catch::Contains(dir.path()));
    CHECK_THAT(bad.error().message, Catch::Contains("line 2:"));
}

TEST_CASE("read_pin reads a 0600 PIN file without its trailing newline", "[config]")
{
    TempDir dir;
    Config c;
    c.state_dir = dir.path();

    SECTION("with a newline")
    {
        write_file(dir / "pin", "s3cret-PIN\n", 0600);
        c.pin_source = "file:pin";
        auto pin = read_pin(c);
        REQUIRE(pin);
        CHECK(text_of(*pin) == "s3cret-PIN");
        CHECK(CRYPTO_secure_allocated(pin->data()) == 1);
    }
    SECTION("with CRLF")
    {
        write_file(dir / "pin", "s3cret-PIN\r\n", 0600);
        c.pin_source = "file:pin";
        auto pin = read_pin(c);
        REQUIRE(pin);
        CHECK(text_of(*pin) == "s3cret-PIN");
    }
    SECTION("without a newline, by absolute path, mode 0400")
    {
        write_file(dir / "other-pin", "1234", 0400);
        c.pin_source = "file:" + (dir / "other-pin");
        auto pin = read_pin(c);
        REQUIRE(pin);
        CHECK(text_of(*pin) == "1234");
    }
    SECTION("inner whitespace is kept")
    {
        write_file(dir / "pin", " a b \n", 0600);
        c.pin_source = "file:pin";
        auto pin = read_pin(c);
        REQUIRE(pin);
        CHECK(text_of(*pin) == " a b ");
    }
}

TEST_CASE("read_pin refuses a PIN file others can read, and says to chmod it", "[config]")
{
    TempDir dir;
    Config c;
    c.state_dir = dir.path();
    c.pin_source = "file:pin";
    for (const mode_t mode : {mode_t{0644}, mode_t{0640}, mode_t{0604}, mode_t{0660}}) {
        INFO("mode " << std::oct << mode);
        write_file(dir / "pin", "s3cret-PIN\n", mode);
        auto pin = read_pin(c);
        REQUIRE_FALSE(pin);
        CHECK(pin.error().code == Errc::key_unavailable);
        CHECK_THAT(pin.error().message, Catch::Contains("chmod 600"));
        CHECK_THAT(pin.error().message, Catch::Contains(dir / "pin"));
        CHECK_THAT(pin.error().message, !Catch::Contains("s3cret"));
    }
}

TEST_CASE("read_pin refuses a missing, empty, or non-regular PIN file", "[config]")
{
    TempDir dir;
    Config c;
    c.state_dir = dir.path();

    c.pin_source = "file:absent";
    auto missing = read_pin(c);
    REQUIRE_FALSE(missing);
    CHECK_THAT(missing.error().message, Catch::Contains(dir / "absent"));

    write_file(dir / "empty", "\n", 0600);
    c.pin_source = "file:empty";
    auto empty = read_pin(c);
    REQUIRE_FALSE(empty);
    CHECK_THAT(empty.error().message, Catch::Contains("empty"));

    REQUIRE(::mkdir((dir / "adir").c_str(), 0700) == 0);
    c.pin_source = "file:adir";
    auto directory = read_pin(c);
    REQUIRE_FALSE(directory);
    CHECK_THAT(directory.error().message, Catch::Contains("regular file"));

    // A symlink to a good PIN file is not followed.
    write_file(dir / "real-pin", "1234\n", 0600);
    REQUIRE(::symlink((dir / "real-pin").c_str(), (dir / "link").c_str()) == 0);
    c.pin_source = "file:link";
    CHECK_FALSE(read_pin(c));
}

TEST_CASE("read_pin takes env:VAR from the environment", "[config]")
{
    Config c;
    c.state_dir = "/nonexistent";
    c.pin_source = "env:VAULTFS_CONFIG_TEST_PIN";
    {
        EnvVar v("VAULTFS_CONFIG_TEST_PIN", "env-pin-9876");
        auto pin = read_pin(c);
        REQUIRE(pin);
        CHECK(text_of(*pin) == "env-pin-9876");
    }
    auto unset = read_pin(c);
    REQUIRE_FALSE(unset);
    CHECK(unset.error().code == Errc::key_unavailable);
    CHECK_THAT(unset.error().message, Catch::Contains("VAULTFS_CONFIG_TEST_PIN"));

    EnvVar empty("VAULTFS_CONFIG_TEST_PIN", "");
    CHECK_FALSE(read_pin(c));
}

TEST_CASE("read_pin takes credential:NAME from systemd's credentials directory", "[config]")
{
    TempDir dir;
    Config c;
    c.state_dir = "/nonexistent";
    c.pin_source = "credential:vaultfs-pin";
    {
        auto no_dir = read_pin(c);
        REQUIRE_FALSE(no_dir);
        CHECK_THAT(no_dir.error().message, Catch::Contains("CREDENTIALS_DIRECTORY"));
    }
    write_file(dir / "vaultfs-pin", "cred-pin\n", 0400);
    EnvVar creds("CREDENTIALS_DIRECTORY", dir.path());
    auto pin = read_pin(c);
    REQUIRE(pin);
    CHECK(text_of(*pin) == "cred-pin");
}

}  // namespace
}  // namespace vaultfs::vault
