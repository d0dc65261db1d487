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
#include <sstream>

#include "fs/control.hpp"
#include "fs/control_protocol.hpp"
#include "fs/daemon.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/audit/log.hpp"
#include "vault/audit/verify.hpp"
#include "vault/signing.hpp"
#include "vault/state.hpp"

namespace {

using namespace vaultfs;

// Locked memory for the short-lived commands (PINs only).
constexpr std::size_t command_heap_bytes = 1 << 20;

int fail(const std::string& message)
{
    std::fprintf(stderr, "vaultfs: %s\n", message.c_str());
    return 1;
}

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

int run_verify(const std::string& state, std::vector<std::string> files, std::string public_key)
{
    vault::audit::VerifyOptions options;
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
        if (files.empty())
            files.push_back(live_file);
        if (const auto daemon = vault::StateLock::holder(dir))
            notes.push_back("the daemon (pid " + std::to_string(*daemon) + ") is running");
        auto store = vault::Store::open(config->path_of(config->database), vault::Store::Mode::read_only);
        if (!store)
            return fail(store.error().message);
        auto a = (*store)->audit_anchor();
        if (!a)
            return fail(a.error().message);
        options.anchor = *a;
        options.anchor_expected = true;
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
        return fail("name audit files, or a state directory with --state");
    if (pem.empty()) {
        if (public_key.empty())
            return fail("--public-key is needed without --state");
        pem = read_file(public_key);
        if (pem.empty())
            return fail("cannot read the public key " + public_key);
    }

    const auto report = vault::audit::verify_files(files, pem, options);
    for (const auto& n : notes)
        std::printf("note: %s\n", n.c_str());
    for (const auto& w : report.warnings)
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
    std::printf("OK: %llu records, %llu signed, chain intact%s; %s\n", static_cast<unsigned long long>(report.records),
                static_cast<unsigned long long>(report.signed_records),
                options.anchor ? ", reaches the signed database anchor" : "", tail.c_str());
    return 0;
}

// Sends a management request and prints the reply: `show` formats the
// result; errors go to stderr with the errno name. Returns the exit status.
int manage(const std::string& state, const std::string& socket, const fs::ControlRequest& request,
           const std::function<void(const nlohmann::json&)>& show)
{
    auto reply = fs::control_call(state, socket, fs::render_request(request));
    if (!reply)
        return fail(reply.error().message);
    if (!(*reply).value("ok", false))
        return fail((*reply).value("error", std::string("failed")) + " (" + (*reply).value("errno", std::string("?")) + ")");
    show((*reply)["result"]);
    return 0;
}

void print_json(const nlohmann::json& j) { std::printf("%s\n", j.dump(2).c_str()); }

std::string default_state()
{
    const char* env = std::getenv("VAULTFS_STATE");
    return env != nullptr ? env : "/var/lib/vaultfs";
}

}  // namespace

int main(int argc, char** argv)
{
    fs::harden_process();
    spdlog::set_pattern("%l %v");

    CLI::App app{"vaultfs — vaults of versioned secrets, served as files"};
    app.set_version_flag("--version", std::string("vaultfs ") + VAULTFS_VERSION);
    app.require_subcommand(1);

    std::string state;
    vault::InitOptions init_options;
    auto* init = app.add_subcommand("init", "Create a state directory with an embedded SoftHSM2 token");
    init->add_option("--state", state, "State directory to create (new or empty)")->required();
    init->add_option("--module", init_options.module_path, "PKCS#11 module")->capture_default_str();
    init->add_option("--admin-group", init_options.admin_group, "Group whose members may create and remove vaults");

    fs::MountOptions mount_options;
    auto* mount = app.add_subcommand("mount", "Mount the state's vaults and serve them");
    mount->add_option("--state", mount_options.state_dir, "State directory")->required();
    mount->add_option("mountpoint", mount_options.mountpoint, "Where to mount")->required();
    mount->add_flag("-f,--foreground", mount_options.foreground, "Stay in the foreground, log to stderr");
    mount->add_option("--threads", mount_options.threads, "FUSE worker threads (default: config `threads`)")
        ->check(CLI::Range(1, 256));
    mount->add_flag("-d,--debug", mount_options.debug, "Log every FUSE request (implies nothing about secrets)");
    mount->add_option("--mount-namespace", mount_options.mount_namespace,
                      "Mount in this mount namespace, e.g. /proc/1/ns/mnt (for a sandboxed systemd service)");

    auto* audit = app.add_subcommand("audit", "Audit trail tools");
    audit->require_subcommand(1);
    std::vector<std::string> audit_files;
    std::string public_key;
    std::string verify_state;
    auto* verify = audit->add_subcommand("verify", "Check sequence, hash chain, signatures and rotation links");
    verify->add_option("--state", verify_state, "State directory: its audit file, public key and database anchor");
    verify->add_option("--public-key", public_key, "PEM public key (default: the state's)");
    verify->add_option("files", audit_files, "Audit files, oldest first (default: the state's)");

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
    auto* status = app.add_subcommand("status", "Is it mounted; are the token and the audit trail healthy");
    std::string target, output, backup_file;
    auto* backup = app.add_subcommand("backup", "Back up a vault or one secret (ciphertext only, signed)");
    backup->add_option("target", target, "VAULT or VAULT/SECRET")->required();
    backup->add_option("-o,--output", output, "File to write (mode 0600)")->required();
    auto* policy_cmd = app.add_subcommand("policy", "Vault policies through the management plane");
    policy_cmd->require_subcommand(1);
    std::string owner;
    auto* policy_reset = policy_cmd->add_subcommand(
        "reset", "Break glass: replace a vault's policy with `allow uid:OWNER *` (admins; audited)");
    policy_reset->add_option("vault", request.vault, "Vault name")->required();
    policy_reset->add_option("--owner", owner, "User name or uid to own the vault (default: you)");
    auto* restore = app.add_subcommand("restore", "Restore a backup into a vault on the same token");
    restore->add_option("file", backup_file, "Backup file")->required();
    restore->add_option("--into", request.into, "Target vault (default: the backup's own)");
    std::string socket;
    for (auto* sub : {vault_create, vault_show, vault_list, status, backup, restore, policy_reset}) {
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
    if (*mount)
        return fs::run_mount(mount_options);
    if (*verify)
        return run_verify(verify_state, audit_files, public_key);

    using C = fs::ControlRequest::Command;
    if (*vault_create) {
        request.command = C::vault_create;
        return manage(mstate, socket, request, [](const nlohmann::json& r) {
            std::printf("created vault %s (retention %d days, purge protection %s)\n",
                        r.value("name", std::string()).c_str(), r.value("retention_days", 0),
                        r.value("purge_protection", false) ? "on" : "off");
        });
    }
    if (*vault_show) {
        request.command = C::vault_show;
        return manage(mstate, socket, request, print_json);
    }
    if (*vault_list) {
        request.command = C::vault_list;
        return manage(mstate, socket, request, [](const nlohmann::json& r) {
            for (const auto& v : r)
                std::printf("%s\n", v.value("name", std::string()).c_str());
        });
    }
    if (*status) {
        request.command = C::status;
        return manage(mstate, socket, request, print_json);
    }
    if (*backup) {
        request.command = C::backup;
        const auto slash = target.find('/');
        request.vault = target.substr(0, slash);
        if (slash != std::string::npos)
            request.secret = target.substr(slash + 1);
        return manage(mstate, socket, request, [&](const nlohmann::json& r) {
            const std::string doc = r.get<std::string>();
            const int fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
            if (fd < 0 || ::write(fd, doc.data(), doc.size()) != static_cast<ssize_t>(doc.size()) || ::fsync(fd) != 0) {
                std::fprintf(stderr, "vaultfs: cannot write %s: %s\n", output.c_str(), std::strerror(errno));
                std::exit(1);
            }
            ::close(fd);
            std::printf("wrote %s (%zu bytes, ciphertext and sealed keys only)\n", output.c_str(), doc.size());
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
        });
    }
    if (*restore) {
        request.command = C::restore;
        request.backup = read_file(backup_file);
        if (request.backup.empty())
            return fail("cannot read " + backup_file);
        return manage(mstate, socket, request, [](const nlohmann::json& r) {
            for (const auto& name : r)
                std::printf("restored %s\n", name.get<std::string>().c_str());
        });
    }
    return 2;
}
