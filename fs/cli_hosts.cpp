#include "fs/cli_hosts.hpp"

#include <cstdio>
#include <ctime>
#include <fstream>
#include <sstream>

#include "hsm/secure_buffer.hpp"
#include "vault/hosts/commands.hpp"
#include "vault/state.hpp"

namespace vaultfs::fs {

using nlohmann::json;

namespace {

constexpr std::size_t command_heap_bytes = 1 << 20;

int fail(const std::string& message)
{
    std::fprintf(stderr, "vaultfs: %s\n", message.c_str());
    return 1;
}

std::optional<std::string> slurp(const std::string& path)
{
    std::ifstream in(path == "-" ? "/dev/stdin" : path);
    if (!in)
        return std::nullopt;
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::string when(std::int64_t micros)
{
    const std::time_t t = static_cast<std::time_t>(micros / 1000000);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
    return buf;
}

}  // namespace

struct HostCommands::Options {
    std::string state;
    std::string socket;
    CLI::App* migrate = nullptr;
    std::string to;
    std::string host;
    CLI::App* join = nullptr;
    CLI::App* request = nullptr;
    CLI::App* grant = nullptr;
    CLI::App* accept = nullptr;
    vault::InitOptions init;
    std::string fingerprint;
    std::string file;
    CLI::App* hosts = nullptr;
    CLI::App* list = nullptr;
    CLI::App* remove = nullptr;
};

HostCommands::HostCommands(CLI::App& app, const std::string& default_state) : o_(std::make_unique<Options>())
{
    auto& o = *o_;
    o.state = default_state;
    const auto state_opt = [&](CLI::App* sub) {
        sub->add_option("--state", o.state, "State directory (default: $VAULTFS_STATE or /var/lib/vaultfs)");
    };
    o.migrate = app.add_subcommand("migrate", "Copy the state's SQLite store into PostgreSQL (the daemon stopped) "
                                              "and use it from now on");
    state_opt(o.migrate);
    o.migrate->add_option("--to", o.to, "postgresql:// connection string of an empty database")->required();
    o.migrate->add_option("--host", o.host, "This host's name in the store (default: the system's host name)");

    o.join = app.add_subcommand("join", "Enrol another host in a PostgreSQL store: request, grant, accept");
    o.join->require_subcommand(1);
    o.request = o.join->add_subcommand(
        "request", "On the new host: make its state and transport key, and print the join request");
    state_opt(o.request);
    o.request->add_option("--store", o.init.store, "postgresql:// connection string of the shared store")->required();
    o.request->add_option("--host", o.init.host, "This host's name in the store (default: the system's host name)");
    o.request->add_option("--module", o.init.module_path, "PKCS#11 module")->capture_default_str();
    auto* label = o.request->add_option("--token-label", o.init.token_label, "Adopt this initialised token");
    o.request->add_option("--pin-file", o.init.pin_file, "The adopted token's user PIN file (mode 0600)")->needs(label);
    o.request->add_option("--admin-group", o.init.admin_group, "Group whose members may create and remove vaults");
    o.grant = o.join->add_subcommand(
        "grant", "On an enrolled host (its daemon running): wrap every vault KEK for the request, print the grant");
    state_opt(o.grant);
    o.grant->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    o.grant->add_option("--fingerprint", o.fingerprint,
                        "The fingerprint the new host printed, compared out of band (refused if it differs)");
    o.grant->add_option("request", o.file, "The request file (- for stdin)")->required();
    o.accept = o.join->add_subcommand("accept", "On the new host: import the granted KEKs into its token");
    state_opt(o.accept);
    o.accept->add_option("grant", o.file, "The grant file (- for stdin)")->required();

    o.hosts = app.add_subcommand("host", "The hosts of a PostgreSQL store");
    o.hosts->require_subcommand(1);
    o.list = o.hosts->add_subcommand("list", "List the store's hosts");
    state_opt(o.list);
    o.remove = o.hosts->add_subcommand("remove", "Remove a host: no KEK is wrapped for it again (through the daemon)");
    state_opt(o.remove);
    o.remove->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    o.remove->add_option("name", o.host, "The host's name")->required();
}

HostCommands::~HostCommands() = default;

std::optional<int> HostCommands::run(const ManageFn& manage)
{
    auto& o = *o_;
    const bool any = *o.migrate || *o.join || *o.hosts;
    if (!any)
        return std::nullopt;
    if (auto heap = hsm::init_secure_heap(command_heap_bytes); !heap)
        return fail(heap.error().message);
    if (*o.migrate) {
        auto done = vault::hosts::migrate_store(o.state, o.to, o.host);
        if (!done)
            return fail(done.error().message);
        std::printf("Moved the store of %s to PostgreSQL:\n", vault::absolute_path(o.state).c_str());
        for (const auto& line : *done)
            std::printf("  %s\n", line.c_str());
        return 0;
    }
    if (*o.request) {
        o.init.join = true;
        std::string request;
        auto made = vault::init_state(o.state, o.init, &request);
        if (!made)
            return fail(made.error().message);
        std::fprintf(stderr, "Initialised vaultfs state in %s, asking to join:\n", vault::absolute_path(o.state).c_str());
        for (const auto& line : *made)
            std::fprintf(stderr, "  %s\n", line.c_str());
        std::fprintf(stderr, "Next: send the request (stdout) to an enrolled host's admin: vaultfs join grant\n");
        std::printf("%s\n", request.c_str());
        return 0;
    }
    if (*o.grant || *o.remove) {
        ControlRequest request;
        request.command = ControlRequest::Command::object;
        json args;
        if (*o.grant) {
            auto text = slurp(o.file);
            if (!text)
                return fail("cannot read " + o.file);
            args = json{{"request", *text}, {"fingerprint", o.fingerprint}};
            request.op = "host_grant";
        } else {
            args = json{{"host", o.host}};
            request.op = "host_remove";
        }
        request.args = args.dump();
        return manage(o.state, o.socket, request, [&](const json& reply) {
            if (*o.grant)
                std::printf("%s\n", reply.value("result", std::string()).c_str());
            else
                std::printf("removed host %s\n", o.host.c_str());
            return 0;
        });
    }
    if (*o.accept) {
        auto text = slurp(o.file);
        if (!text)
            return fail("cannot read " + o.file);
        auto n = vault::hosts::accept_grant(o.state, *text);
        if (!n)
            return fail(n.error().message);
        std::printf("Joined: %zu KEKs imported into this host's token\n", *n);
        std::printf("Next: vaultfs mount --state %s MOUNTPOINT\n", vault::absolute_path(o.state).c_str());
        return 0;
    }
    if (*o.list) {
        auto hosts = vault::hosts::list_hosts(o.state);
        if (!hosts)
            return fail(hosts.error().message);
        for (const auto& h : *hosts)
            std::printf("%-20s %-9s %s%s\n", h.name.c_str(), h.status.c_str(),
                        h.enrolled ? ("enrolled " + when(*h.enrolled)).c_str() : ("asked " + when(h.requested)).c_str(),
                        h.enrolled_by && *h.enrolled_by != h.name ? (" by " + *h.enrolled_by).c_str() : "");
        return 0;
    }
    return std::nullopt;
}

}  // namespace vaultfs::fs
