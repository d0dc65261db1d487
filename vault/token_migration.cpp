#include "vault/token_migration.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "hsm/pkcs11_key_service.hpp"
#include "vault/audit/log.hpp"
#include "vault/config.hpp"
#include "vault/envelope.hpp"
#include "vault/objects/objects.hpp"
#include "vault/signing.hpp"
#include "vault/state.hpp"
#include "vault/state_lock.hpp"
#include "vault/store.hpp"

namespace vaultfs::vault {

namespace {

namespace fs = std::filesystem;

constexpr const char* signing_key_setting = "audit_signing_key";

Result<void> copy_file(const std::string& from, const std::string& to)
{
    std::error_code ec;
    fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
    if (ec)
        return fail(Errc::storage, "cannot copy " + from + " to " + to + ": " + ec.message());
    return {};
}

Result<void> replace_file(const std::string& path, const std::string& text, mode_t mode)
{
    const std::string tmp = path + ".new";
    ::unlink(tmp.c_str());
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return fail(Errc::storage, "cannot create " + tmp + ": " + std::strerror(errno));
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
        ::unlink(tmp.c_str());
        return fail(Errc::storage, "cannot write " + path);
    }
    return {};
}

// What a failed migration takes back: the database and audit file as they
// were, and the objects it made in the target token.
struct Undo {
    std::string db, db_copy, audit;
    off_t audit_size = -1;
    hsm::Pkcs11KeyService* target = nullptr;
    std::vector<hsm::KeyId> keks;
    std::optional<hsm::KeyId> signing;
    bool db_changed = false;
    bool armed = true;

    ~Undo()
    {
        if (armed) {
            if (db_changed) {
                std::error_code ec;
                for (const char* suffix : {"-wal", "-shm"})
                    fs::remove(db + suffix, ec);
                fs::copy_file(db_copy, db, fs::copy_options::overwrite_existing, ec);
            }
            if (audit_size >= 0)
                static_cast<void>(::truncate(audit.c_str(), audit_size));
            if (target != nullptr) {
                for (const auto& k : keks)
                    static_cast<void>(target->destroy_kek(k));
                if (signing)
                    static_cast<void>(target->destroy_key_pair(*signing));
            }
        }
        std::error_code ec;
        fs::remove(db_copy, ec);
    }
};

}  // namespace

Result<std::vector<std::string>> migrate_token(const std::string& state_arg, const MigrationTarget& to)
{
    const std::string dir = absolute_path(state_arg);
    auto lock = StateLock::acquire(dir);
    if (!lock)
        return fail(lock.error().code, lock.error().message + "; stop the daemon (vaultfs umount) before migrating");
    auto config = load_config(dir);
    if (!config)
        return tl::unexpected(config.error());
    const Config& c = *config;
    for (const std::string* v : {&to.module_path, &to.token_label, &to.pin_file})
        if (v->find_first_of("#\n\r") != std::string::npos)
            return fail(Errc::invalid_argument, "'" + *v + "' cannot go into vaultfs.conf ('#' or a line break)");
    if (to.token_label.empty() || to.token_label.size() > 32)
        return fail(Errc::invalid_argument, "a token label is 1 to 32 bytes");
    if (to.module_path == c.pkcs11_module && to.token_label == c.token_label)
        return fail(Errc::invalid_argument, "the state is already in token '" + c.token_label + "' of " +
                                                c.pkcs11_module);

    // The target's configuration: the same state, another token.
    Config next = c;
    next.pkcs11_module = to.module_path;
    next.token_label = to.token_label;
    next.pin_source = "file:" + absolute_path(to.pin_file);
    next.module_env = to.module_env;

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

    Undo undo;
    undo.db = c.path_of(c.database);
    undo.db_copy = undo.db + ".pre-migration";
    undo.audit = c.path_of(c.audit_file);
    undo.target = target->get();
    // The copy is taken with no connection open: vault.db alone is the
    // database (SQLite folds its WAL back in when the last connection closes).
    {
        auto probe = Store::open(undo.db, Store::Mode::open_existing);
        if (!probe)
            return tl::unexpected(probe.error());
    }
    if (auto r = copy_file(undo.db, undo.db_copy); !r)
        return tl::unexpected(r.error());
    auto store = Store::open(undo.db, Store::Mode::open_existing);
    if (!store)
        return tl::unexpected(store.error());
    auto old_signing = (*store)->setting(signing_key_setting);
    if (!old_signing || !*old_signing)
        return fail(Errc::storage, "the database names no audit signing key");

    auto new_signing = (*target)->create_signing_key("vaultfs-audit-signing " + dir);
    if (!new_signing)
        return fail(Errc::key_unavailable, "cannot make the audit signing key in " + target_name + ": " +
                                               new_signing.error().message);
    undo.signing = *new_signing;

    std::size_t resealed = 0;
    std::size_t kek_count = 0;
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
                                                 "' and can never leave it: " + list +
                                                 "; nothing was changed");
        }
        auto keks = tx.kek_ids();
        if (!keks)
            return tl::unexpected(keks.error());
        for (const auto& id : *keks) {
            if (auto r = (*target)->create_kek_with_id("vaultfs-kek " + id, hsm::KeyId{id}); !r)
                return fail(Errc::key_unavailable, "cannot make KEK " + id + " in " + target_name + ": " +
                                                       r.error().message);
            undo.keks.push_back(hsm::KeyId{id});
        }
        kek_count = keks->size();
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
                return fail(Errc::key_unavailable, "sealing a DEK in " + target_name + ": " + sealed.error().message);
            if (auto r = tx.replace_sealed_dek(row, *sealed); !r)
                return r;
            ++resealed;
        }
        return tx.set_setting(signing_key_setting, new_signing->hex);
    });
    if (!written)
        return tl::unexpected(written.error());
    undo.db_changed = true;
    done.push_back(std::to_string(kek_count) + " KEK(s) made in " + target_name +
                   " under the same ids; " + std::to_string(resealed) +
                   " DEK(s) re-sealed token to token (" + std::string(hsm::to_string(next.schemes.seal)) +
                   "); no value was decrypted");

    // The audit trail hands over from the old signing key to the new one.
    struct stat st{};
    if (::stat(undo.audit.c_str(), &st) != 0)
        return fail(Errc::audit_unavailable, "cannot stat " + undo.audit + ": " + std::strerror(errno));
    undo.audit_size = st.st_size;
    {
        audit::Log::Options ao;
        ao.path = undo.audit;
        ao.sync = AuditSync::always;
        ao.bound = audit::Bound{c.audit_checkpoint_records, static_cast<std::uint64_t>(c.audit_checkpoint_interval.count())};
        auto log = audit::Log::open(std::move(ao), audit::Signer{source->get(), hsm::KeyId{**old_signing}}, store->get());
        if (!log)
            return fail(log.error().code, "the audit trail: " + log.error().message + "; nothing was changed");
        if (auto r = (*log)->hand_over(audit::Signer{target->get(), *new_signing}, target_name); !r)
            return fail(r.error().code, "the audit hand-over: " + r.error().message + "; nothing was changed");
        if (auto r = (*log)->close(); !r)
            return fail(r.error().code, "the audit trail: " + r.error().message + "; nothing was changed");
    }
    auto der = (*target)->public_key_der(*new_signing);
    if (!der)
        return fail(Errc::key_unavailable, der.error().message);
    auto pem = public_key_pem(*der);
    if (!pem)
        return tl::unexpected(pem.error());
    // The old public key is kept beside the new one, for copies of the trail
    // verified elsewhere; the new one alone verifies the whole chain.
    const std::string pub = c.path_of(c.audit_public_key);
    static_cast<void>(copy_file(pub, pub + ".before-migration"));
    store->reset();
    if (auto r = replace_file(dir + "/" + config_file_name, render_config(next), 0600); !r)
        return tl::unexpected(r.error());
    undo.armed = false;
    if (auto r = replace_file(pub, *pem, 0644); !r)
        return tl::unexpected(r.error());
    done.push_back(c.audit_public_key + "    the new audit signing key (" +
                   std::string(hsm::to_string(next.schemes.signature)) + ", in " + target_name +
                   "); the log hands over to it in a signed handover record; the old key's public half is in " +
                   c.audit_public_key + ".before-migration");
    done.push_back(std::string(config_file_name) + "             now names " + target_name + " (module " +
                   next.pkcs11_module + ")");
    done.push_back("the old token '" + c.token_label + "' was not changed: remove vaultfs's keys from it when you "
                   "no longer need its backups (backups made before now need it)");
    return done;
}

}  // namespace vaultfs::vault
