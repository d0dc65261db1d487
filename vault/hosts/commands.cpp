#include "vault/hosts/commands.hpp"

#include <unistd.h>

#include "vault/config.hpp"
#include "vault/hosts/enrolment.hpp"
#include "vault/state.hpp"
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
    done.push_back(std::to_string(*copied) + " rows copied into " + (*target)->path() +
                   " as they are (ciphertext, sealed DEKs, signatures: nothing decrypted)");
    Enrolment enrolment(**target, *(*st)->keys, host, signing_key, config.state_dir + "/" + trust_file_name);
    auto registered = enrolment.register_host("enrolled");
    if (!registered)
        return tl::unexpected(registered.error());
    if ((*target)->host_id() != 1)
        return fail(Errc::storage, "the new store gave this host id " + std::to_string((*target)->host_id()) +
                                       ", not 1: was the database empty?");
    done.push_back("host '" + host + "' is the store's first, enrolled; its transport key is in the token");
    // Check values for the KEKs (made here, where they are), and which of
    // them can travel: a KEK made before several hosts was unextractable.
    auto vaults = (*target)->vaults();
    if (!vaults)
        return tl::unexpected(vaults.error());
    std::vector<std::string> stuck;
    for (const auto& v : *vaults) {
        auto w = (*target)->write([&](Store::Transaction& tx) { return enrolment.wrap_for_hosts(tx, hsm::KeyId{v.kek_id}); });
        if (!w)
            return tl::unexpected(w.error());
        if (auto probe = (*st)->keys->wrap_kek(hsm::KeyId{v.kek_id}, registered->transport_public); !probe)
            stuck.push_back(v.name);
    }
    if (!stuck.empty()) {
        std::string names;
        for (const auto& n : stuck)
            names += (names.empty() ? "" : ", ") + n;
        done.push_back("WARNING: the KEKs of " + names +
                       " were made unextractable (before vaultfs had several hosts): other hosts cannot be granted "
                       "them; copy their secrets into new vaults to share them");
    }
    if (auto r = replace_file(config.state_dir + "/" + config_file_name, render_config(config), 0600); !r)
        return tl::unexpected(r.error());
    done.push_back(std::string(config_file_name) + " now names store = " + pg::redact(url) + ", host = " + host +
                   "; " + (*st)->config.database + " is no longer used (keep it as a backup, or remove it)");
    return done;
}

Result<std::size_t> accept_grant(const std::string& state_dir, const std::string& grant_text)
{
    auto st = State::open(state_dir, State::Purpose::serve);
    if (!st)
        return tl::unexpected(st.error());
    if (!(*st)->enrolment)
        return fail(Errc::invalid_argument, "this state does not use a PostgreSQL store: there is nothing to join");
    auto n = (*st)->enrolment->accept(grant_text, (*st)->audit.get());
    (*st)->close();
    return n;
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
