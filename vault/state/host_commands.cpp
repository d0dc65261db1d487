#include "vault/state/host_commands.hpp"

#include <unistd.h>

#include "hsm/security_officer.hpp"
#include "vault/state/config.hpp"
#include "vault/hosts/enrolment.hpp"
#include "vault/kek/rekey.hpp"
#include "vault/state/state.hpp"
#include "vault/store/copy.hpp"
#include "vault/store/postgresql.hpp"

namespace vaultfs::vault::hosts {

Result<std::vector<std::string>> migrate_store(const std::string& state_dir, const std::string& url,
                                               const std::string& host_arg)
{
    if (!pg::is_conninfo(url) || url.find_first_of("#\n\r") != std::string::npos)
        return fail(Errc::invalid_argument, "--to takes a postgresql:// connection string");
    auto st = State::open(state_dir, State::Purpose::inspect);
    if (!st)
        return tl::unexpected(st.error());
    Config config = (*st)->config;
    if (config.store)
        return fail(Errc::invalid_argument, "this state already uses the PostgreSQL store " + pg::redact(*config.store));
    if ((*st)->keys->schemes().seal != hsm::SealScheme::aes_gcm)
        return fail(Errc::invalid_argument,
                    "this state's KEKs are aes-cbc-pad+hmac-sha256 pairs, which cannot be wrapped for other hosts; "
                    "several hosts need a token with CKM_AES_GCM");
    if (auto t = (*st)->keys->check_trusted_wrapping(); !t)
        return fail(Errc::not_permitted, t.error().message + ": it would hand KEKs to any key, so it cannot share "
                                                             "them with other hosts; keep this state on one host");
    std::string host = host_arg;
    if (host.empty()) {
        char name[256] = {};
        ::gethostname(name, sizeof name - 1);
        host = name;
    }
    auto signing = (*st)->store->setting(audit_signing_key_setting);
    if (!signing || !*signing)
        return fail(Errc::storage, "the database names no audit signing key");
    const hsm::KeyId signing_key{**signing};

    config.store = url;
    config.host = host;
    auto target = Store::open(url, Store::Mode::create, store_options(config, false));
    if (!target)
        return tl::unexpected(target.error());
    std::vector<std::string> done;
    auto copied = copy_store(*(*st)->store, **target);
    if (!copied)
        return fail(copied.error().code, "copying into " + (*target)->path() + " failed (it may hold part of the "
                                         "copy: drop and create the database before trying again): " +
                                             copied.error().message);
    done.push_back(std::to_string(*copied) + " rows copied into " + (*target)->path());
    Enrolment enrolment(**target, *(*st)->keys, host, signing_key, config.state_dir + "/" + trust_file_name);
    auto registered = enrolment.register_host("enrolled");
    if (!registered)
        return tl::unexpected(registered.error());
    if ((*target)->host_id() != 1)
        return fail(Errc::storage, "the new store gave this host id " + std::to_string((*target)->host_id()) +
                                       ", not 1: was the database empty?");
    done.push_back("host '" + host + "' is the store's first, enrolled; its transport key is in the token");
    // A one-host KEK never leaves its token: each vault moves to a new KEK
    // that leaves it only under keys its Security Officer trusts. The
    // SQLite file is not touched; the new KEKs go again if anything fails.
    auto vaults = (*target)->vaults();
    if (!vaults)
        return tl::unexpected(vaults.error());
    std::vector<hsm::KeyId> made, old;
    bool keep_made = false;
    struct Cleanup {
        hsm::Pkcs11KeyService& keys;
        std::vector<hsm::KeyId>& made;
        bool& keep;
        ~Cleanup()
        {
            if (!keep)
                for (const auto& k : made)
                    (void)keys.destroy_kek(k);
        }
    } cleanup{*(*st)->keys, made, keep_made};
    std::size_t resealed = 0;
    for (const auto& v : *vaults) {
        auto id = kek::fresh_kek_id();
        if (!id)
            return tl::unexpected(id.error());
        if (auto r = (*st)->keys->create_kek_with_id("vaultfs-kek-" + v.name, hsm::KeyId{*id},
                                                     hsm::KekReach::trusted_tokens);
            !r)
            return fail(Errc::key_unavailable, "cannot make vault " + v.name + "'s new KEK: " + r.error().message);
        made.push_back(hsm::KeyId{*id});
        auto w = (*target)->write([&](Store::Transaction& tx) -> Result<void> {
            auto n = kek::move_vault_to(tx, *(*st)->keys, v.id, v.kek_id, *id);
            if (!n)
                return tl::unexpected(n.error());
            resealed += *n;
            return enrolment.wrap_for_hosts(tx, hsm::KeyId{*id});
        });
        if (!w)
            return fail(w.error().code, "moving vault " + v.name + " to its new KEK failed (drop and create the "
                                        "database before trying again): " + w.error().message);
        old.push_back(hsm::KeyId{v.kek_id});
    }
    done.push_back(std::to_string(vaults->size()) + " vault(s) moved to new KEKs that leave the token only wrapped "
                   "under keys its Security Officer trusts; " + std::to_string(resealed) +
                   " value(s) sealed again, in locked memory");
    if (auto r = replace_file(config.state_dir + "/" + config_file_name, render_config(config), 0600); !r)
        return tl::unexpected(r.error());
    keep_made = true;
    // The old KEKs go: nothing uses them now but the SQLite file.
    for (const auto& k : old)
        if (auto r = (*st)->keys->destroy_kek(k); !r)
            done.push_back("WARNING: the old KEK " + k.hex + " could not be removed from the token: " +
                           r.error().message);
    done.push_back(std::string(config_file_name) + " now names store = " + pg::redact(url) + ", host = " + host +
                   "; " + (*st)->config.database + " is no longer used, and no longer opens (its KEKs were "
                   "replaced): remove it");
    return done;
}

Result<Accepted> accept_grant(const std::string& state_dir, const std::string& grant_text)
{
    auto st = State::open(state_dir, State::Purpose::serve);
    if (!st)
        return tl::unexpected(st.error());
    if (!(*st)->enrolment)
        return fail(Errc::invalid_argument, "this state does not use a PostgreSQL store: there is nothing to join");
    Accepted out;
    auto n = (*st)->enrolment->accept(grant_text, (*st)->audit.get());
    if (n) {
        out.imported = *n;
        auto peers = (*st)->enrolment->peers_to_trust();
        if (!peers)
            n = tl::unexpected(peers.error());
        else
            out.to_trust = std::move(*peers);
    }
    (*st)->close();
    if (!n)
        return tl::unexpected(n.error());
    return out;
}

Result<hsm::SecureBuffer> read_so_pin(const std::string& path)
{
    Config c;
    c.pin_source = "file:" + absolute_path(path);
    auto pin = read_pin(c);
    if (!pin)
        return fail(pin.error().code, "the Security Officer's " + pin.error().message);
    return pin;
}

namespace {

// The state's token, its store and its enrolment, opened without the
// state's lock (the daemon may be serving).
struct Peek {
    Config config;
    std::unique_ptr<hsm::Pkcs11KeyService> keys;
    std::unique_ptr<Store> store;
    std::unique_ptr<Enrolment> enrolment;
};

Result<Peek> peek(const std::string& state_dir)
{
    Peek p;
    auto config = load_config(absolute_path(state_dir));
    if (!config)
        return tl::unexpected(config.error());
    p.config = std::move(*config);
    if (!p.config.store)
        return fail(Errc::invalid_argument, "this state uses SQLite: one host, its own");
    auto store = Store::open(p.config.store_location(), Store::Mode::read_only, store_options(p.config, false));
    if (!store)
        return tl::unexpected(store.error());
    p.store = std::move(*store);
    auto pin = read_pin(p.config);
    if (!pin)
        return tl::unexpected(pin.error());
    auto keys = hsm::Pkcs11KeyService::open(hsm::Pkcs11Config{p.config.pkcs11_module, p.config.token_label,
                                                              std::move(*pin), p.config.environment(),
                                                              p.config.schemes});
    if (!keys)
        return fail(Errc::key_unavailable, keys.error().message);
    p.keys = std::move(*keys);
    auto signing = p.store->setting(audit_signing_key_setting);
    if (!signing || !*signing)
        return fail(Errc::storage, "the database names no audit signing key");
    p.enrolment = std::make_unique<Enrolment>(*p.store, *p.keys, p.config.host, hsm::KeyId{**signing},
                                              p.config.state_dir + "/" + trust_file_name);
    return p;
}

}  // namespace

Result<std::vector<HostRow>> untrusted_hosts(const std::string& state_dir, const std::string& only)
{
    auto p = peek(state_dir);
    if (!p)
        return tl::unexpected(p.error());
    if (!only.empty()) {
        auto row = p->store->host_by_name(only);
        if (!row)
            return tl::unexpected(row.error());
        if (!*row || (*row)->status != "enrolled")
            return fail(Errc::not_found, "no enrolled host '" + only + "' in the store");
    }
    return p->enrolment->peers_to_trust(only);
}

namespace {

// The state's token, logged in as its Security Officer.
Result<std::unique_ptr<hsm::SecurityOfficer>> so_login(const std::string& state_dir, const hsm::SecureBuffer& so_pin)
{
    auto config = load_config(absolute_path(state_dir));
    if (!config)
        return tl::unexpected(config.error());
    auto so = hsm::SecurityOfficer::login(config->pkcs11_module, config->environment(), config->token_label, so_pin);
    if (!so)
        return fail(Errc::key_unavailable, so.error().message);
    return std::move(*so);
}

}  // namespace

Result<std::vector<std::string>> trust_hosts(const std::string& state_dir, const std::vector<HostRow>& hosts,
                                             const hsm::SecureBuffer& so_pin)
{
    auto so = so_login(state_dir, so_pin);
    if (!so)
        return tl::unexpected(so.error());
    std::vector<std::string> lines;
    for (const auto& h : hosts) {
        auto made = (*so)->trust(h.transport_public, trusted_key_label(h.name));
        if (!made)
            return fail(Errc::key_unavailable, "trusting host " + h.name + "'s transport key: " + made.error().message);
        lines.push_back("host " + h.name + ": its transport key (" +
                        hsm::Pkcs11KeyService::trusted_key_id(h.transport_public).hex + ") is " +
                        (*made ? "trusted in this token now" : "trusted in this token already"));
    }
    return lines;
}

Result<std::string> grant_with_trust(const std::string& state_dir, const std::string& request_text,
                                     const hsm::SecureBuffer& so_pin, const std::function<Result<std::string>()>& grant)
{
    auto req = parse_request(request_text);
    if (!req)
        return tl::unexpected(req.error());
    auto so = so_login(state_dir, so_pin);
    if (!so)
        return tl::unexpected(so.error());
    auto made = (*so)->trust(req->transport_public, trusted_key_label(req->host));
    if (!made)
        return fail(Errc::key_unavailable, "trusting host " + req->host + "'s transport key: " + made.error().message);
    auto granted = grant();
    if (!granted && *made)
        if (auto r = (*so)->forget(req->transport_public); !r)
            return fail(granted.error().code, granted.error().message + "; and the transport key trusted for it "
                                              "could not be taken back: " + r.error().message);
    return granted;
}

Result<std::vector<HostRow>> list_hosts(const std::string& state_dir)
{
    auto config = load_config(absolute_path(state_dir));
    if (!config)
        return tl::unexpected(config.error());
    if (!config->store)
        return fail(Errc::invalid_argument, "this state uses SQLite: one host, its own");
    auto store = Store::open(config->store_location(), Store::Mode::read_only, store_options(*config, false));
    if (!store)
        return tl::unexpected(store.error());
    return (*store)->hosts();
}

}  // namespace vaultfs::vault::hosts
