#include "fs/daemon/daemon.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <linux/fuse.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <sched.h>
#include <thread>

#include "fs/control/server.hpp"
#include "fs/fuse/filesystem.hpp"
#include "fs/daemon/maintenance.hpp"
#include "fs/daemon/mountpoint.hpp"
#include "fs/daemon/process.hpp"
#include "fs/daemon/restart/channel.hpp"
#include "fs/daemon/restart/device_io.hpp"
#include "fs/daemon/restart/supervisor.hpp"
#include "hsm/hex.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/hooks/hooks.hpp"
#include "vault/state/state.hpp"

namespace vaultfs::fs {

namespace {

struct SessionFree {
    void operator()(fuse_session* se) const { fuse_session_destroy(se); }
};

// The FUSE session's arguments, the same for every server of a mount (a
// restart's new process must negotiate what the first did).
std::unique_ptr<fuse_session, SessionFree> new_session(Filesystem& filesystem, bool debug)
{
    std::vector<std::string> arg_text{"vaultfs", "-o", "fsname=vaultfs,subtype=vaultfs,noatime"};
    if (::geteuid() == 0)
        arg_text.insert(arg_text.end(), {"-o", "allow_other"});
    if (debug)
        arg_text.emplace_back("-d");
    std::vector<char*> argv;
    for (auto& a : arg_text)
        argv.push_back(a.data());
    fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
    std::unique_ptr<fuse_session, SessionFree> se(
        fuse_session_new(&args, &Filesystem::operations(), sizeof(fuse_lowlevel_ops), &filesystem));
    fuse_opt_free_args(&args);  // the session keeps what it needs
    return se;
}

Filesystem::Limits limits_of(const vault::Config& conf)
{
    return Filesystem::Limits{conf.max_open_files_per_uid, conf.max_buffered_kib_per_uid * 1024,
                              conf.secure_heap_kib * 1024 / 2, conf.staging_idle};
}

// What a server serves with, however it started.
struct Serving {
    std::string state_dir;
    std::string mountpoint;
    std::string mount_namespace;
    unsigned threads = 0;
    bool foreground = false;
    std::string log_target;
    vault::State* state = nullptr;
    Filesystem* filesystem = nullptr;
    fuse_session* session = nullptr;
    restart::DeviceIo* io = nullptr;
    int supervisor = -1;  // the socket to the supervisor
    vault::Micros hooks_since = vault::now_micros();  // on_change hooks fire for changes after this
    bool mounted_here = false;  // libfuse mounted (and unmounts) it
    int namespace_fd = -1;      // the connection, mounted in mount_namespace
};

// Answers the supervisor's `handover` (fs/daemon/restart/supervisor.hpp) until
// the socket closes: stops taking requests, and either hands over (the
// loop ends, `exported` holds the handles) or refuses and serves on.
class SupervisorLink {
public:
    explicit SupervisorLink(Serving& s) : s_(s), thread_([this] { run(); }) {}
    ~SupervisorLink()
    {
        ::shutdown(s_.supervisor, SHUT_RD);
        thread_.join();
    }
    std::string exported;  // set before the loop is closed for a hand-over

private:
    void run()
    {
        while (auto m = restart::receive_message(s_.supervisor)) {
            if (m->kind != "handover")
                continue;
            const auto wait = std::chrono::milliseconds(m->number("wait_ms"));
            const bool force = m->get("force") == "1";
            const auto deadline = std::chrono::steady_clock::now() + wait;
            std::string why;
            for (;;) {
                if (!s_.io->pause()) {
                    why = "the server is stopping";
                    break;
                }
                why = s_.filesystem->handover_blockers();
                if (why.empty())
                    break;
                if (std::chrono::steady_clock::now() >= deadline && force) {
                    // What they hold never committed: the new server does
                    // not know their handles, so their next write and their
                    // close fail (EBADF).
                    spdlog::warn("restart --force: {} still open after {} ms; handed over without them, they fail",
                                 why, wait.count());
                    why.clear();
                    break;
                }
                s_.io->resume();
                if (std::chrono::steady_clock::now() >= deadline) {
                    why += " still open after " + std::to_string(wait.count()) +
                           " ms (what they hold exists only in this process); try again, give --wait more time, or "
                           "--force";
                    break;
                }
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
            }
            if (why.empty()) {
                exported = s_.filesystem->export_handles();
                if (s_.io->close())
                    return;  // the loop ends; serve() hands over
                why = "the server is stopping";
            }
            spdlog::warn("restart refused: {}", why);
            (void)restart::send_message(s_.supervisor, restart::Message{"refused", {{"reason", why}}, {}});
        }
    }
    Serving& s_;
    std::thread thread_;
};

// `threads = auto`: two workers per CPU this process may run on, at least 4
// and at most 64. One idle worker is woken per request (device_io.hpp), so
// an idle one costs little; four keep fast reads going while two requests
// wait on the token or the database. (On 2 CPUs, 4 clients read as fast
// with 2 workers or 4, and 10-15% slower with 8: measured by scripts/bench.)
unsigned auto_threads()
{
    cpu_set_t set;
    CPU_ZERO(&set);
    const int cpus = ::sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 2;
    return std::clamp(2u * static_cast<unsigned>(std::max(cpus, 1)), 4u, 64u);
}

// Serves until the mount ends or the server hands over; returns the exit status.
int serve(Serving& s, StartupChannel& channel, std::optional<std::string> takeover_note = std::nullopt)
{
    vault::State& state = *s.state;
    reopen_on_sighup(state.audit.get());

    s.filesystem->start_invalidations(s.session);
    const unsigned threads = s.threads != 0              ? s.threads
                             : state.config.threads != 0 ? state.config.threads
                                                         : auto_threads();
    if (!state.store->pages_read_at_open())
        spdlog::info("database {}: as its last clean close left it, its pages were not read again",
                     state.store->path());
    spdlog::info("serving {} at {} ({} threads, DEK cache {}, audit {}, log {}{})", s.state_dir, s.mountpoint, threads,
                 state.deks->enabled() ? "on" : "off", state.config.path_of(state.config.audit_file), s.log_target,
                 takeover_note ? ", " + *takeover_note : std::string());
    channel.ready();
    if (!s.foreground)
        detach_stdio();

    auto control = ControlServer::start(state, *s.filesystem, s.mountpoint);
    if (!control)
        spdlog::error("management commands are unavailable: {}", control.error().message);
    std::unique_ptr<vault::hooks::Runner> hooks;
    if (!state.config.on_change.empty() || !state.config.on_expiry.empty())
        hooks = std::make_unique<vault::hooks::Runner>(state.config.on_change, state.config.on_expiry, *state.store,
                                                       *state.audit, s.hooks_since);
    if (takeover_note)
        (void)restart::send_message(
            s.supervisor, restart::Message{"serving", {{"handles", std::to_string(s.filesystem->open_handles())}}, {}});

    int rc = 0;
    bool handed_over = false;
    std::string exported;
    {
        SupervisorLink link(s);
        Maintenance maintenance(state, *s.filesystem, hooks.get());
        fuse_loop_config* cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_max_threads(cfg, threads);
        // Keep every worker: letting idle ones exit means creating threads again
        // under load, which costs more than the requests.
        fuse_loop_cfg_set_idle_threads(cfg, threads);
        // Each worker reads its own clone of the connection: when this
        // process dies, the kernel fails only the requests it had taken.
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        rc = fuse_session_loop_mt(s.session, cfg);
        fuse_loop_cfg_destroy(cfg);
        handed_over = s.io->loop_ended();
        if (handed_over)
            exported = link.exported;
    }
    if (control)
        control->reset();
    reopen_on_sighup(nullptr);
    const vault::Micros hooks_seen = hooks ? hooks->seen() : vault::now_micros();
    hooks.reset();
    if (handed_over) {
        s.filesystem->wake_pollers();  // the kernel polls again, and the next process answers
        s.filesystem->stop_polls();
        // The next process has the database open: no stamp (integrity_stamp.hpp).
        state.store->leave_unstamped();
        state.close();  // the signed shutdown record
        const std::vector<std::uint8_t> bytes(exported.begin(), exported.end());
        (void)restart::send_message(s.supervisor,
                                    restart::Message{"handles",
                                                     {{"data", hsm::to_hex(bytes)},
                                                      {"hooks_seen", std::to_string(hooks_seen)}},
                                                     {}});
        s.filesystem->stop_invalidations();
        spdlog::info("handed {} over to the next process", s.mountpoint);
        return 0;
    }
    s.filesystem->stop_invalidations();
    // (An unmount from outside has ended the connection: nothing to do, and
    // whatever is mounted at the path now is not this mount.)
    const bool connected = restart::connection_alive(fuse_session_fd(s.session));
    if (s.mounted_here)
        fuse_session_unmount(s.session);
    else if (connected && !s.mount_namespace.empty())
        in_mount_namespace(s.mount_namespace,
                           [&] { return ::umount2(s.mountpoint.c_str(), MNT_DETACH) == 0 ? 0 : errno; });
    else if (connected)
        restart::detach_mount(s.mountpoint);  // a server that took over: libfuse did not mount it
    fuse_remove_signal_handlers(s.session);
    state.close();
    spdlog::info("unmounted {}", s.mountpoint);
    // libfuse reports the signal that ended the loop; SIGINT and SIGTERM are
    // how a daemon is asked to stop, so they end it successfully.
    return rc == 0 || rc == SIGINT || rc == SIGTERM ? 0 : 1;
}

// The first server of a mount: opens the state, mounts, and tells the
// supervisor the connection and its INIT.
int serve_first(const MountOptions& options, const std::string& state_dir, const std::string& mountpoint,
                StartupChannel& channel, const std::string& log_target, vault::StateLock lock, int supervisor)
{
    auto config = vault::load_config(state_dir);
    if (!config) {
        channel.failed(config.error().message);
        return 1;
    }
    if (auto heap = hsm::init_secure_heap(config->secure_heap_kib * 1024); !heap) {
        channel.failed(heap.error().message);
        return 1;
    }
    auto state = vault::State::open(state_dir, vault::State::Purpose::serve, std::move(lock));
    if (!state) {
        channel.failed(state.error().message);
        return 1;
    }
    const auto& conf = (*state)->config;
    Filesystem filesystem(*(*state)->service, limits_of(conf),
                          ObjectServices{(*state)->key_vault.get(), (*state)->certificates.get()});
    auto se = new_session(filesystem, options.debug);
    if (!se) {
        channel.failed("cannot create the FUSE session");
        return 1;
    }
    install_sighup();
    if (fuse_set_signal_handlers(se.get()) != 0) {
        channel.failed("cannot install signal handlers");
        return 1;
    }
    Serving s{state_dir, mountpoint, options.mount_namespace, options.threads, options.foreground, log_target};
    // Root mounts itself (in another mount namespace, there) and hands
    // libfuse the connection as /dev/fd/N: what libfuse would keep of a
    // mount of its own is for its unmount, which a server that hands over
    // never does. Otherwise libfuse mounts (through fusermount3).
    int fuse_fd = -1;
    if (!options.mount_namespace.empty() || ::geteuid() == 0) {
        fuse_fd = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
        const int rc = fuse_fd < 0 ? errno : in_mount_namespace(options.mount_namespace, [&] {
            return mount_fuse_fd(fuse_fd, mountpoint, ::geteuid() == 0);
        });
        if (rc != 0) {
            fuse_remove_signal_handlers(se.get());
            channel.failed("cannot mount at " + mountpoint +
                           (options.mount_namespace.empty() ? "" : " in " + options.mount_namespace) + ": " +
                           std::strerror(rc) + " (is /dev/fuse available, and fuse3 installed?)");
            return 1;
        }
    }
    const std::string mount_target = fuse_fd >= 0 ? "/dev/fd/" + std::to_string(fuse_fd) : mountpoint;
    if (fuse_session_mount(se.get(), mount_target.c_str()) != 0) {
        fuse_remove_signal_handlers(se.get());
        channel.failed("cannot mount at " + mountpoint + " (is /dev/fuse available, and fuse3 installed?)");
        return 1;
    }
    s.mounted_here = fuse_fd < 0;
    restart::DeviceIo io;
    if (!io.install(se.get(), fuse_session_fd(se.get()))) {
        if (s.mounted_here)
            fuse_session_unmount(se.get());
        else if (options.mount_namespace.empty())
            restart::detach_mount(mountpoint);
        channel.failed("cannot set up the FUSE connection's io");
        return 1;
    }
    // The supervisor keeps the connection and its INIT for the next server.
    (void)restart::send_message(supervisor, restart::Message{"device", {}, {fuse_session_fd(se.get())}});
    io.on_init([supervisor](const restart::InitExchange& init) {
        (void)restart::send_message(supervisor, restart::Message{"init",
                                                                 {{"request", hsm::to_hex(init.request)},
                                                                  {"reply", hsm::to_hex(init.reply)}},
                                                                 {}});
        (void)restart::send_message(supervisor, restart::Message{"serving", {}, {}});
    });
    s.state = state->get();
    s.filesystem = &filesystem;
    s.session = se.get();
    s.io = &io;
    s.supervisor = supervisor;
    return serve(s, channel);
}

// Where the binary this process runs was started from (what a restart
// starts: by then, maybe a newer file at the same path).
std::string own_binary()
{
    char buf[4096];
    const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("/proc/self/exe");
}

}  // namespace

int run_mount(const MountOptions& options)
{
    const std::string mountpoint = vault::absolute_path(options.mountpoint);
    const std::string state_dir = vault::absolute_path(options.state_dir);
    StartupChannel channel = options.foreground ? StartupChannel() : daemonize();
    const std::string log_target = setup_logging(options.foreground, state_dir);

    auto config = vault::load_config(state_dir);
    if (!config) {
        channel.failed(config.error().message);
        return 1;
    }
    // One process serves a state: a second mount stops here, naming the first.
    auto lock = vault::StateLock::acquire(state_dir);
    if (!lock) {
        channel.failed(lock.error().message);
        return 1;
    }
    std::string stale_error;
    if (const int rc = in_mount_namespace(options.mount_namespace,
                                          [&] { return clean_stale_mount(mountpoint, stale_error) ? 0 : EEXIST; });
        rc != 0) {
        channel.failed(stale_error.empty() ? "cannot enter mount namespace " + options.mount_namespace + ": " +
                                                 std::strerror(rc)
                                           : stale_error);
        return 1;
    }
    // Mounting over files would hide them (and whoever uses them).
    if (!options.nonempty && options.mount_namespace.empty() && has_entries(mountpoint)) {
        channel.failed(mountpoint + " is not empty: mounting there would hide what it holds; choose an empty "
                                    "directory, or pass --nonempty");
        return 1;
    }
    // This process stays as the supervisor (fs/daemon/restart/supervisor.hpp); a
    // child serves.
    int sp[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0) {
        channel.failed(std::string("socketpair: ") + std::strerror(errno));
        return 1;
    }
    const std::string binary = own_binary();
    const pid_t supervisor = ::getpid();
    const pid_t server = ::fork();
    if (server < 0) {
        channel.failed(std::string("fork: ") + std::strerror(errno));
        return 1;
    }
    if (server == 0) {
        ::close(sp[0]);
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != supervisor)
            return 1;
        return serve_first(options, state_dir, mountpoint, channel, log_target, std::move(*lock), sp[1]);
    }
    ::close(sp[1]);
    channel.abandon();  // the server reports start-up
    if (!options.foreground)
        detach_stdio();
    restart::SupervisorOptions so;
    so.state_dir = state_dir;
    so.mountpoint = mountpoint;
    so.mount_namespace = options.mount_namespace;
    so.binary = binary;
    so.threads = options.threads;
    so.debug = options.debug;
    so.foreground = options.foreground;
    so.server_socket = sp[0];
    so.server = server;
    return restart::supervise(std::move(so), std::move(*lock));
}

int run_takeover(int socket)
{
    auto hello = restart::receive_message(socket, 10000);
    if (!hello || hello->kind != "hello" || hello->fds.size() < 2) {
        std::fprintf(stderr, "vaultfs takeover: no hello from the supervisor\n");
        return 1;
    }
    const auto refuse = [&](const std::string& reason) {
        spdlog::error("restart refused: {}", reason);
        (void)restart::send_message(socket, restart::Message{"refused", {{"reason", reason}}, {}});
        return 1;
    };
    if (hello->get("protocol") != std::to_string(restart::protocol_version))
        return refuse("the supervisor speaks restart protocol " + hello->get("protocol") + ", this binary " +
                      std::to_string(restart::protocol_version) + ": remount to change it");
    const int device = hello->fds[0];
    vault::StateLock lock = vault::StateLock::adopt(hello->fds[1]);
    const std::string mode = hello->get("mode");
    const std::string state_dir = hello->get("state");
    const std::string mountpoint = hello->get("mountpoint");
    const bool foreground = hello->get("foreground") == "1";
    const std::string log_target = setup_logging(foreground, state_dir);
    StartupChannel channel;

    auto config = vault::load_config(state_dir);
    if (!config)
        return refuse(config.error().message);
    if (auto heap = hsm::init_secure_heap(config->secure_heap_kib * 1024); !heap)
        return refuse(heap.error().message);
    auto state = vault::State::open(state_dir, vault::State::Purpose::take_over, std::move(lock));
    if (!state)
        return refuse(state.error().message);
    // From here an abort leaves the database to the running server: no stamp.
    struct Unstamped {
        vault::State& st;
        bool keep = true;
        ~Unstamped()
        {
            if (keep)
                st.store->leave_unstamped();
        }
    } unstamped{**state};
    const auto& conf = (*state)->config;
    Filesystem filesystem(*(*state)->service, limits_of(conf),
                          ObjectServices{(*state)->key_vault.get(), (*state)->certificates.get()});
    auto se = new_session(filesystem, hello->get("debug") == "1");
    restart::DeviceIo io;
    if (!se || !io.install(se.get(), device))
        return refuse("cannot create the FUSE session");
    const auto request = hsm::from_hex(hello->get("init_request"));
    const auto saved = hsm::from_hex(hello->get("init_reply"));
    if (!request || !saved)
        return refuse("the supervisor's INIT exchange is malformed");
    const auto reply = io.replay_init(restart::InitExchange{*request, *saved});
    if (reply != *saved)
        return refuse("this binary negotiates other FUSE options than the mount's (" +
                      restart::init_difference(*saved, reply) + "); they take effect at the next mount");
    install_sighup();
    if (fuse_set_signal_handlers(se.get()) != 0)
        return refuse("cannot install signal handlers");
    filesystem.number_from(hello->number("generation") << 40);

    std::string exported;
    vault::Micros hooks_since = vault::now_micros();
    if (mode == "graceful") {
        (void)restart::send_message(socket, restart::Message{"ready", {}, {}});
        auto m = restart::receive_message(socket);
        if (!m || m->kind != "handles") {
            spdlog::info("restart abandoned: the running server serves on");
            return 1;
        }
        const auto bytes = hsm::from_hex(m->get("data"));
        if (bytes)
            exported.assign(bytes->begin(), bytes->end());
        if (const auto seen = m->number("hooks_seen"); seen != 0)
            hooks_since = static_cast<vault::Micros>(seen);
    }
    unstamped.keep = false;
    const std::size_t adopted = filesystem.adopt(exported);
    vault::audit::Log::Notes notes{{"restart", mode},
                                   {"previous_pid", static_cast<std::uint64_t>(hello->number("previous"))},
                                   {"handles", static_cast<std::uint64_t>(adopted)}};
    if (auto r = (*state)->start_audit(std::move(notes)); !r) {
        spdlog::error("cannot start the audit log: {}; not serving (fail closed)", r.error().message);
        return 1;
    }
    Serving s{state_dir, mountpoint, hello->get("mount_namespace"), static_cast<unsigned>(hello->number("threads")),
              foreground, log_target};
    s.state = state->get();
    s.filesystem = &filesystem;
    s.session = se.get();
    s.io = &io;
    s.supervisor = socket;
    s.hooks_since = hooks_since;
    return serve(s, channel, "taken over after " + std::string(mode == "crash" ? "a crash" : "a restart") + " (" +
                                 std::to_string(adopted) + " open file(s) kept)");
}

}  // namespace vaultfs::fs
