// vaultfs: the command line. Each subcommand is a thin shell over vault/
// (init, audit verify) or fs/daemon (mount).

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <unistd.h>

#include <charconv>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <fstream>
#include <iostream>
#include <sstream>

#include "fs/cli/support.hpp"
#include "fs/cli/hosts.hpp"
#include "fs/cli/monitor.hpp"
#include "fs/cli/objects.hpp"
#include "fs/control/server.hpp"
#include "fs/control/protocol.hpp"
#include "fs/daemon/daemon.hpp"
#include "fs/daemon/restart/supervisor.hpp"
#include "hsm/secure_buffer.hpp"
#include "policy/policy.hpp"
#include "vault/secrets/secret_service.hpp"
#include "vault/audit/log.hpp"
#include "vault/audit/verify.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/state/state.hpp"
#include "vault/state/token_migration.hpp"

namespace {

using namespace vaultfs;
using vaultfs::fs::fail;

// Locked memory for the short-lived commands (PINs only).
constexpr std::size_t command_heap_bytes = 1 << 20;

int run_init(const std::string& state, const vault::InitOptions& options)
{
    if (auto heap = hsm::init_secure_heap(command_heap_bytes); !heap)
        return fail(heap.error().message);
    auto made = vault::init_state(state, options);
    if (!made)
        return fail(made.error().message);
    std::printf("Initialised vaultfs state in %s:\n", vault::absolute_path(state).c_str());
    for (const auto& line : *made)
        std::printf("  %s\n", line.c_str());
    std::printf("Next: vaultfs mount --state %s MOUNTPOINT\n", vault::absolute_path(state).c_str());
    return 0;
}

std::string read_file(const std::string& path)
{
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

int run_verify(const std::string& state, std::vector<std::string> files, std::string public_key, bool slice)
{
    vault::audit::VerifyOptions options;
    options.slice = slice;
    std::string pem;
    std::vector<std::string> key_problems;
    std::vector<std::string> notes;
    if (!state.empty()) {
        if (auto heap = hsm::init_secure_heap(command_heap_bytes); !heap)
            return fail(heap.error().message);
        const std::string dir = vault::absolute_path(state);
        auto config = vault::load_config(dir);
        if (!config)
            return fail(config.error().message);
        const std::string live_file = config->path_of(config->audit_file);
        if (files.empty() && !slice)
            files.push_back(live_file);
        if (const auto daemon = vault::StateLock::holder(dir))
            notes.push_back("the daemon (pid " + std::to_string(*daemon) + ") is running");
        else
            options.stopped = true;  // an unclean stop's last records are unproven
        // A slice is checked by its signatures alone: the anchor is the live file's.
        if (!slice) {
            auto store = vault::Store::open(config->store_location(), vault::Store::Mode::read_only,
                                            vault::store_options(*config, false));
            if (!store)
                return fail(store.error().message);
            auto a = (*store)->audit_anchor();
            if (!a)
                return fail(a.error().message);
            options.anchor = *a;
            options.anchor_expected = true;
        }
        // The key file is a copy; the token holds the key itself.
        const std::string file_pem = read_file(config->path_of(config->audit_public_key));
        if (public_key.empty()) {
            auto token_pem = vault::token_audit_public_key(*config);
            if (!token_pem) {
                notes.push_back("the token could not be asked for the audit key (" + token_pem.error().message +
                                "); checking with " + config->path_of(config->audit_public_key));
                pem = file_pem;
            } else {
                pem = *token_pem;
                if (!vault::same_public_key(file_pem, pem))
                    key_problems.push_back(config->path_of(config->audit_public_key) +
                                           " is not the token's audit key: it was replaced (checked with the "
                                           "token's key instead)");
            }
        }
    }
    if (files.empty())
        return fail(slice ? "name the slice file to check" : "name audit files, or a state directory with --state");
    if (pem.empty()) {
        if (public_key.empty())
            return fail("--public-key is needed without --state");
        pem = read_file(public_key);
        if (pem.empty())
            return fail("cannot read the public key " + public_key);
    }

    const auto report = vault::audit::verify_files(files, pem, options);
    // A slice is about itself: not about the daemon, nor the trail's end.
    for (const auto& n : notes)
        if (!slice)
            std::printf("note: %s\n", n.c_str());
    for (const auto& w : report.warnings)
        if (!slice || w.find("shutdown record") == std::string::npos)
            std::printf("warning: %s\n", w.c_str());
    for (const auto& b : report.breaks)
        std::printf("break: %s\n", b.c_str());
    const bool ok = report.ok && key_problems.empty();
    if (!ok) {
        std::vector<std::string> problems = key_problems;
        problems.insert(problems.end(), report.problems.begin(), report.problems.end());
        std::printf("FAILED: %s\n", problems.front().c_str());
        for (std::size_t i = 1; i < problems.size(); ++i)
            std::printf("  and: %s\n", problems[i].c_str());
        return 1;
    }
    std::string tail = report.unsigned_tail == 0
                           ? "every record signed over"
                           : "unsigned tail: " + std::to_string(report.unsigned_tail) + " record(s) over " +
                                 std::to_string(report.tail_seconds) + " s after the signature at seq " +
                                 std::to_string(report.last_signed_seq);
    if (slice) {
        std::printf("OK: slice of %llu records, %llu signed, chain intact from its first signature to its last\n",
                    static_cast<unsigned long long>(report.records),
                    static_cast<unsigned long long>(report.signed_records));
        return 0;
    }
    std::printf("OK: %llu records, %llu signed, chain intact%s; %s\n", static_cast<unsigned long long>(report.records),
                static_cast<unsigned long long>(report.signed_records),
                options.anchor ? ", reaches the signed database anchor" : "", tail.c_str());
    return 0;
}

// Sends a management request and prints the reply: `show` formats the
// result (and returns the exit status); errors go to stderr, the daemon's
// sentence and the errno name. Returns the exit status.
int manage(const std::string& state, const std::string& socket, const fs::ControlRequest& request,
           const std::function<int(const nlohmann::json&)>& show)
{
    auto reply = fs::control_call(state, socket, fs::render_request(request));
    if (!reply)
        return fail(reply.error().message);
    if (!(*reply).value("ok", false)) {
        std::string error = (*reply).value("error", std::string());
        if (error.empty())
            error = "the daemon refused the request";
        return fail(error + " (" + (*reply).value("errno", std::string("?")) + ")");
    }
    return show(*reply);
}

int print_json(const nlohmann::json& j)
{
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
}

// The state directory a command works on: --state, else $VAULTFS_STATE,
// else /var/lib/vaultfs.
std::string default_state()
{
    const char* env = std::getenv("VAULTFS_STATE");
    return env != nullptr && *env != '\0' ? env : "/var/lib/vaultfs";
}

// `vaultfs status`, for people: the verdict on one line, then one line per
// part, problems said plainly.
int print_status(const nlohmann::json& r)
{
    const auto text = [&](const char* key) { return r.value(key, std::string("?")); };
    const auto number = [&](const char* key) { return r.value(key, std::int64_t{-1}); };
    const fs::Health health = fs::health_of(r);
    std::printf("%s\n", health.line.c_str());
    std::printf("vaultfs: serving %s at %s\n", text("state").c_str(), text("mountpoint").c_str());
    std::printf("token:   %s\n", text("token").c_str());
    std::printf("         %s; DEKs sealed with %s, audit signed with %s\n", text("token_name").c_str(),
                text("token_seal").c_str(), text("token_signature").c_str());
    std::printf("audit:   %s (%lld records; %lld refusals coalesced, %lld dropped%s)\n", text("audit").c_str(),
                static_cast<long long>(number("audit_records")), static_cast<long long>(number("audit_refusals_coalesced")),
                static_cast<long long>(number("audit_records_dropped")),
                r.value("audit_disk_below_reserve", false) ? "; its disk is below the reserve" : "");
    std::printf("vaults:  %lld\n", static_cast<long long>(number("vaults")));
    if (r.contains("keks_to_rekey") && r["keks_to_rekey"].is_array())
        for (const auto& f : r["keks_to_rekey"])
            std::printf("         vault %s: %s\n", f.value("vault", std::string("?")).c_str(),
                        f.value("reason", std::string()).c_str());
    std::printf("open files: %lld\n", static_cast<long long>(number("open_handles")));
    const auto dek = r.value("dek_cache", nlohmann::json::object());
    std::printf("DEK cache: %s, %lld entries, %lld hits, %lld misses\n", dek.value("enabled", false) ? "on" : "off",
                static_cast<long long>(dek.value("entries", std::int64_t{0})),
                static_cast<long long>(dek.value("hits", std::int64_t{0})),
                static_cast<long long>(dek.value("misses", std::int64_t{0})));
    std::printf("locked memory: %lld bytes in use\n", static_cast<long long>(number("locked_memory_bytes")));
    std::printf("expiry:  %lld expiring within %lld days, %lld expired\n", static_cast<long long>(number("expiring_soon")),
                static_cast<long long>(number("expiry_lead_days")), static_cast<long long>(number("expired")));
    if (r.contains("feed_staleness_ms"))
        std::printf("feed:    confirmed %lld ms ago (bound %lld ms)\n", static_cast<long long>(number("feed_staleness_ms")),
                    static_cast<long long>(number("staleness_bound_ms")));
    if (r.contains("shipping")) {
        const auto& s = r["shipping"];
        std::printf("shipping: to %s, %lld sent, %lld dropped, %lld queued, %lld errors\n",
                    s.value("target", std::string("?")).c_str(), static_cast<long long>(s.value("shipped", 0LL)),
                    static_cast<long long>(s.value("dropped", 0LL)), static_cast<long long>(s.value("queued", 0LL)),
                    static_cast<long long>(s.value("errors", 0LL)));
    }
    return health.code;
}

// `vaultfs policy check FILE`: the checks a write of the policy makes, here.
int run_policy_check(const std::string& file)
{
    std::ifstream in(file);
    if (!in)
        return fail("cannot read " + file + ": " + std::strerror(errno));
    std::stringstream ss;
    ss << in.rdbuf();
    vault::SystemNameResolver names;
    auto parsed = policy::Policy::parse(ss.str(), names);
    if (!parsed)
        return fail(file + ": " + parsed.error().message());
    if (!parsed->someone_can_manage(names))
        return fail(file + ": no rule grants manage to anyone who exists: the vault could never be managed again");
    std::printf("%s: OK, %zu rule(s); as stored:\n%s", file.c_str(), parsed->rules().size(), parsed->print().c_str());
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    fs::harden_process();
    spdlog::set_pattern("%l %v");

    CLI::App app{"vaultfs — vaults of versioned secrets, served as files"};
    app.set_version_flag("--version", std::string("vaultfs ") + VAULTFS_VERSION);
    app.require_subcommand(1);

    std::string state = default_state();
    vault::InitOptions init_options;
    auto* init = app.add_subcommand(
        "init", "Create a state directory: with an embedded SoftHSM2 token, or in a token you already have");
    init->add_option("--state", state, "State directory to create, new or empty (default: $VAULTFS_STATE or /var/lib/vaultfs)");
    init->add_option("--module", init_options.module_path, "PKCS#11 module")->capture_default_str();
    auto* label_opt = init->add_option("--token-label", init_options.token_label,
                                       "Adopt this initialised token (never re-initialised) instead of making one");
    init->add_option("--pin-file", init_options.pin_file, "File holding the adopted token's user PIN (mode 0600)")
        ->needs(label_opt);
    label_opt->needs(init->get_option("--pin-file"));
    init->add_option("--admin-group", init_options.admin_group, "Group whose members may create and remove vaults");
    init->add_option("--store", init_options.store,
                     "A new PostgreSQL store (postgresql://...) for several hosts, instead of the SQLite file");
    init->add_option("--host", init_options.host, "With --store: this host's name (default: the system's host name)");
    init->add_option("--so-pin-file", init_options.so_pin_file,
                     "Where to write the embedded token's Security Officer PIN (default: STATE/so-pin, mode 0400)");

    fs::MountOptions mount_options;
    mount_options.state_dir = default_state();
    auto* mount = app.add_subcommand("mount", "Mount the state's vaults and serve them");
    mount->add_option("--state", mount_options.state_dir, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
    mount->add_option("mountpoint", mount_options.mountpoint, "Where to mount")->required();
    mount->add_flag("-f,--foreground", mount_options.foreground, "Stay in the foreground, log to stderr");
    mount->add_option("--threads", mount_options.threads, "FUSE worker threads (default: config `threads`)")
        ->check(CLI::Range(1, 256));
    mount->add_flag("-d,--debug", mount_options.debug, "Log every FUSE request (implies nothing about secrets)");
    mount->add_option("--mount-namespace", mount_options.mount_namespace,
                      "Mount in this mount namespace, e.g. /proc/1/ns/mnt (for a sandboxed systemd service)");
    mount->add_flag("--nonempty", mount_options.nonempty, "Mount over a directory that is not empty (hiding it)");

    std::string restart_state = default_state();
    double restart_wait = 10;
    auto* restart = app.add_subcommand(
        "restart", "Replace the serving process with the binary now on disk, without unmounting");
    restart->add_option("--state", restart_state, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
    restart->add_option("--wait", restart_wait, "Seconds to wait for open writes to finish (default 10)")
        ->check(CLI::Range(0.0, 3600.0));
    bool restart_force = false;
    restart->add_flag("--force", restart_force,
                      "After --wait, restart anyway: the writes still open fail (their close() returns an error)");
    int takeover_socket = -1;
    auto* takeover = app.add_subcommand("takeover", "");  // started by a mount's supervisor; hidden
    takeover->group("");
    takeover->add_option("--socket", takeover_socket)->required();

    auto* audit = app.add_subcommand("audit", "Audit trail tools");
    audit->require_subcommand(1);
    std::vector<std::string> audit_files;
    std::string public_key;
    std::string verify_state;
    auto* verify = audit->add_subcommand("verify", "Check sequence, hash chain, signatures and rotation links");
    verify->add_option("--state", verify_state,
                       "State directory: its audit file, public key and database anchor (default with neither files "
                       "nor --public-key: $VAULTFS_STATE or /var/lib/vaultfs)");
    verify->add_option("--public-key", public_key, "PEM public key (default: the state's)");
    verify->add_option("files", audit_files, "Audit files, oldest first (default: the state's)");
    bool verify_slice = false;
    verify->add_flag("--slice", verify_slice,
                     "The file is a slice `audit export` wrote: trust starts at its first signature, and it must end "
                     "with one");

    // The management plane: these talk to the running daemon.
    std::string mstate = default_state();
    fs::ControlRequest request;
    auto* vault_cmd = app.add_subcommand("vault", "Create, show and list vaults (through the running daemon)");
    vault_cmd->require_subcommand(1);
    auto* vault_create = vault_cmd->add_subcommand("create", "Create a vault (admins)");
    vault_create->add_option("name", request.vault, "Vault name: 3-24 letters, digits, hyphens")->required();
    vault_create->add_option("--retention-days", request.retention_days, "Soft-delete retention, 7-90 days")
        ->check(CLI::Range(7, 90))
        ->capture_default_str();
    vault_create->add_flag("--purge-protection", request.purge_protection,
                           "No purge before retention ends (can never be turned off)");
    auto* vault_show = vault_cmd->add_subcommand("show", "Show a vault's settings, policy and secret count");
    vault_show->add_option("name", request.vault, "Vault name")->required();
    auto* vault_list = vault_cmd->add_subcommand("list", "List the vaults");
    auto* vault_rekey = vault_cmd->add_subcommand(
        "rekey", "Move a vault to a new KEK made now, and destroy the old one (needs manage; audited)");
    vault_rekey->add_option("name", request.vault, "Vault name")->required();
    auto* status = app.add_subcommand("status", "Is it mounted; are the token and the audit trail healthy");
    bool status_json = false;
    status->add_flag("--json", status_json, "Print the status as JSON, for machines");
    std::string target, output, backup_file;
    auto* backup = app.add_subcommand("backup", "Back up a vault or one secret (ciphertext only, signed)");
    backup->add_option("target", target, "VAULT or VAULT/SECRET")->required();
    backup->add_option("-o,--output", output, "File to write (mode 0600; must not exist), or - for stdout")->required();
    auto* policy_cmd = app.add_subcommand("policy", "Vault policies through the management plane");
    policy_cmd->require_subcommand(1);
    std::string owner;
    auto* policy_reset = policy_cmd->add_subcommand(
        "reset", "Break glass: replace a vault's policy with `allow uid:OWNER *` (admins; audited)");
    policy_reset->add_option("vault", request.vault, "Vault name")->required();
    policy_reset->add_option("--owner", owner, "User name or uid to own the vault (default: you)");
    std::string policy_file;
    auto* policy_check = policy_cmd->add_subcommand("check", "Check a policy file as a write would, and print why not");
    policy_check->add_option("file", policy_file, "Policy text")->required();
    auto* policy_set = policy_cmd->add_subcommand("set", "Replace a vault's policy (needs manage; prints the reason "
                                                         "when it is refused)");
    policy_set->add_option("vault", request.vault, "Vault name")->required();
    policy_set->add_option("file", policy_file, "Policy text (- for stdin)")->required();
    auto* restore = app.add_subcommand("restore", "Restore a backup into a vault on the same token");
    restore->add_option("file", backup_file, "Backup file")->required();
    restore->add_option("--into", request.into, "Target vault, made if it does not exist (default: the backup's own)");
    std::string migrate_state = default_state();
    vault::MigrationTarget migration;
    std::vector<std::string> migration_env;
    auto* token_cmd = app.add_subcommand("token", "The state's PKCS#11 token");
    token_cmd->require_subcommand(1);
    auto* migrate = token_cmd->add_subcommand(
        "migrate", "Move the state to another token (the daemon stopped): DEKs re-sealed token to token, a new audit "
                   "signing key handed over to in the audit trail");
    migrate->add_option("--state", migrate_state, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
    bool roll_back = false;
    migrate->add_option("--to-module", migration.module_path, "The target token's PKCS#11 module");
    migrate->add_option("--to-token-label", migration.token_label, "The target token's label (initialised by its owner)");
    migrate->add_option("--pin-file", migration.pin_file, "File holding the target token's user PIN (mode 0600)");
    migrate->add_flag("--roll-back", roll_back, "Put back a state whose migration was interrupted");
    migrate->add_option("--to-module-env", migration_env,
                        "NAME=VALUE set before the target module loads, and kept in vaultfs.conf (e.g. SOFTHSM2_CONF=...)");
    fs::ObjectCommands object_commands(app, default_state());
    fs::HostCommands host_commands(app, default_state());
    fs::MonitorCommands monitor_commands(app, *audit, default_state());
    std::string socket;
    for (auto* sub :
         {vault_create, vault_show, vault_list, vault_rekey, status, backup, restore, policy_reset, policy_set}) {
        sub->add_option("--state", mstate, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
        sub->add_option("--socket", socket, "Control socket (default: the state's control_socket)");
    }

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    }

    if (*init)
        return run_init(state, init_options);
    if (*migrate && roll_back) {
        auto done = vault::roll_back_token_migration(migrate_state);
        if (!done)
            return fail(done.error().message);
        for (const auto& line : *done)
            std::printf("%s\n", line.c_str());
        return 0;
    }
    if (*migrate) {
        if (migration.module_path.empty() || migration.token_label.empty() || migration.pin_file.empty())
            return fail("token migrate needs --to-module, --to-token-label and --pin-file (or --roll-back)");
        for (const auto& kv : migration_env) {
            const auto eq = kv.find('=');
            if (eq == std::string::npos || eq == 0)
                return fail("--to-module-env takes NAME=VALUE, not '" + kv + "'");
            migration.module_env.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
        }
        if (auto heap = hsm::init_secure_heap(command_heap_bytes); !heap)
            return fail(heap.error().message);
        auto done = vault::migrate_token(migrate_state, migration);
        if (!done)
            return fail(done.error().message);
        std::printf("Moved the state in %s to token '%s':\n", vault::absolute_path(migrate_state).c_str(),
                    migration.token_label.c_str());
        for (const auto& line : *done)
            std::printf("  %s\n", line.c_str());
        return 0;
    }
    if (*mount)
        return fs::run_mount(mount_options);
    if (*restart)
        return fs::restart::request_restart(vault::absolute_path(restart_state),
                                            static_cast<unsigned>(restart_wait * 1000), restart_force);
    if (*takeover)
        return fs::run_takeover(takeover_socket);
    if (*verify) {
        // Files (or a public key) alone: a copy shipped elsewhere, checked by itself.
        if (verify_state.empty() && audit_files.empty() && public_key.empty())
            verify_state = default_state();
        if (verify_slice && verify_state.empty() && public_key.empty())
            verify_state = default_state();  // the state's key
        return run_verify(verify_state, audit_files, public_key, verify_slice);
    }
    if (*policy_check)
        return run_policy_check(policy_file);
    if (auto rc = host_commands.run())
        return *rc;
    if (auto rc = monitor_commands.run(manage))
        return *rc;
    if (auto rc = object_commands.run(manage))
        return *rc;

    using C = fs::ControlRequest::Command;
    if (*vault_create) {
        request.command = C::vault_create;
        return manage(mstate, socket, request, [](const nlohmann::json& reply) {
            const auto& r = reply["result"];
            std::printf("created vault %s (retention %d days, purge protection %s)\n",
                        r.value("name", std::string()).c_str(), r.value("retention_days", 0),
                        r.value("purge_protection", false) ? "on" : "off");
            return 0;
        });
    }
    if (*vault_show) {
        request.command = C::vault_show;
        return manage(mstate, socket, request, [](const nlohmann::json& reply) { return print_json(reply["result"]); });
    }
    if (*vault_list) {
        request.command = C::vault_list;
        return manage(mstate, socket, request, [](const nlohmann::json& reply) {
            for (const auto& v : reply["result"])
                std::printf("%s\n", v.value("name", std::string()).c_str());
            return 0;
        });
    }
    if (*vault_rekey) {
        request.command = C::vault_rekey;
        return manage(mstate, socket, request, [](const nlohmann::json& reply) {
            const auto& r = reply["result"];
            std::printf("vault %s rekeyed: %lld row(s) sealed again under KEK %s; KEK %s destroyed\n"
                        "backups made before now name the old KEK and no longer restore: take a new one\n",
                        r.value("vault", std::string()).c_str(), static_cast<long long>(r.value("resealed", 0)),
                        r.value("new_kek", std::string()).c_str(), r.value("old_kek", std::string()).c_str());
            return 0;
        });
    }
    if (*status) {
        // Exit codes for monitoring checks (fs/cli/monitor.hpp Health): 0 OK,
        // 1 warning, 2 critical, 3 unknown (no daemon answered).
        request.command = C::status;
        bool answered = false;
        const int rc = manage(mstate, socket, request, [&](const nlohmann::json& reply) {
            answered = true;
            const auto& result = reply["result"];
            if (!status_json)
                return print_status(result);
            (void)print_json(result);
            return fs::health_of(result).code;
        });
        return answered ? rc : 3;
    }
    if (*policy_set) {
        request.command = C::policy_set;
        if (policy_file == "-") {
            std::stringstream ss;
            ss << std::cin.rdbuf();
            request.policy = ss.str();
        } else {
            std::ifstream in(policy_file);
            if (!in)
                return fail("cannot read " + policy_file + ": " + std::strerror(errno));
            std::stringstream ss;
            ss << in.rdbuf();
            request.policy = ss.str();
        }
        if (request.policy.empty())
            return fail(policy_file + " is empty: a policy must let someone manage the vault");
        return manage(mstate, socket, request, [&](const nlohmann::json& reply) {
            std::printf("policy of %s set; as stored:\n%s", request.vault.c_str(),
                        reply.value("result", std::string()).c_str());
            return 0;
        });
    }
    if (*backup) {
        request.command = C::backup;
        const auto slash = target.find('/');
        request.vault = target.substr(0, slash);
        if (slash != std::string::npos)
            request.secret = target.substr(slash + 1);
        return manage(mstate, socket, request, [&](const nlohmann::json& reply) {
            const std::string doc = reply.value("result", std::string());
            const bool to_stdout = output == "-";
            const int fd = to_stdout ? STDOUT_FILENO : ::open(output.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
            std::size_t done = 0;
            while (fd >= 0 && done < doc.size()) {
                const ssize_t n = ::write(fd, doc.data() + done, doc.size() - done);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    break;
                done += static_cast<std::size_t>(n);
            }
            // A file is synced and closed with its errors checked; stdout is the caller's.
            if (fd < 0 || done != doc.size() || (!to_stdout && (::fsync(fd) != 0 || ::close(fd) != 0)))
                return fail("cannot write " + (to_stdout ? std::string("stdout") : output) + ": " +
                            std::strerror(errno));
            if (!to_stdout)
                std::printf("wrote %s (%zu bytes, ciphertext and sealed keys only)\n", output.c_str(), doc.size());
            return 0;
        });
    }
    if (*policy_reset) {
        request.command = C::policy_reset;
        if (!owner.empty()) {
            vault::SystemNameResolver names;
            std::uint32_t uid = 0;
            const auto [p, ec] = std::from_chars(owner.data(), owner.data() + owner.size(), uid);
            if (ec == std::errc() && p == owner.data() + owner.size())
                request.owner = uid;
            else if (const auto id = names.user_id(owner))
                request.owner = *id;
            else
                return fail("no user " + owner);
        }
        return manage(mstate, socket, request, [&](const nlohmann::json&) {
            std::printf("policy of %s reset: allow uid:%u *\n", request.vault.c_str(),
                        request.owner ? *request.owner : static_cast<unsigned>(::getuid()));
            return 0;
        });
    }
    if (*restore) {
        request.command = C::restore;
        request.backup = read_file(backup_file);
        if (request.backup.empty())
            return fail("cannot read " + backup_file + " (or it is empty)");
        return manage(mstate, socket, request, [&](const nlohmann::json& reply) {
            if (reply.value("created", false))
                std::printf("created vault %s\n", request.into->c_str());
            for (const auto& name : reply["result"])
                if (name.is_string())
                    std::printf("restored %s\n", name.get<std::string>().c_str());
            return 0;
        });
    }
    return 2;
}
