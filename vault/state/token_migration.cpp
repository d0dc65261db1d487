#include "vault/state/token_migration.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "hsm/pkcs11/key_service.hpp"
#include "vault/audit/log.hpp"
#include "vault/state/config.hpp"
#include "vault/crypto/envelope.hpp"
#include "vault/objects/objects.hpp"
#include "vault/crypto/signing.hpp"
#include "vault/state/lock.hpp"
#include "vault/store/store.hpp"

#include <nlohmann/json.hpp>

namespace vaultfs::vault {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* pending_setting = "token_migration";

std::string read_text(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

json anchor_json(const std::optional<AuditAnchor>& a)
{
    if (!a)
        return nullptr;
    return json{{"seq", a->seq},   {"hash", a->hash},           {"clean", a->clean_shutdown},
                {"time", a->time}, {"file_start", a->file_start}, {"sig", to_hex(a->sig)}};
}

std::optional<AuditAnchor> anchor_from(const json& j)
{
    if (!j.is_object())
        return std::nullopt;
    auto sig = from_hex(j.value("sig", std::string()));
    return AuditAnchor{j.value("seq", std::uint64_t{0}), j.value("hash", std::string()), j.value("clean", false),
                       j.value("time", Micros{0}), j.value("file_start", std::uint64_t{0}),
                       sig ? *sig : std::vector<std::uint8_t>{}};
}

// Puts a state back as it was before the migration `pending` describes:
// the old vaultfs.conf, the audit file cut back to its old length, then (in
// one transaction, which also clears the record) the old sealed DEKs, signing
// key and anchor. Each step may be repeated. Returns the objects left in the
// target token.
Result<std::vector<std::string>> roll_back(Store& store, const std::string& dir, const Config& c, const json& pending)
{
    const std::string old_conf = pending.value("old_conf", std::string());
    if (old_conf.empty())
        return fail(Errc::storage, "the database's record of the interrupted migration is damaged");
    if (auto r = replace_file(dir + "/" + config_file_name, old_conf, 0600); !r)
        return tl::unexpected(r.error());
    const std::string audit = c.path_of(c.audit_file);
    struct stat st{};
    const auto size = pending.value("audit_size", std::int64_t{-1});
    if (size >= 0 && ::stat(audit.c_str(), &st) == 0 && st.st_size > size && ::truncate(audit.c_str(), size) != 0)
        return fail(Errc::audit_unavailable, "cannot cut " + audit + " back to its length before the migration: " +
                                                 std::strerror(errno));
    const auto anchor = anchor_from(pending.value("old_anchor", json()));
    const std::string old_signing = pending.value("old_signing_key", std::string());
    auto r = store.write([&](Store::Transaction& tx) -> Result<void> {
        if (auto u = tx.undo_sealed_deks(); !u)
            return u;
        if (auto u = tx.set_setting(audit_signing_key_setting, old_signing); !u)
            return u;
        if (anchor)
            if (auto u = tx.set_audit_anchor(*anchor); !u)
                return u;
        return tx.delete_setting(pending_setting);
    });
    if (!r)
        return tl::unexpected(r.error());
    std::vector<std::string> left;
    for (const auto& id : pending.value("target_keys", json::array()))
        if (id.is_string())
            left.push_back(id.get<std::string>());
    return left;
}

std::string pending_marker(const std::string& dir) { return dir + "/token-migration.pending"; }

}  // namespace

Result<void> check_no_pending_migration(const std::string& dir)
{
    if (!fs::exists(pending_marker(dir)))
        return {};
    return fail(Errc::busy, "a `vaultfs token migrate` of " + dir + " was interrupted; put the state back as it was "
                            "with `vaultfs token migrate --state " + dir + " --roll-back`, then migrate again");
}

Result<std::vector<std::string>> roll_back_token_migration(const std::string& state_arg)
{
    const std::string dir = absolute_path(state_arg);
    auto lock = StateLock::acquire(dir);
    if (!lock)
        return fail(lock.error().code, lock.error().message + "; stop the daemon first");
    auto config = load_config(dir);
    if (!config)
        return tl::unexpected(config.error());
    auto store = Store::open(config->path_of(config->database), Store::Mode::open_existing);
    if (!store)
        return tl::unexpected(store.error());
    auto text = (*store)->setting(pending_setting);
    if (!text)
        return tl::unexpected(text.error());
    std::vector<std::string> done;
    if (!*text) {
        done.push_back("no interrupted migration: the state is as its vaultfs.conf says");
    } else {
        const json pending = json::parse(**text, nullptr, false);
        if (pending.is_discarded())
            return fail(Errc::storage, "the database's record of the interrupted migration is damaged");
        auto left = roll_back(**store, dir, *config, pending);
        if (!left)
            return tl::unexpected(left.error());
        done.push_back("put back as it was before the migration: vaultfs.conf, the audit file, the sealed DEKs");
        if (!left->empty()) {
            std::string ids;
            for (const auto& id : *left)
                ids += (ids.empty() ? "" : ", ") + id;
            done.push_back(pending.value("target", std::string("the target token")) +
                           " still holds what the migration made there: ids " + ids);
        }
    }
    ::unlink(pending_marker(dir).c_str());
    return done;
}

Result<std::vector<std::string>> migrate_token(const std::string& state_arg, const MigrationTarget& to)
{
    const std::string dir = absolute_path(state_arg);
    auto lock = StateLock::acquire(dir);
    if (!lock)
        return fail(lock.error().code, lock.error().message + "; stop the daemon (vaultfs umount) before migrating");
    if (auto r = check_no_pending_migration(dir); !r)
        return tl::unexpected(r.error());
    auto config = load_config(dir);
    if (!config)
        return tl::unexpected(config.error());
    const Config& c = *config;
    for (const std::string* v : {&to.module_path, &to.token_label, &to.pin_file})
        if (v->find_first_of("#\n\r") != std::string::npos)
            return fail(Errc::invalid_argument, "'" + *v + "' cannot go into vaultfs.conf ('#' or a line break)");
    if (to.token_label.empty() || to.token_label.size() > 32)
        return fail(Errc::invalid_argument, "a token label is 1 to 32 bytes");

    // The target's configuration: the same state, another token.
    Config next = c;
    next.pkcs11_module = to.module_path;
    next.token_label = to.token_label;
    next.pin_source = "file:" + absolute_path(to.pin_file);
    next.module_env = to.module_env;
    if (next.pkcs11_module == c.pkcs11_module && next.token_label == c.token_label &&
        next.environment() == c.environment())
        return fail(Errc::invalid_argument, "the state is already in token '" + c.token_label + "' of " +
                                                c.pkcs11_module);

    auto source_pin = read_pin(c);
    if (!source_pin)
        return tl::unexpected(source_pin.error());
    auto source = hsm::Pkcs11KeyService::open(
        hsm::Pkcs11Config{c.pkcs11_module, c.token_label, std::move(*source_pin), c.environment(), c.schemes});
    if (!source)
        return fail(Errc::key_unavailable, "the state's token: " + source.error().message);
    auto target_pin = read_pin(next);
    if (!target_pin)
        return tl::unexpected(target_pin.error());
    auto target = hsm::Pkcs11KeyService::open(
        hsm::Pkcs11Config{next.pkcs11_module, next.token_label, std::move(*target_pin), next.environment(), std::nullopt});
    if (!target) {
        if (target.error().code == hsm::Errc::token_not_found)
            return fail(Errc::key_unavailable, target.error().message + " in module " + next.pkcs11_module +
                                                   "; its tokens: pkcs11-tool --module " + next.pkcs11_module + " -L");
        return fail(Errc::key_unavailable, "the target token: " + target.error().message);
    }
    next.schemes = (*target)->schemes();
    const std::string target_name = (*target)->profile().name();

    std::vector<std::string> done;
    for (const auto& note : (*target)->negotiation_notes())
        done.push_back(note);

    if (c.store)
        return fail(Errc::invalid_argument, "token migrate moves a one-host (SQLite) state: on a shared PostgreSQL "
                                            "store the other hosts use the same sealed DEKs; enrol a host with the new "
                                            "token instead (vaultfs join request)");
    auto store = Store::open(c.path_of(c.database), Store::Mode::open_existing);
    if (!store)
        return tl::unexpected(store.error());
    auto old_signing = (*store)->setting(audit_signing_key_setting);
    if (!old_signing || !*old_signing)
        return fail(Errc::storage, "the database names no audit signing key");
    auto old_anchor = (*store)->audit_anchor();
    if (!old_anchor)
        return tl::unexpected(old_anchor.error());
    const std::string audit_path = c.path_of(c.audit_file);
    struct stat st{};
    if (::stat(audit_path.c_str(), &st) != 0)
        return fail(Errc::audit_unavailable, "cannot stat " + audit_path + ": " + std::strerror(errno));

    // What the target token gets; removed again if the migration fails.
    std::vector<hsm::KeyId> made_keks;
    std::optional<hsm::KeyId> new_signing;
    bool keep_target_objects = false;
    struct TargetCleanup {
        hsm::Pkcs11KeyService& target;
        std::vector<hsm::KeyId>& keks;
        std::optional<hsm::KeyId>& signing;
        bool& keep;
        ~TargetCleanup()
        {
            if (keep)
                return;
            for (const auto& k : keks)
                static_cast<void>(target.destroy_kek(k));
            if (signing)
                static_cast<void>(target.destroy_key_pair(*signing));
        }
    } cleanup{**target, made_keks, new_signing, keep_target_objects};

    auto signing = (*target)->create_signing_key("vaultfs-audit-signing " + dir);
    if (!signing)
        return fail(Errc::key_unavailable, "cannot make the audit signing key in " + target_name + ": " +
                                               signing.error().message);
    new_signing = *signing;

    // The marker first: from here a crash leaves the state refusing to mount
    // until it is rolled back (check_no_pending_migration).
    if (auto r = replace_file(pending_marker(dir), "vaultfs token migrate --roll-back undoes what is recorded in the "
                                                   "database\n", 0600);
        !r)
        return tl::unexpected(r.error());
    struct MarkerCleanup {
        std::string path;
        bool armed = true;
        ~MarkerCleanup()
        {
            if (armed)
                ::unlink(path.c_str());
        }
    } marker{pending_marker(dir)};

    std::size_t resealed = 0;
    std::vector<std::string> kek_list;
    json pending{{"old_conf", read_text(dir + "/" + config_file_name)},
                 {"audit_size", static_cast<std::int64_t>(st.st_size)},
                 {"old_signing_key", **old_signing},
                 {"old_anchor", anchor_json(*old_anchor)},
                 {"target", target_name}};
    auto written = (*store)->write([&](Store::Transaction& tx) -> Result<void> {
        auto holders = tx.token_key_holders();
        if (!holders)
            return tl::unexpected(holders.error());
        if (!holders->empty()) {
            std::string list;
            for (std::size_t i = 0; i < holders->size() && i < 5; ++i)
                list += (i ? ", " : "") + (*holders)[i];
            if (holders->size() > 5)
                list += " and " + std::to_string(holders->size() - 5) + " more";
            return fail(Errc::not_permitted, "the state holds key pairs that live in token '" + c.token_label +
                                                 "' and can never leave it: " + list + "; nothing was changed");
        }
        auto keks = tx.kek_ids();
        if (!keks)
            return tl::unexpected(keks.error());
        for (const auto& id : *keks) {
            if (auto r = (*target)->create_kek_with_id("vaultfs-kek " + id, hsm::KeyId{id}, hsm::KekReach::this_token); !r)
                return fail(Errc::key_unavailable, "cannot make KEK " + id + " in " + target_name + ": " +
                                                       r.error().message + "; nothing was changed");
            made_keks.push_back(hsm::KeyId{id});
        }
        kek_list = *keks;
        auto rows = tx.sealed_deks();
        if (!rows)
            return tl::unexpected(rows.error());
        for (const auto& row : *rows) {
            std::string bound = row.name;
            std::uint64_t version = row.version;
            if (row.table == SealedDek::Table::object_versions) {
                ObjectVersionRow ov;
                ov.body = row.body;
                bound = sealed_key_binding(row.name, ov);
                version = 0;
            }
            const Binding binding{row.vault, bound, version, row.kek_id};
            const auto aad = dek_aad(binding);
            auto dek = (*source)->unseal(hsm::KeyId{row.kek_id}, row.sealed_dek, aad);
            if (!dek)
                return fail(dek.error().code == hsm::Errc::authentication_failed ? Errc::integrity
                                                                                  : Errc::key_unavailable,
                            row.name + " version " + std::to_string(row.version) +
                                ": the state's token cannot unseal its DEK: " + dek.error().message +
                                "; nothing was changed");
            auto sealed = (*target)->seal(hsm::KeyId{row.kek_id}, *dek, aad);
            if (!sealed)
                return fail(Errc::key_unavailable, "sealing a DEK in " + target_name + ": " + sealed.error().message +
                                                       "; nothing was changed");
            if (auto r = tx.replace_sealed_dek(row, *sealed); !r)
                return r;
            ++resealed;
        }
        json target_keys = json::array();
        for (const auto& k : made_keks)
            target_keys.push_back(k.hex);
        target_keys.push_back(new_signing->hex);
        pending["target_keys"] = std::move(target_keys);
        if (auto r = tx.set_setting(pending_setting, pending.dump()); !r)
            return r;
        return tx.set_setting(audit_signing_key_setting, new_signing->hex);
    });
    if (!written)
        return tl::unexpected(written.error());
    // Committed (and recorded): a failure from here is rolled back in full.
    marker.armed = false;
    const auto undo = [&](const Error& why) -> tl::unexpected<Error> {
        auto back = roll_back(**store, dir, c, pending);
        if (!back) {
            keep_target_objects = true;
            return fail(why.code, why.message + "; putting the state back failed too (" + back.error().message +
                                      "): run `vaultfs token migrate --state " + dir + " --roll-back`");
        }
        ::unlink(pending_marker(dir).c_str());
        return fail(why.code, why.message + "; the state was put back as it was");
    };
    done.push_back(std::to_string(kek_list.size()) + " KEK(s) made in " + target_name + " under the same ids; " +
                   std::to_string(resealed) + " DEK(s) re-sealed token to token (" +
                   std::string(hsm::to_string(next.schemes.seal)) + "); no value was decrypted");

    // The audit trail hands over from the old signing key to the new one.
    {
        audit::Log::Options ao;
        ao.path = audit_path;
        ao.sync = AuditSync::always;
        ao.bound = audit::Bound{c.audit_checkpoint_records, static_cast<std::uint64_t>(c.audit_checkpoint_interval.count())};
        auto log = audit::Log::open(std::move(ao), audit::Signer{source->get(), hsm::KeyId{**old_signing}}, store->get());
        if (!log)
            return undo(Error{log.error().code, "the audit trail: " + log.error().message});
        if (auto r = (*log)->hand_over(audit::Signer{target->get(), *new_signing}, target_name); !r)
            return undo(Error{r.error().code, "the audit hand-over: " + r.error().message});
        if (auto r = (*log)->close(); !r)
            return undo(Error{r.error().code, "the audit trail: " + r.error().message});
    }
    auto pem = public_key_pem(**target, *new_signing);
    if (!pem)
        return undo(pem.error());
    if (auto r = replace_file(dir + "/" + config_file_name, render_config(next), 0600); !r)
        return undo(r.error());
    // Done: the undo log goes, and nothing is rolled back any more.
    if (auto r = (*store)->write([&](Store::Transaction& tx) -> Result<void> {
            if (auto f = tx.forget_sealed_deks(); !f)
                return f;
            return tx.delete_setting(pending_setting);
        });
        !r)
        return undo(r.error());
    keep_target_objects = true;
    ::unlink(pending_marker(dir).c_str());

    // The old public key is kept beside the new one, for copies of the trail
    // verified elsewhere; the new one alone verifies the whole chain.
    const std::string pub = c.path_of(c.audit_public_key);
    const std::string old_pub = read_text(pub);
    const bool pub_ok = replace_file(pub + ".before-migration", old_pub, 0644) && replace_file(pub, *pem, 0644);
    done.push_back(c.audit_public_key + "    the new audit signing key (" +
                   std::string(hsm::to_string(next.schemes.signature)) + ", in " + target_name +
                   "); the log hands over to it in a signed handover record; the old key's public half is in " +
                   c.audit_public_key + ".before-migration" +
                   (pub_ok ? "" : " (the files could not be written; the daemon rewrites the new one at start)"));
    done.push_back(std::string(config_file_name) + "             now names " + target_name + " (module " +
                   next.pkcs11_module + ")");
    std::string old_ids;
    for (const auto& id : kek_list)
        old_ids += id + ", ";
    done.push_back("token '" + c.token_label + "' was not changed; vaultfs's keys there are ids " + old_ids +
                   "and the old audit signing key " + **old_signing +
                   ": remove them when no backup made before now is needed (those need them)");
    return done;
}

}  // namespace vaultfs::vault
