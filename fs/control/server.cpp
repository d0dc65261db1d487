#include "fs/control/server.hpp"
#include "fs/control/objects.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>

#include "fs/control/protocol.hpp"
#include "fs/fuse/filesystem.hpp"
#include "fs/control/metrics.hpp"
#include "hsm/secure_buffer.hpp"

namespace vaultfs::fs {

using json = nlohmann::json;

namespace {

bool make_address(const std::string& path, sockaddr_un& addr)
{
    if (path.size() >= sizeof addr.sun_path)
        return false;
    std::memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    return true;
}

using Clock = std::chrono::steady_clock;

// Waits until `fd` is ready for `events`, the deadline passes (false) or the
// server stops (false).
bool wait_for(int fd, short events, int stop_fd, Clock::time_point deadline)
{
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0)
            return false;
        pollfd fds[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
        const int n = ::poll(fds, stop_fd >= 0 ? 2 : 1, static_cast<int>(left));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || (stop_fd >= 0 && fds[1].revents != 0))
            return false;
        return true;
    }
}

bool send_all(int fd, const std::string& data, int stop_fd, Clock::time_point deadline)
{
    std::size_t done = 0;
    while (done < data.size()) {
        if (!wait_for(fd, POLLOUT, stop_fd, deadline))
            return false;
        const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n <= 0)
            return false;
        done += static_cast<std::size_t>(n);
    }
    return true;
}

// Reads until the peer shuts down its side, up to `limit` bytes.
bool receive_all(int fd, std::string& out, std::size_t limit, int stop_fd, Clock::time_point deadline)
{
    char buf[65536];
    for (;;) {
        if (!wait_for(fd, POLLIN, stop_fd, deadline))
            return false;
        const ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < 0)
            return false;
        if (n == 0)
            return true;
        out.append(buf, static_cast<std::size_t>(n));
        if (out.size() > limit)
            return false;
    }
}

vault::Caller peer_of(int fd)
{
    vault::Caller caller;
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        caller.who.uid = static_cast<uid_t>(-1);
        caller.who.gid = static_cast<gid_t>(-1);
        caller.who.groups_known = false;
        return caller;
    }
    caller.who.uid = cred.uid;
    caller.who.gid = cred.gid;
    caller.pid = cred.pid;
    std::vector<gid_t> groups(256);
    socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
        groups.resize(glen / sizeof(gid_t));
    } else {
        groups.clear();
        caller.who.groups_known = false;
    }
    caller.who.groups = std::move(groups);
    return caller;
}


json vault_json(const vault::VaultView& v)
{
    return json{{"name", v.name},
                {"created", v.created},
                {"retention_days", v.settings.retention_days},
                {"purge_protection", v.settings.purge_protection},
                {"rekey_after_days", v.settings.rekey_after_days},
                {"kek_created", v.kek_created}};
}

}  // namespace

json error_reply(const vault::Error& e)
{
    return json{{"ok", false}, {"errno", std::string(vault::result_name(e.code))}, {"error", e.message}};
}

// An error reply that names the thing, what went wrong and what to do: the
// service's own message when it has one, else a sentence for the code.
json failure(const vault::Error& e, const std::string& what)
{
    using vault::Errc;
    std::string text;
    switch (e.code) {
    case Errc::not_found:
        text = what + " does not exist, or you cannot see it (`vaultfs vault list` shows the vaults)";
        break;
    case Errc::already_exists:
        text = what + " already exists";
        break;
    case Errc::access_denied:
        text = what + ": permission denied (the vault's policy does not grant it to you)";
        break;
    case Errc::audit_unavailable:
        text = what + ": the audit trail cannot be written, so nothing was done; see `vaultfs status` and the "
                      "daemon's log";
        break;
    case Errc::key_unavailable:
        text = what + ": the token cannot be used; see `vaultfs status` and the daemon's log";
        break;
    case Errc::storage:
    case Errc::no_space:
        text = what + ": the database failed; see the daemon's log";
        break;
    case Errc::busy:
        text = what + ": busy; try again";
        break;
    default:
        text = what + ": " + std::string(vault::result_name(e.code));
        break;
    }
    if (!e.message.empty() && e.code != Errc::not_found && e.code != Errc::access_denied)
        text = what + ": " + e.message;
    else if (!e.message.empty())
        text += " (" + e.message + ")";
    return error_reply({e.code, text});
}

vault::Result<std::unique_ptr<ControlServer>> ControlServer::start(vault::State& state, const Filesystem& filesystem,
                                                                   std::string mountpoint)
{
    const std::string path = state.config.path_of(state.config.control_socket);
    sockaddr_un addr{};
    if (!make_address(path, addr))
        return vault::fail(vault::Errc::invalid_argument, "control_socket path is too long: " + path);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return vault::fail(vault::Errc::storage, std::string("socket: ") + std::strerror(errno));
    ::unlink(path.c_str());  // a stale socket from a daemon that died
    const mode_t old = ::umask(0);
    const int bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
    ::umask(old);
    if (bound != 0 || ::chmod(path.c_str(), 0666) != 0 || ::listen(fd, 16) != 0) {
        const std::string why = std::strerror(errno);
        ::close(fd);
        return vault::fail(vault::Errc::storage, "cannot listen on " + path + ": " + why);
    }
    const int stop = ::eventfd(0, EFD_CLOEXEC);
    return std::unique_ptr<ControlServer>(new ControlServer(state, filesystem, fd, stop, path, std::move(mountpoint)));
}

ControlServer::ControlServer(vault::State& state, const Filesystem& filesystem, int listen_fd, int stop_fd,
                             std::string path, std::string mountpoint)
    : state_(state),
      filesystem_(filesystem),
      listen_fd_(listen_fd),
      stop_fd_(stop_fd),
      path_(std::move(path)),
      mountpoint_(std::move(mountpoint))
{
    thread_ = std::thread([this] { serve(); });
}

ControlServer::~ControlServer()
{
    const std::uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof one);
    thread_.join();
    ::close(listen_fd_);
    ::close(stop_fd_);
    ::unlink(path_.c_str());
}

bool ControlServer::admit(uid_t uid, bool admin)
{
    std::lock_guard lock(clients_mutex_);
    int& mine = clients_by_uid_[uid];
    if (clients_ >= max_clients || mine >= max_clients_per_uid || (!admin && outsiders_ >= max_outsider_clients)) {
        if (mine == 0)
            clients_by_uid_.erase(uid);
        return false;
    }
    ++clients_;
    ++mine;
    if (!admin)
        ++outsiders_;
    return true;
}

void ControlServer::leave(uid_t uid, bool admin)
{
    std::lock_guard lock(clients_mutex_);
    --clients_;
    if (!admin)
        --outsiders_;
    if (--clients_by_uid_[uid] <= 0)
        clients_by_uid_.erase(uid);
}

void ControlServer::serve()
{
    const auto reap = [&](bool all) {
        for (auto it = workers_.begin(); it != workers_.end();) {
            if (all || it->first->load()) {
                it->second.join();
                it = workers_.erase(it);
            } else {
                ++it;
            }
        }
    };
    for (;;) {
        pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
        // Wake now and then to join finished clients.
        if (::poll(fds, 2, 1000) < 0) {
            if (errno == EINTR)
                continue;
            spdlog::error("control socket: poll failed: {}", std::strerror(errno));
            break;
        }
        reap(false);
        if (fds[1].revents != 0)
            break;
        if (fds[0].revents == 0)
            continue;
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) {
            // Out of descriptors (EMFILE, ENFILE): do not spin; try again shortly.
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
            continue;
        }
        const vault::Caller caller = peer_of(fd);
        const bool admin = state_.service->is_admin(caller);
        if (!admit(caller.who.uid, admin)) {
            // Busy: say so at once, read nothing, keep no one waiting.
            vault::Errc busy = vault::Errc::busy;
            (void)state_.service->audit_management(caller, "control", "", false, "busy", &busy);
            send_all(fd, error_reply({busy, "the control socket is busy (too many clients); try again"}).dump(), -1,
                     Clock::now() + std::chrono::seconds(1));
            ::close(fd);
            continue;
        }
        auto done = std::make_shared<std::atomic<bool>>(false);
        try {
            workers_.emplace_back(done, std::thread([this, fd, caller, admin, done] {
                handle(fd, caller);
                leave(caller.who.uid, admin);
                done->store(true);
            }));
        } catch (const std::exception& e) {
            spdlog::error("control socket: cannot start a client thread: {}", e.what());
            leave(caller.who.uid, admin);
            ::close(fd);
        }
    }
    reap(true);
}

void ControlServer::handle(int fd, const vault::Caller& caller)
{
    const auto deadline = Clock::now() + ControlServer::deadline;
    try {
        auto& service = *state_.service;
        const bool admin = service.is_admin(caller);
        // Read the request even from a refused caller: closing with unread
        // data would reset the connection before the refusal arrives.
        std::string text;
        const bool readable = receive_all(fd, text, admin ? max_request_size : 64 * 1024, stop_fd_, deadline);
        json reply;
        if (!admin) {
            vault::Errc denied = vault::Errc::access_denied;
            (void)service.audit_management(caller, "control", "", false, "not-admin", &denied);
            reply = error_reply({denied, "the control socket serves uid 0 and the admin group only"});
        } else if (!readable) {
            reply = error_reply({vault::Errc::invalid_argument,
                                 "request unreadable, too large, or not sent within " +
                                     std::to_string(ControlServer::deadline.count()) + " s"});
        } else {
            reply = dispatch(caller, text);
        }
        send_all(fd, reply.dump(-1, ' ', false, json::error_handler_t::replace), stop_fd_,
                 Clock::now() + ControlServer::deadline);
    } catch (const std::exception& e) {
        spdlog::error("control socket: {}", e.what());
    }
    ::close(fd);
}

json ControlServer::dispatch(const vault::Caller& caller, const std::string& text)
{
    auto& service = *state_.service;
    auto request = parse_request(text);
    if (!request) {
        vault::Errc bad = vault::Errc::invalid_argument;
        (void)service.audit_management(caller, "control", "", true, "admin", &bad);
        return error_reply({bad, "the request: " + request.error()});
    }
    using C = ControlRequest::Command;
    switch (request->command) {
    case C::vault_create: {
        auto v = service.create_vault(caller, request->vault,
                                      vault::VaultSettings{request->retention_days, request->purge_protection});
        if (!v)
            return failure(v.error(), "vault " + request->vault);
        return json{{"ok", true}, {"result", vault_json(*v)}};
    }
    case C::vault_show: {
        auto v = service.find_vault(caller, request->vault);
        vault::Errc missing = vault::Errc::not_found;
        if (auto a = service.audit_management(caller, "vault_show", request->vault, true, "admin", v ? nullptr : &missing);
            !a)
            return failure(a.error(), "vault " + request->vault);
        if (!v)
            return failure(v.error(), "vault " + request->vault);
        json out = vault_json(*v);
        auto count = service.store().secret_count(v->id);
        out["secrets"] = count ? *count : -1;
        auto policy = service.store().policy(v->id);
        out["policy"] = policy && *policy ? (*policy)->text : "";
        return json{{"ok", true}, {"result", out}};
    }
    case C::vault_list: {
        auto vaults = service.list_vaults(caller);
        if (!vaults)
            return failure(vaults.error(), "the vault list");
        if (auto a = service.audit_management(caller, "vault_list", "", true, "admin"); !a)
            return failure(a.error(), "the vault list");
        json out = json::array();
        for (const auto& v : *vaults)
            out.push_back(vault_json(v));
        return json{{"ok", true}, {"result", out}};
    }
    case C::status: {
        // Status reveals nothing secret: it answers even when its own record
        // cannot be written, and says so -- that is when it is needed most.
        const auto recorded = service.audit_management(caller, "status", "", true, "admin");
        const auto ready = service.audit_log().ready();
        std::string audit_state = "ok";
        if (!ready)
            audit_state = "failing: " + ready.error().message;
        else if (!recorded)
            audit_state = "failing: " + recorded.error().message;
        const auto token = service.keys().ping();
        const auto stats = service.dek_cache().stats();
        const auto audit = service.audit_log().stats();
        auto vaults = service.store().vaults();
        json result{{"mounted", true},
                {"mountpoint", mountpoint_},
                {"state", state_.config.state_dir},
                {"token", token ? std::string("ok") : "failing: " + token.error().message},
                {"token_name", state_.keys->profile().name()},
                {"token_seal", std::string(hsm::to_string(state_.keys->schemes().seal))},
                {"token_signature", std::string(hsm::to_string(state_.keys->schemes().signature))},
                {"audit", audit_state},
                {"audit_records", audit.last_seq},
                {"audit_refusals_coalesced", audit.coalesced},
                {"audit_records_dropped", audit.dropped},
                {"audit_disk_below_reserve", audit.low_space},
                {"vaults", vaults ? static_cast<std::int64_t>(vaults->size()) : -1},
                {"store", service.store().path()},
                {"store_fresh", service.store().fresh() ? std::string("ok")
                                                        : "failing: " + service.store().fresh().error().message},
                {"store_revision", service.store().revision()},
                {"open_handles", filesystem_.open_handles()},
                {"dek_cache",
                 json{{"enabled", service.dek_cache().enabled()},
                      {"hits", stats.hits},
                      {"misses", stats.misses},
                      {"entries", stats.entries}}},
                {"locked_memory_bytes", hsm::secure_heap_used()}};
        add_health(state_, result);
        return json{{"ok", true}, {"result", std::move(result)}};
    }
    case C::vault_rekey: {
        auto done = state_.rekey->rekey(&caller, request->vault);
        if (!done)
            return failure(done.error(), "the rekey of vault " + request->vault);
        return json{{"ok", true},
                    {"result", json{{"vault", done->vault},
                                    {"old_kek", done->old_kek},
                                    {"new_kek", done->new_kek},
                                    {"resealed", done->resealed}}}};
    }
    case C::audit_acknowledge: {
        // The admin's word on records an unclean stop left unproven: a
        // signed record of its own, which names who gave it.
        if (auto r = service.audit_log().acknowledge(request->through, caller.who.uid); !r)
            return failure(r.error(), "the acknowledgement");
        return json{{"ok", true},
                    {"result", json{{"through", request->through}, {"seq", service.audit_log().stats().last_seq}}}};
    }
    case C::metrics: {
        if (auto a = service.audit_management(caller, "metrics", "", true, "admin"); !a)
            return failure(a.error(), "the metrics");
        return json{{"ok", true}, {"result", render_metrics(state_, filesystem_)}};
    }
    case C::backup: {
        auto doc = service.backup(caller, request->vault,
                                  request->secret ? std::optional<std::string_view>(*request->secret) : std::nullopt);
        if (!doc)
            return failure(doc.error(), "backup of " + request->vault +
                                            (request->secret ? "/" + *request->secret : std::string()));
        return json{{"ok", true}, {"result", *doc}};
    }
    case C::policy_reset: {
        if (auto r = service.reset_policy(caller, request->vault,
                                          request->owner ? std::optional<uid_t>(*request->owner) : std::nullopt);
            !r)
            return failure(r.error(), "policy reset of " + request->vault);
        return json{{"ok", true}, {"result", request->vault}};
    }
    case C::policy_set: {
        auto v = service.find_vault(caller, request->vault);
        if (!v)
            return failure(v.error(), "vault " + request->vault);
        if (auto r = service.write_policy(caller, v->id, request->policy); !r)
            return failure(r.error(), "the policy of " + request->vault);
        auto text = service.read_policy(caller, v->id);
        return json{{"ok", true}, {"result", text ? *text : std::string()}};
    }
    case C::object:
        return dispatch_object(state_, caller, request->op, json::parse(request->args, nullptr, false));
    case C::restore: {
        // A new vault to restore into is made first (admins only, as ever),
        // and removed again if the restore fails: a failed restore changes nothing.
        bool made = false;
        if (request->into && !service.find_vault(caller, *request->into)) {
            auto v = service.create_vault(caller, *request->into, vault::VaultSettings{});
            if (!v)
                return failure(v.error(), "vault " + *request->into);
            made = true;
        }
        auto names = service.restore(caller, request->backup,
                                     request->into ? std::optional<std::string_view>(*request->into) : std::nullopt);
        if (!names) {
            if (made)
                (void)service.remove_vault(caller, *request->into);
            return failure(names.error(), "restore" + (request->into ? " into " + *request->into : std::string()));
        }
        return json{{"ok", true}, {"result", *names}, {"created", made}};
    }
    }
    return error_reply({vault::Errc::invalid_argument, "unknown command"});
}

vault::Result<json> control_call(const std::string& state_dir, const std::string& socket, const std::string& request)
{
    std::string path = socket;
    if (path.empty()) {
        // The state's config names the socket; a caller who may not read the
        // config (a non-root admin) names it with --socket instead.
        auto config = vault::load_config(vault::absolute_path(state_dir));
        path = config ? config->path_of(config->control_socket) : vault::absolute_path(state_dir) + "/control.sock";
    }
    sockaddr_un addr{};
    if (!make_address(path, addr))
        return vault::fail(vault::Errc::invalid_argument, "control socket path is too long");
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return vault::fail(vault::Errc::storage, std::strerror(errno));
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
        const int err = errno;
        ::close(fd);
        if (err == EACCES || err == EPERM)
            return vault::fail(vault::Errc::access_denied,
                               "permission denied reaching the control socket " + path +
                                   ": the management commands are for root and the admin group; an admin who is "
                                   "not root needs `control_socket` set to a path it can reach, and --socket");
        return vault::fail(vault::Errc::not_found, "no vaultfs daemon answers on " + path + " (" +
                                                       std::strerror(err) + "); is the state mounted?");
    }
    std::string reply;
    // A restore may take the daemon a while: wait for its reply as long as
    // it takes to re-seal a large backup.
    const auto deadline = Clock::now() + std::chrono::minutes(10);
    const bool ok = send_all(fd, request, -1, deadline) && ::shutdown(fd, SHUT_WR) == 0 &&
                    receive_all(fd, reply, max_request_size, -1, deadline);
    ::close(fd);
    if (!ok)
        return vault::fail(vault::Errc::storage, "the daemon closed the control connection");
    json j = json::parse(reply, nullptr, false);
    if (j.is_discarded() || !j.is_object())
        return vault::fail(vault::Errc::storage, "the daemon sent an unreadable reply");
    return j;
}

}  // namespace vaultfs::fs
