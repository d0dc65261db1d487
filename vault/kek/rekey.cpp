#include "vault/kek/rekey.hpp"

#include <openssl/rand.h>
#include <spdlog/spdlog.h>

#include <array>
#include <nlohmann/json.hpp>

#include "hsm/hex.hpp"
#include "vault/crypto/envelope.hpp"
#include "vault/hosts/enrolment.hpp"
#include "vault/objects/objects.hpp"

namespace vaultfs::vault::kek {

namespace {

using json = nlohmann::json;

// Rows read and sealed again per query (bounded memory, whatever the vault).
constexpr std::size_t page = 256;

}  // namespace

Result<std::string> fresh_kek_id()
{
    std::array<std::uint8_t, 16> id{};
    if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1)
        return fail(Errc::key_unavailable, "RAND_bytes failed");
    return hsm::to_hex(id);
}

namespace {

// What a row's value and DEK are bound to: a secret's version, or an
// exportable certificate key (version 0, bound by its key_ref).
struct Bound {
    std::string name;
    std::uint64_t version = 0;
};

Bound bound_of(const SealedRow& row)
{
    if (row.table == SealedDek::Table::versions)
        return Bound{row.name, row.version};
    ObjectVersionRow ov;
    ov.body = row.body;
    return Bound{sealed_key_binding(row.name, ov), 0};
}

std::string path_of(const SealedRow& row)
{
    return row.table == SealedDek::Table::versions ? row.name + "@" + std::to_string(row.version)
                                                   : ".certs/" + row.name + "@" + std::to_string(row.version);
}

}  // namespace

Rekey::Rekey(Core& core, hsm::Pkcs11KeyService& keys, hsm::KekReach reach, hosts::Enrolment* enrolment,
             std::int64_t day_ms)
    : core_(core), keys_(keys), reach_(reach), enrolment_(enrolment), day_ms_(day_ms)
{
}

namespace {

// Opens `row` with its DEK and seals it again under a new DEK that `kek`
// seals, bound to `kek`'s id; the value only in locked memory.
Result<void> reseal(hsm::KeyService& keys_, VaultId vault, SealedRow& row, const std::string& kek)
{
    const Bound b = bound_of(row);
    const Binding before{vault, b.name, b.version, row.kek_id};
    auto dek = keys_.unseal(hsm::KeyId{row.kek_id}, row.sealed_dek, dek_aad(before));
    if (!dek)
        return fail(dek.error().code == hsm::Errc::authentication_failed ? Errc::integrity : Errc::key_unavailable,
                    path_of(row) + ": its DEK does not unseal under KEK " + row.kek_id + " (" + dek.error().message +
                        "); nothing was changed");
    auto value = open_value(*dek, row.nonce, row.ciphertext, value_aad(before));
    if (!value)
        return fail(value.error().code, path_of(row) + ": " + value.error().message + "; nothing was changed");
    auto next = new_dek();
    if (!next)
        return tl::unexpected(next.error());
    const Binding after{vault, b.name, b.version, kek};
    auto sealed = seal_value(*next, value->bytes(), value_aad(after));
    if (!sealed)
        return tl::unexpected(sealed.error());
    auto sealed_dek = keys_.seal(hsm::KeyId{kek}, *next, dek_aad(after));
    if (!sealed_dek)
        return fail(Errc::key_unavailable, "sealing a DEK under the new KEK: " + sealed_dek.error().message +
                                               "; nothing was changed");
    row.kek_id = kek;
    row.nonce = std::move(sealed->nonce);
    row.ciphertext = std::move(sealed->ciphertext);
    row.sealed_dek = std::move(*sealed_dek);
    return {};
}

}  // namespace

Result<std::size_t> move_vault_to(Store::Transaction& tx, hsm::KeyService& keys, VaultId vault,
                                  const std::string& old_kek, const std::string& kek)
{
    auto current = tx.vault_kek(vault, true);
    if (!current)
        return tl::unexpected(current.error());
    if (*current != old_kek)
        return fail(Errc::busy, "the vault got another KEK meanwhile; nothing was changed");
    std::size_t resealed = 0;
    for (const auto table : {SealedDek::Table::versions, SealedDek::Table::object_versions}) {
        for (std::int64_t after = 0;;) {
            auto rows = tx.sealed_rows(vault, table, after, page);
            if (!rows)
                return tl::unexpected(rows.error());
            for (auto& row : *rows) {
                if (auto r = reseal(keys, vault, row, kek); !r)
                    return tl::unexpected(r.error());
                if (auto r = tx.replace_sealed_row(row); !r)
                    return tl::unexpected(r.error());
                ++resealed;
                after = row.row;
            }
            if (rows->size() < page)
                break;
        }
    }
    if (auto r = tx.set_vault_kek(vault, kek, now_micros()); !r)
        return tl::unexpected(r.error());
    if (auto r = tx.delete_kek_check(old_kek); !r)
        return tl::unexpected(r.error());
    return resealed;
}

Result<void> Rekey::check_hosts_reached()
{
    if (enrolment_ == nullptr)
        return {};
    if (reach_ != hsm::KekReach::trusted_tokens) {
        auto hosts = core_.store().hosts();
        if (hosts)
            for (const auto& h : *hosts)
                if (h.status == "enrolled" && h.id != core_.store().host_id())
                    return fail(Errc::not_permitted, "this token cannot share a new KEK with host " + h.name +
                                                         " (it does not enforce CKA_WRAP_WITH_TRUSTED): rekey on "
                                                         "another host");
        return {};
    }
    auto unreached = enrolment_->unreached_hosts();
    if (!unreached)
        return tl::unexpected(unreached.error());
    if (unreached->empty())
        return {};
    std::string names;
    for (const auto& n : *unreached)
        names += (names.empty() ? "" : ", ") + n;
    return fail(Errc::not_permitted,
                "host(s) " + names + " could not get the new KEK: neither this token nor a host it reaches trusts "
                "their transport key; run `vaultfs host trust NAME` here (with this token's SO PIN), then rekey");
}

Result<Rekeyed> Rekey::rekey(const Caller* caller, std::string_view name)
{
    std::lock_guard one(rekey_mutex_);
    audit::Event ev{.op = "vault_rekey", .caller = caller, .vault = name, .allowed = false, .rule = "not-found"};
    auto v = core_.load_vault(name);
    if (!v)
        return core_.refuse(ev, v.error().code, "no vault '" + std::string(name) + "'");
    Decided d;  // lives as long as `ev`, which points into it
    if (caller != nullptr) {
        d = core_.decide(*caller, **v, policy::Permission::manage);
        d.fill(ev);
        if (!d.allowed)
            return core_.refuse(ev, Errc::access_denied, "rekeying a vault needs manage");
    } else {
        ev.allowed = true;
        ev.rule = "rekey_after_days";
    }
    if (auto r = check_hosts_reached(); !r)
        return core_.refuse(ev, r.error().code, r.error().message);

    const VaultId id = (*v)->row.id;
    Rekeyed done{std::string(name), (*v)->row.kek_id, {}, 0};
    auto fresh = fresh_kek_id();
    if (!fresh)
        return core_.refuse(ev, fresh.error().code, fresh.error().message);
    done.new_kek = *fresh;
    // Recorded before the key exists: a crash from here on leaves nothing
    // that recover() does not know of.
    const json pending{{"vault", done.vault}, {"vault_id", id.value}, {"old", done.old_kek}, {"new", done.new_kek}};
    if (auto r = core_.store().write([&](Store::Transaction& tx) { return tx.set_setting(pending_setting, pending.dump()); });
        !r)
        return core_.refuse(ev, r.error().code, r.error().message);
    const auto forget_pending = [&] {
        (void)core_.store().write([&](Store::Transaction& tx) { return tx.delete_setting(pending_setting); });
    };
    if (auto r = keys_.create_kek_with_id("vaultfs-kek-" + done.vault, hsm::KeyId{done.new_kek}, reach_); !r) {
        forget_pending();
        spdlog::error("rekey of vault {}: cannot make the new KEK: {}", done.vault, r.error().message);
        return core_.refuse(ev, Errc::key_unavailable, "cannot make the new KEK: " + r.error().message);
    }

    std::string reason;
    bool audited = false;
    auto w = core_.store().write([&](Store::Transaction& tx) -> Result<void> {
        auto moved = move_vault_to(tx, keys_, id, done.old_kek, done.new_kek);
        if (!moved)
            return tl::unexpected(moved.error());
        done.resealed = *moved;
        if (enrolment_ != nullptr)
            if (auto r = enrolment_->wrap_for_hosts(tx, hsm::KeyId{done.new_kek}); !r)
                return r;
        reason = std::to_string(done.resealed) + " row(s) sealed again under KEK " + done.new_kek + ", in place of " +
                 done.old_kek;
        ev.reason = reason;
        ev.result = "ok";
        // Written before COMMIT: if the audit cannot take it, nothing commits.
        if (auto r = core_.record(ev); !r)
            return r;
        audited = true;
        return {};
    },
                                 false);  // one transaction for the whole vault: as long as it takes
    if (!w && w.error().code == Errc::in_doubt) {
        // It may have committed: both KEKs stay, and so does the pending
        // note, which recover() settles by the KEK the vault names.
        ev.result = {};
        ev.reason = w.error().message;
        spdlog::error("rekey of vault {}: {}", done.vault, w.error().message);
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    if (!w) {
        (void)keys_.destroy_kek(hsm::KeyId{done.new_kek});
        forget_pending();
        if (w.error().code == Errc::audit_unavailable && !audited)
            return tl::unexpected(w.error());
        ev.result = {};
        ev.reason = {};
        spdlog::error("rekey of vault {} failed: {}", done.vault, w.error().message);
        return core_.refuse(ev, w.error().code, w.error().message);
    }
    core_.forget_vault(id);
    if (auto r = keys_.destroy_kek(hsm::KeyId{done.old_kek}); !r)
        spdlog::error("rekey of vault {}: the old KEK {} stays in the token until the next start: {}", done.vault,
                      done.old_kek, r.error().message);
    else
        forget_pending();
    spdlog::info("vault {} rekeyed: {}", done.vault, reason);
    (void)inspect();
    return done;
}

Result<void> Rekey::recover()
{
    auto text = core_.store().setting(pending_setting);
    if (!text)
        return tl::unexpected(text.error());
    if (!*text)
        return {};
    const json pending = json::parse(**text, nullptr, false);
    if (!pending.is_object())
        return fail(Errc::storage, "this host's record of an interrupted rekey is damaged; remove the setting '" +
                                       std::string(pending_setting) + "' after checking the token's KEKs");
    const std::string old_kek = pending.value("old", std::string());
    const std::string new_kek = pending.value("new", std::string());
    const std::string name = pending.value("vault", std::string());
    auto row = core_.store().vault_by_id(VaultId{pending.value("vault_id", std::int64_t{0})});
    if (!row)
        return tl::unexpected(row.error());
    const std::string in_use = *row ? (*row)->kek_id : std::string();
    // Whichever of the two the vault does not use goes; never the one it does.
    const std::string& spare = in_use == new_kek ? old_kek : new_kek;
    if (spare != in_use)
        if (auto r = keys_.destroy_kek(hsm::KeyId{spare}); !r)
            return fail(Errc::key_unavailable, "finishing the interrupted rekey of vault " + name + ": " + r.error().message);
    spdlog::warn("the rekey of vault {} was interrupted; the vault {} KEK {}, and KEK {} was removed from the token",
                 name, in_use == new_kek ? "is on its new" : "stays on its old", in_use, spare);
    return core_.store().write([&](Store::Transaction& tx) { return tx.delete_setting(pending_setting); });
}

Result<std::size_t> Rekey::rotate_due(Micros now)
{
    auto vaults = core_.store().vaults();
    if (!vaults)
        return tl::unexpected(vaults.error());
    std::size_t n = 0;
    for (const auto& v : *vaults) {
        if (v.rekey_after_days <= 0 || now - v.kek_created < static_cast<Micros>(v.rekey_after_days) * day_ms_ * 1000)
            continue;
        if (auto r = rekey(nullptr, v.name); !r)
            spdlog::error("the KEK rotation of vault {} failed: {}", v.name, r.error().message);
        else
            ++n;
    }
    return n;
}

Result<std::vector<Finding>> Rekey::inspect()
{
    auto vaults = core_.store().vaults();
    if (!vaults)
        return tl::unexpected(vaults.error());
    std::vector<Finding> found;
    for (const auto& v : *vaults) {
        auto exposure = keys_.kek_exposure(hsm::KeyId{v.kek_id});
        if (!exposure)
            continue;  // not (yet) in this token: another host's to judge
        using E = hsm::Pkcs11KeyService::KekExposure;
        if (*exposure == E::any_wrapping_key)
            found.push_back({v.name, "its KEK can be wrapped out of the token under any key (made by an older "
                                     "vaultfs): run `vaultfs vault rekey " + v.name + "`"});
        else if (*exposure == E::none && reach_ == hsm::KekReach::trusted_tokens)
            found.push_back({v.name, "its KEK was made for one host and cannot be shared: run `vaultfs vault rekey " +
                                         v.name + "`"});
    }
    std::lock_guard lock(findings_mutex_);
    findings_ = found;
    return found;
}

std::vector<Finding> Rekey::findings() const
{
    std::lock_guard lock(findings_mutex_);
    return findings_;
}

}  // namespace vaultfs::vault::kek
