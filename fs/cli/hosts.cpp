#include "fs/cli/hosts.hpp"

#include <fcntl.h>
#include <termios.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <fstream>
#include <sstream>

#include "fs/cli/support.hpp"
#include "fs/control/server.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/state/host_commands.hpp"
#include "vault/state/state.hpp"

namespace vaultfs::fs {

using nlohmann::json;

namespace {

constexpr std::size_t command_heap_bytes = 1 << 20;

// The token's Security Officer PIN: from --so-pin-file, else asked for on
// the terminal (not echoed). Never from argv or the environment.
vault::Result<hsm::SecureBuffer> so_pin(const std::string& file)
{
    if (!file.empty())
        return vault::hosts::read_so_pin(file);
    const int tty = ::open("/dev/tty", O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (tty < 0)
        return vault::fail(vault::Errc::invalid_argument,
                           "this step needs the token's Security Officer PIN: give --so-pin-file FILE (mode 0600 or "
                           "0400), or run it on a terminal");
    const std::string ask = "Security Officer PIN of this host's token: ";
    (void)!::write(tty, ask.data(), ask.size());
    termios saved{};
    const bool terminal = ::tcgetattr(tty, &saved) == 0;
    if (terminal) {
        termios quiet = saved;
        quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
        ::tcsetattr(tty, TCSAFLUSH, &quiet);
    }
    auto pin = hsm::SecureBuffer::allocate(0, 256);
    if (pin && pin->resize(256)) {
        std::size_t n = 0;
        char c = 0;
        while (n < 256 && ::read(tty, &c, 1) == 1 && c != '\n')
            pin->data()[n++] = static_cast<std::uint8_t>(c);
        c = 0;
        (void)pin->resize(n);
    }
    if (terminal)
        ::tcsetattr(tty, TCSAFLUSH, &saved);
    (void)!::write(tty, "\n", 1);
    ::close(tty);
    if (!pin)
        return vault::fail(vault::Errc::out_of_memory, pin.error().message);
    if (pin->size() == 0)
        return vault::fail(vault::Errc::invalid_argument, "no Security Officer PIN given");
    return std::move(*pin);
}

// One request to the daemon; its error as the daemon said it.
vault::Result<json> ask_daemon(const std::string& state, const std::string& socket, const std::string& op,
                               const json& args)
{
    ControlRequest request;
    request.command = ControlRequest::Command::object;
    request.op = op;
    request.args = args.dump();
    auto reply = control_call(state, socket, render_request(request));
    if (!reply)
        return reply;
    if (!reply->value("ok", false))
        return vault::fail(vault::Errc::invalid_argument, reply->value("error", std::string("the daemon refused")) +
                                                              " (" + reply->value("errno", std::string("?")) + ")");
    return reply;
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
    std::string so_pin_file;
    CLI::App* hosts = nullptr;
    CLI::App* list = nullptr;
    CLI::App* remove = nullptr;
    CLI::App* trust = nullptr;
    bool all = false;
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
    o.request->add_option("--so-pin-file", o.init.so_pin_file,
                          "Where to write the embedded token's Security Officer PIN (default: STATE/so-pin)");
    const auto so_opt = [&](CLI::App* sub) {
        sub->add_option("--so-pin-file", o.so_pin_file,
                        "File holding this host's token's Security Officer PIN (default: asked on the terminal)");
    };
    o.grant = o.join->add_subcommand(
        "grant", "On an enrolled host (its daemon running): its token's SO trusts the new host's transport key, "
                 "every vault KEK is wrapped for it; prints the grant");
    state_opt(o.grant);
    so_opt(o.grant);
    o.grant->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    o.grant->add_option("--fingerprint", o.fingerprint,
                        "The fingerprint the new host printed, compared with its admin out of band")
        ->required();
    o.grant->add_option("request", o.file, "The request file (- for stdin)")->required();
    o.accept = o.join->add_subcommand(
        "accept", "On the new host: import the granted KEKs; its token's SO trusts the enrolled hosts");
    state_opt(o.accept);
    so_opt(o.accept);
    o.accept->add_option("grant", o.file, "The grant file (- for stdin)")->required();

    o.hosts = app.add_subcommand("host", "The hosts of a PostgreSQL store");
    o.hosts->require_subcommand(1);
    o.list = o.hosts->add_subcommand("list", "List the store's hosts");
    state_opt(o.list);
    o.remove = o.hosts->add_subcommand("remove", "Remove a host: no KEK is wrapped for it again (through the daemon)");
    state_opt(o.remove);
    o.remove->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    o.remove->add_option("name", o.host, "The host's name")->required();
    o.trust = o.hosts->add_subcommand(
        "trust", "This token's SO trusts another enrolled host's transport key, so that this host hands it KEKs");
    state_opt(o.trust);
    so_opt(o.trust);
    o.trust->add_option("--socket", o.socket, "Control socket (default: the state's control_socket)");
    o.trust->add_option("name", o.host, "The host's name");
    o.trust->add_flag("--all", o.all, "Every enrolled host this token does not trust yet");
}

HostCommands::~HostCommands() = default;

std::optional<int> HostCommands::run()
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
    if (*o.grant) {
        auto text = slurp(o.file);
        if (!text)
            return fail("cannot read " + o.file);
        const json args{{"request", *text}, {"fingerprint", o.fingerprint}};
        // Everything the daemon can check first, before the SO logs in.
        json check = args;
        check["check_only"] = true;
        if (auto r = ask_daemon(o.state, o.socket, "host_grant", check); !r)
            return fail(r.error().message);
        auto pin = so_pin(o.so_pin_file);
        if (!pin)
            return fail(pin.error().message);
        auto grant = vault::hosts::grant_with_trust(o.state, *text, *pin, [&]() -> vault::Result<std::string> {
            auto r = ask_daemon(o.state, o.socket, "host_grant", args);
            if (!r)
                return tl::unexpected(r.error());
            return r->value("result", std::string());
        });
        pin->clear();
        if (!grant)
            return fail(grant.error().message);
        std::printf("%s\n", grant->c_str());
        return 0;
    }
    if (*o.remove) {
        if (auto r = ask_daemon(o.state, o.socket, "host_remove", json{{"host", o.host}}); !r)
            return fail(r.error().message);
        std::printf("removed host %s\n", o.host.c_str());
        return 0;
    }
    if (*o.accept) {
        auto text = slurp(o.file);
        if (!text)
            return fail("cannot read " + o.file);
        auto pin = so_pin(o.so_pin_file);
        if (!pin)
            return fail(pin.error().message);
        auto accepted = vault::hosts::accept_grant(o.state, *text);
        if (!accepted)
            return fail(accepted.error().message);
        std::printf("Joined: %zu KEKs imported into this host's token\n", accepted->imported);
        auto trusted = vault::hosts::trust_hosts(o.state, accepted->to_trust, *pin);
        pin->clear();
        if (!trusted)
            return fail("joined, but the Security Officer step failed: " + trusted.error().message +
                        "; run `vaultfs host trust --all` here, or this host's vaults reach no other host");
        for (const auto& line : *trusted)
            std::printf("%s\n", line.c_str());
        std::printf("Next: vaultfs mount --state %s MOUNTPOINT\n", vault::absolute_path(o.state).c_str());
        return 0;
    }
    if (*o.trust) {
        if (o.host.empty() == !o.all)
            return fail("host trust takes a host's name, or --all");
        auto pin = so_pin(o.so_pin_file);
        if (!pin)
            return fail(pin.error().message);
        auto hosts = vault::hosts::untrusted_hosts(o.state, o.all ? std::string() : o.host);
        if (!hosts) {
            pin->clear();
            return fail(hosts.error().message);
        }
        auto trusted = vault::hosts::trust_hosts(o.state, *hosts, *pin);
        pin->clear();
        if (!trusted)
            return fail(trusted.error().message);
        for (const auto& line : *trusted)
            std::printf("%s\n", line.c_str());
        if (hosts->empty())
            std::printf(o.all ? "every enrolled host is trusted here already\n"
                              : "host %s: its transport key is trusted in this token already\n",
                        o.host.c_str());
        // The daemon records what its token now trusts, and hands on KEKs.
        if (auto r = ask_daemon(o.state, o.socket, "host_trusted", json::object()); !r)
            std::printf("(the daemon did not answer: %s; it records the trust in its audit trail when it starts)\n",
                        r.error().message.c_str());
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
