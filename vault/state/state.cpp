#include "vault/state/state.hpp"

#include "vault/store/postgresql.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "vault/crypto/signing.hpp"
#include "vault/state/token_migration.hpp"

namespace vaultfs::vault {

namespace {

namespace fs = std::filesystem;


// What to do about each way the token can fail, appended to its message.
std::string hsm_hint(const hsm::Error& e, const Config& c)
{
    const std::string conf = c.state_dir + "/" + config_file_name;
    switch (e.code) {
    case hsm::Errc::module_unavailable:
        if (!c.module_env.empty())  // the embedded SoftHSM2 default
            return e.message + "; install the module (apt-get install softhsm2) or fix pkcs11_module in " + conf;
        return e.message + "; install the token's PKCS#11 module or fix pkcs11_module in " + conf;
    case hsm::Errc::mechanism_unsupported:
        return e.message + "; a state moves to a token with other mechanisms by `vaultfs token migrate`";
    case hsm::Errc::token_not_found:
        return e.message + "; check token_label and module_env in " + conf + " (or run `vaultfs init`)";
    case hsm::Errc::pin_incorrect:
        return e.message + "; fix pin_source in " + conf + " before trying again (a hardware token locks after a "
                                                          "few wrong PINs)";
    case hsm::Errc::pin_locked:
        return e.message + "; the token's security officer must unlock it";
    case hsm::Errc::key_not_found:
        return e.message + "; the token does not hold this state's keys — is this the right token?";
    default:
        return e.message;
    }
}

Result<hsm::SecureBuffer> random_pin(std::size_t chars)
{
    static const char alphabet[] = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    auto pin = hsm::SecureBuffer::allocate(chars);
    if (!pin)
        return fail(Errc::out_of_memory, pin.error().message);
    auto raw = hsm::SecureBuffer::allocate(chars);
    if (!raw || RAND_priv_bytes(raw->data(), static_cast<int>(chars)) != 1)
        return fail(Errc::storage, "cannot generate a random PIN");
    for (std::size_t i = 0; i < chars; ++i)
        pin->data()[i] = static_cast<std::uint8_t>(alphabet[raw->data()[i] % (sizeof alphabet - 1)]);
    return std::move(*pin);
}

Result<void> write_file(const std::string& path, const void* data, std::size_t size, mode_t mode)
{
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return fail(Errc::storage, "cannot create " + path + ": " + std::strerror(errno));
    const bool ok = ::write(fd, data, size) == static_cast<ssize_t>(size) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok)
        return fail(Errc::storage, "cannot write " + path);
    return {};
}

Result<void> write_text(const std::string& path, const std::string& text, mode_t mode)
{
    return write_file(path, text.data(), text.size(), mode);
}

}  // namespace

Result<void> replace_file(const std::string& path, const std::string& text, mode_t mode)
{
    const std::string tmp = path + ".new";
    ::unlink(tmp.c_str());
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return fail(Errc::storage, "cannot create " + tmp + ": " + std::strerror(errno));
    // The mode as asked, whatever the umask (a metrics textfile is 0644 under the unit's UMask=0077).
    const bool ok = ::fchmod(fd, mode) == 0 &&
                    ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
        ::unlink(tmp.c_str());
        return fail(Errc::storage, "cannot write " + path);
    }
    return {};
}

namespace {

// The audit key's public half, from the token. The file in the state
// directory is only a copy for verifiers without the token; if it no longer
// holds this key (replaced, so that forged signatures would check out), it is
// rewritten from the token and the replacement logged.
Result<std::string> public_key_of(hsm::KeyService& keys, const hsm::KeyId& key, const Config& c)
{
    auto pem = public_key_pem(keys, key);
    if (!pem)
        return fail(pem.error().code, "the audit signing key: " + pem.error().message);
    const std::string path = c.path_of(c.audit_public_key);
    std::ifstream in(path);
    std::stringstream file;
    file << in.rdbuf();
    if (!same_public_key(file.str(), *pem)) {
        spdlog::error("{} does not hold the token's audit key (replaced or damaged); rewriting it from the token. "
                      "Verify shipped copies of the audit trail with a copy of the key you keep elsewhere",
                      path);
        const std::string tmp = path + ".new";
        ::unlink(tmp.c_str());
        if (auto r = write_text(tmp, *pem, 0644); !r || ::rename(tmp.c_str(), path.c_str()) != 0)
            spdlog::error("cannot rewrite {}", path);
    }
    return pem;
}

std::optional<gid_t> resolve_group(const std::string& g)
{
    gid_t id = 0;
    const auto [p, ec] = std::from_chars(g.data(), g.data() + g.size(), id);
    if (ec == std::errc() && p == g.data() + g.size())
        return id;
    SystemNameResolver names;
    return names.group_id(g);
}

}  // namespace

std::string absolute_path(const std::string& path)
{
    std::error_code ec;
    auto p = fs::absolute(path, ec);
    if (ec)
        return path;
    std::string s = p.lexically_normal().string();
    while (s.size() > 1 && s.back() == '/')
        s.pop_back();
    return s;
}

StoreOptions store_options(const Config& c, bool follow)
{
    return StoreOptions{c.store ? c.host : std::string(), c.staleness_bound, follow};
}

Result<std::vector<std::string>> init_state(const std::string& dir_arg, const InitOptions& options, std::string* request)
{
    const std::string dir = absolute_path(dir_arg);
    std::error_code ec;
    bool made_dir = false;
    if (fs::exists(dir, ec)) {
        if (!fs::is_directory(dir, ec))
            return fail(Errc::already_exists, dir + " exists and is not a directory; choose another --state");
        if (fs::exists(dir + "/" + config_file_name, ec) || fs::exists(dir + "/vault.db", ec))
            return fail(Errc::already_exists, dir + " already holds a vaultfs state; refusing to overwrite it "
                                                    "(remove it first, or choose another --state)");
        if (!fs::is_empty(dir, ec))
            return fail(Errc::already_exists, dir + " is not empty; vaultfs init needs a new or empty directory");
    } else {
        if (::mkdir(dir.c_str(), 0700) != 0)
            return fail(Errc::storage, "cannot create " + dir + ": " + std::strerror(errno));
        made_dir = true;
    }
    if (::chmod(dir.c_str(), 0700) != 0)
        return fail(Errc::storage, "cannot chmod 0700 " + dir + ": " + std::strerror(errno));

    // Undo everything on failure, so a failed init leaves nothing half-made.
    struct Cleanup {
        std::string dir;
        bool made_dir;
        bool armed = true;
        std::vector<std::string> files;  // made outside the directory
        ~Cleanup()
        {
            if (!armed)
                return;
            std::error_code e;
            for (const auto& f : files)
                fs::remove(f, e);
            if (made_dir) {
                fs::remove_all(dir, e);
            } else {
                for (const auto& entry : fs::directory_iterator(dir, e))
                    fs::remove_all(entry.path(), e);
            }
        }
    } cleanup{dir, made_dir};

    // vaultfs.conf cannot hold '#' (a comment) or a line break in a value.
    for (const auto* v : {&options.module_path, options.admin_group ? &*options.admin_group : nullptr,
                          options.token_label ? &*options.token_label : nullptr,
                          options.pin_file ? &*options.pin_file : nullptr})
        if (v != nullptr && v->find_first_of("#\n\r") != std::string::npos)
            return fail(Errc::invalid_argument, "'" + *v + "' cannot go into vaultfs.conf ('#' or a line break)");
    const bool adopt = options.token_label.has_value();
    if (adopt != options.pin_file.has_value())
        return fail(Errc::invalid_argument, "adopting a token needs both --token-label and --pin-file");
    if (adopt && !options.so_pin_file.empty())
        return fail(Errc::invalid_argument, "an adopted token's Security Officer PIN is its owner's: vaultfs neither "
                                            "makes nor keeps it (--so-pin-file is for the embedded token)");
    if (adopt && options.token_label->size() > 32)
        return fail(Errc::invalid_argument, "a token label is at most 32 bytes");
    Config config;
    config.state_dir = dir;
    config.pkcs11_module = options.module_path;
    if (options.join && !options.store)
        return fail(Errc::invalid_argument, "joining needs the store (--store postgresql://...)");
    if (options.store) {
        if (!pg::is_conninfo(*options.store) || options.store->find_first_of("#\n\r") != std::string::npos)
            return fail(Errc::invalid_argument, "--store takes a postgresql:// connection string");
        config.store = *options.store;
        config.host = options.host;
        if (config.host.empty()) {
            char name[256] = {};
            ::gethostname(name, sizeof name - 1);
            config.host = name;
        }
    }
    config.admin_group = options.admin_group;
    if (options.admin_group && !resolve_group(*options.admin_group))
        return fail(Errc::invalid_argument, "admin group '" + *options.admin_group + "' does not exist");

    std::vector<std::string> made;
    std::optional<hsm::SecureBuffer> pin;
    if (adopt) {
        // The admin's token, as its owner initialised it: never C_InitToken.
        config.token_label = *options.token_label;
        config.pin_source = "file:" + absolute_path(*options.pin_file);
        auto p = read_pin(config);
        if (!p)
            return tl::unexpected(p.error());
        pin.emplace(std::move(*p));
    } else {
        const std::string tokens = dir + "/tokens";
        const std::string softhsm_conf = dir + "/softhsm2.conf";
        // Written relative to the state directory, so that it can move (config.hpp).
        config.module_env.emplace_back("SOFTHSM2_CONF", "${STATE}/softhsm2.conf");
        if (::mkdir(tokens.c_str(), 0700) != 0)
            return fail(Errc::storage, "cannot create " + tokens + ": " + std::strerror(errno));
        if (auto r = write_text(softhsm_conf, embedded_softhsm_conf(dir), 0600); !r)
            return tl::unexpected(r.error());
        auto p = random_pin(32);
        if (!p)
            return tl::unexpected(p.error());
        auto so_pin = random_pin(32);
        if (!so_pin)
            return tl::unexpected(so_pin.error());
        if (auto r = write_file(dir + "/pin", p->data(), p->size(), 0600); !r)
            return tl::unexpected(r.error());
        // Kept for the admin to move offline (the key ceremony's SO step).
        const std::string so_pin_path = options.so_pin_file.empty() ? dir + "/so-pin" : absolute_path(options.so_pin_file);
        if (!options.so_pin_file.empty() && fs::exists(so_pin_path, ec))
            return fail(Errc::already_exists, so_pin_path + " exists; --so-pin-file names a new file");
        if (auto r = write_file(so_pin_path, so_pin->data(), so_pin->size(), 0400); !r)
            return tl::unexpected(r.error());
        cleanup.files.push_back(so_pin_path);
        if (auto r = hsm::initialise_token(config.pkcs11_module, config.environment(), config.token_label, *so_pin, *p);
            !r)
            return fail(Errc::key_unavailable, "cannot initialise the SoftHSM2 token: " + hsm_hint(r.error(), config));
        made.push_back("softhsm2.conf, tokens/   SoftHSM2 token '" + config.token_label + "' (module " +
                       config.pkcs11_module + ")");
        made.push_back("pin                      the token's user PIN (mode 0600)");
        made.push_back((options.so_pin_file.empty() ? std::string("so-pin                   ")
                                                    : so_pin_path + "  ") +
                       "the token's Security Officer PIN (mode 0400): move it offline. Only the key ceremony "
                       "of several hosts needs it (--so-pin-file); the daemon never reads it");
        pin.emplace(std::move(*p));
    }

    auto keys = hsm::Pkcs11KeyService::open(
        hsm::Pkcs11Config{config.pkcs11_module, config.token_label, std::move(*pin), config.environment(), std::nullopt});
    if (!keys) {
        if (adopt && keys.error().code == hsm::Errc::token_not_found)
            return fail(Errc::key_unavailable, keys.error().message + " in module " + config.pkcs11_module +
                                                   "; its tokens: pkcs11-tool --module " + config.pkcs11_module + " -L");
        if (adopt)
            return fail(Errc::key_unavailable, keys.error().message);
        return fail(Errc::key_unavailable, hsm_hint(keys.error(), config));
    }
    config.schemes = (*keys)->schemes();
    if (adopt)
        made.push_back((*keys)->profile().name() + " adopted as it is (module " + config.pkcs11_module +
                       "): vaultfs makes its keys inside it, under ids no object there has");
    for (const auto& note : (*keys)->negotiation_notes())
        made.push_back(note);
    made.push_back("token_seal = " + std::string(hsm::to_string(config.schemes.seal)) +
                   ", token_signature = " + std::string(hsm::to_string(config.schemes.signature)) +
                   "   chosen from the token's mechanisms");

    auto signing = (*keys)->create_signing_key("vaultfs-audit-signing " + dir);
    if (!signing)
        return fail(Errc::key_unavailable, "cannot create the audit signing key: " + signing.error().message);
    // An adopted token keeps its owner's objects; a failed init takes back its own.
    struct KeyCleanup {
        hsm::Pkcs11KeyService* keys;
        hsm::KeyId key;
        bool armed = true;
        ~KeyCleanup()
        {
            if (armed)
                (void)keys->destroy_key_pair(key);
        }
    } key_cleanup{keys->get(), *signing};
    auto pem = public_key_pem(**keys, *signing);
    if (!pem)
        return tl::unexpected(pem.error());
    if (auto r = write_text(config.path_of(config.audit_public_key), *pem, 0644); !r)
        return tl::unexpected(r.error());
    made.push_back(config.audit_public_key + "    public half of the audit signing key (" +
                   (config.schemes.signature == hsm::SignatureScheme::ecdsa_p256 ? "EC P-256" : "RSA-3072") +
                   ", in the token)");

    // A shared store's KEKs move only under trusted keys: a token that does
    // not enforce that is refused before anything is made in the store.
    if (config.store)
        if (auto t = (*keys)->check_trusted_wrapping(); !t)
            return fail(Errc::not_permitted, t.error().message + ": it cannot hold KEKs shared with other hosts; use "
                                                                 "it for one host (init without --store)");
    auto store = Store::open(config.store_location(), options.join ? Store::Mode::open_existing : Store::Mode::create,
                             store_options(config, false));
    if (!store)
        return tl::unexpected(store.error());
    // A failed init takes its hosts row back too (the name stays free).
    struct HostCleanup {
        Store* store = nullptr;
        bool armed = false;
        ~HostCleanup()
        {
            if (armed && store != nullptr && store->host_id() != 0) {
                const std::int64_t id = store->host_id();
                (void)store->write([id](Store::Transaction& tx) { return tx.remove_host(id); });
            }
        }
    } host_cleanup{store->get()};
    if (config.store) {
        hosts::Enrolment enrolment(**store, **keys, config.host, *signing, dir + "/" + hosts::trust_file_name);
        auto req = enrolment.register_host(options.join ? "requested" : "enrolled");
        if (!req)
            return tl::unexpected(req.error());
        host_cleanup.armed = true;
        if (request != nullptr)
            *request = req->render();
        made.push_back("store                    PostgreSQL " + (*store)->path() +
                       (options.join ? ", shared: this host asked to join it as '" : ", new: this host is its first, '") +
                       config.host + "'");
        made.push_back("transport key            RSA-3072 in the token: other hosts wrap vault KEKs for it");
        if (options.join)
            made.push_back("fingerprint              " + req->fingerprint() +
                           "  (compare it with the enrolled host's admin before they grant)");
    }
    if (auto r = (*store)->write([&](Store::Transaction& tx) { return tx.set_setting(audit_signing_key_setting, signing->hex); });
        !r)
        return tl::unexpected(r.error());
    if (!config.store)
        made.push_back(config.database + "                 SQLite database (WAL, synchronous=FULL), no vaults yet");

    const audit::Bound bound{config.audit_checkpoint_records,
                             static_cast<std::uint64_t>(config.audit_checkpoint_interval.count())};
    if (auto r = audit::Log::create(config.path_of(config.audit_file), audit::Signer{keys->get(), *signing}, bound,
                                    store->get());
        !r)
        return tl::unexpected(r.error());
    made.push_back(config.audit_file + "              audit trail, started with a signed init record");

    if (auto r = write_text(dir + "/" + config_file_name, render_config(config), 0600); !r)
        return tl::unexpected(r.error());
    made.push_back(std::string(config_file_name) + "             configuration: module, token label, PIN source");
    key_cleanup.armed = false;
    host_cleanup.armed = false;
    cleanup.armed = false;
    return made;
}

Result<std::unique_ptr<State>> State::open(const std::string& dir_arg, Purpose purpose, std::optional<StateLock> lock)
{
    const std::string dir = absolute_path(dir_arg);
    std::unique_ptr<State> st(new State());
    auto config = load_config(dir);
    if (!config)
        return tl::unexpected(config.error());
    st->config = std::move(*config);
    if (auto r = check_no_pending_migration(dir); !r)
        return tl::unexpected(r.error());
    if (!lock) {
        auto taken = StateLock::acquire(dir);
        if (!taken)
            return tl::unexpected(taken.error());
        lock.emplace(std::move(*taken));
    }
    st->lock = std::move(lock);
    const Config& c = st->config;
    if (c.admin_group) {
        st->admin_gid = resolve_group(*c.admin_group);
        if (!st->admin_gid)
            return fail(Errc::invalid_argument, "admin_group '" + *c.admin_group + "' in " + dir + "/" +
                                                    config_file_name + " does not exist");
    }

    auto pin = read_pin(c);
    if (!pin)
        return tl::unexpected(pin.error());
    auto keys = hsm::Pkcs11KeyService::open(
        hsm::Pkcs11Config{c.pkcs11_module, c.token_label, std::move(*pin), c.environment(), c.schemes});
    if (!keys)
        return fail(Errc::key_unavailable, hsm_hint(keys.error(), c));
    st->keys = std::move(*keys);

    StoreOptions so = store_options(c, purpose != Purpose::inspect);
    so.migrate = purpose != Purpose::take_over;
    auto store = Store::open(c.store_location(), Store::Mode::open_existing, so);
    if (!store)
        return tl::unexpected(store.error());
    st->store = std::move(*store);
    if (c.store) {
        auto me = st->store->host_by_name(c.host);
        if (!me)
            return tl::unexpected(me.error());
        if (!*me)
            return fail(Errc::not_found, "host '" + c.host + "' is not in the store " + st->store->path() +
                                             " (removed by `vaultfs host remove`?); join it again with a new state");
        if (purpose != Purpose::inspect && (*me)->status != "enrolled")
            return fail(Errc::not_permitted, "host '" + c.host + "' asked to join " + st->store->path() +
                                                 " but is not enrolled: run `vaultfs join grant` on an enrolled host, "
                                                 "then `vaultfs join accept` here");
    }

    auto signing = st->store->setting(audit_signing_key_setting);
    if (!signing || !*signing)
        return fail(Errc::storage, "database " + st->store->path() + " names no audit signing key; it was not made "
                                   "by vaultfs init");
    const hsm::KeyId signing_key{**signing};
    if (auto r = st->keys->find_key(signing_key); !r)
        return fail(Errc::key_unavailable, hsm_hint(r.error(), c));

    st->deks = std::make_unique<DekCache>(c.dek_cache_entries, c.dek_cache_ttl);
    if (purpose != Purpose::inspect) {
        auto pem = public_key_of(*st->keys, signing_key, c);
        if (!pem)
            return tl::unexpected(pem.error());
        vault::audit::Log::Options ao;
        ao.path = c.path_of(c.audit_file);
        ao.sync = c.audit_sync;
        ao.sync_interval = c.audit_sync_interval;
        ao.bound = audit::Bound{c.audit_checkpoint_records,
                                static_cast<std::uint64_t>(c.audit_checkpoint_interval.count())};
        ao.coalesce_window = c.audit_coalesce_interval;
        ao.reserve_bytes = c.audit_reserve_mib << 20;
        ao.defer_start = purpose == Purpose::take_over;
        st->metrics = std::make_unique<monitor::Metrics>();
        if (c.audit_syslog) {
            audit::SyslogTarget target = *c.audit_syslog;
            target.facility = c.audit_syslog_facility;
            target.queue = c.audit_syslog_queue;
            st->shipper = std::make_unique<audit::Shipper>(std::move(target));
        }
        monitor::Metrics* metrics = st->metrics.get();
        audit::Shipper* shipper = st->shipper.get();
        ao.on_event = [metrics](const audit::Event& e) { metrics->count(e); };
        ao.on_record = [metrics, shipper](std::string_view line) {
            metrics->record_written();
            if (shipper)
                shipper->enqueue(line);
        };
        auto log = vault::audit::Log::open(std::move(ao), vault::audit::Signer{st->keys.get(), signing_key},
                                           st->store.get());
        if (!log)
            return tl::unexpected(log.error());
        st->audit = std::move(*log);
        st->expiry = std::make_unique<monitor::ExpiryWatch>(*st->store, *st->audit, *st->metrics, c.expiry_warn_days,
                                                            c.retention_day_ms);
        st->core = std::make_unique<Core>(*st->store, *st->audit, st->names, st->admin_gid);
        st->object_backup = std::make_unique<ObjectBackup>(*st->core, *st->keys);
        Options options{c.retention_day_ms, signing_key, *pem};
        ObjectBackup* objects = st->object_backup.get();
        options.backup_objects = [objects](const Caller& caller, const VaultEntry& v) {
            return objects->backup(caller, v);
        };
        options.restore_objects = [objects](const Caller& caller, const VaultEntry& target, VaultId source,
                                            const nlohmann::json& docs) {
            return objects->plan_restore(caller, target, source, docs);
        };
        if (c.store) {
            // Shared KEKs only where the token keeps them to trusted keys.
            if (auto t = st->keys->check_trusted_wrapping(); t)
                st->kek_reach = hsm::KekReach::trusted_tokens;
            else
                spdlog::warn("{}; new vaults' KEKs are made for this token only, and no other host can be granted "
                             "them", t.error().message);
            st->enrolment = std::make_unique<hosts::Enrolment>(*st->store, *st->keys, c.host, signing_key,
                                                               dir + "/" + hosts::trust_file_name);
            hosts::Enrolment* enrolment = st->enrolment.get();
            options.on_new_kek = [enrolment](Store::Transaction& tx, const hsm::KeyId& kek) {
                return enrolment->wrap_for_hosts(tx, kek);
            };
        }
        options.kek_reach = st->kek_reach;
        st->service = std::make_unique<SecretService>(*st->core, *st->keys, *st->deks, std::move(options));
        st->rekey = std::make_unique<kek::Rekey>(*st->core, *st->keys, st->kek_reach, st->enrolment.get(),
                                                 c.retention_day_ms);
        // (take_over: once its audit log starts, in start_audit.)
        if (purpose == Purpose::serve)
            st->start_keys();
        st->evp = std::make_unique<hsm::TokenEvp>(*st->keys);
        st->key_vault = std::make_unique<keys::KeyVault>(*st->core, *st->keys);
        st->certificates = std::make_unique<certificates::Certificates>(*st->core, *st->keys, *st->keys, *st->evp);
    }
    return st;
}

Result<std::string> token_audit_public_key(const Config& c)
{
    auto store = Store::open(c.store_location(), Store::Mode::read_only, store_options(c, false));
    if (!store)
        return tl::unexpected(store.error());
    auto signing = (*store)->setting(audit_signing_key_setting);
    if (!signing || !*signing)
        return fail(Errc::storage, "the database names no audit signing key");
    auto pin = read_pin(c);
    if (!pin)
        return tl::unexpected(pin.error());
    auto keys = hsm::Pkcs11KeyService::open(
        hsm::Pkcs11Config{c.pkcs11_module, c.token_label, std::move(*pin), c.environment(), c.schemes});
    if (!keys)
        return fail(Errc::key_unavailable, hsm_hint(keys.error(), c));
    auto der = (*keys)->public_key_der(hsm::KeyId{**signing});
    if (!der)
        return fail(Errc::key_unavailable, hsm_hint(der.error(), c));
    return public_key_pem(*der);
}

State::~State() { close(); }

Result<void> State::start_audit(audit::Log::Notes notes)
{
    store->drop_caches();
    if (auto r = audit->start(std::move(notes)); !r)
        return r;
    start_keys();
    return {};
}

void State::start_keys()
{
    if (enrolment) {
        if (auto r = enrolment->audit_trust(audit.get()); !r)
            spdlog::error("auditing the token's trusted keys failed: {}", r.error().message);
        if (auto n = enrolment->import_granted(audit.get()); !n)
            spdlog::error("importing the KEKs granted to this host failed: {}", n.error().message);
        if (auto n = enrolment->grant_missing(audit.get()); !n)
            spdlog::error("granting KEKs to trusted hosts failed: {}", n.error().message);
        watch_grants();
    }
    if (auto r = rekey->recover(); !r)
        spdlog::error("{}", r.error().message);
    if (auto found = rekey->inspect(); found)
        for (const auto& f : *found)
            spdlog::warn("vault {}: {}", f.vault, f.reason);
}

void State::watch_grants()
{
    audit::Log* log = audit.get();
    hosts::Enrolment* e = enrolment.get();
    store->on_change([e, log] {
        if (auto n = e->import_granted(log); !n)
            spdlog::error("importing a KEK granted to this host failed: {}", n.error().message);
        if (auto n = e->grant_missing(log); !n)
            spdlog::error("granting KEKs to trusted hosts failed: {}", n.error().message);
    });
}

void State::close()
{
    if (closed_)
        return;
    closed_ = true;
    if (store)
        store->on_change(nullptr);
    rekey.reset();
    enrolment.reset();
    certificates.reset();
    key_vault.reset();
    evp.reset();
    service.reset();
    object_backup.reset();
    core.reset();
    expiry.reset();
    if (audit) {
        if (auto r = audit->close(); !r)
            spdlog::error("audit: cannot write the shutdown record: {}", r.error().message);
        audit.reset();
    }
    if (deks)
        deks->clear();
}

}  // namespace vaultfs::vault
