// The open files of a restart (fs/daemon/restart/supervisor.hpp): what the old
// process hands over and the new one re-creates. Only readers of secrets
// go across; they hold nothing but a version's ciphertext, which the new
// process reads again and opens with its own token sessions. What holds
// data that exists only in this process (a value being written, a staging
// file) makes a restart wait, and refuse if it is still there.
#include <spdlog/spdlog.h>

#include <sstream>

#include "fs/fuse/filesystem.hpp"

namespace vaultfs::fs {

std::string Filesystem::handover_blockers()
{
    std::size_t writes = 0, others = 0;
    for (const auto& [fh, h] : handles_.all()) {
        if (h->kind == Handle::Kind::value)
            continue;
        if (h->kind == Handle::Kind::write || h->kind == Handle::Kind::policy || h->kind == Handle::Kind::staging)
            ++writes;
        else
            ++others;
    }
    const std::size_t staged = staging_.count();
    std::string why;
    const auto add = [&](std::size_t n, const std::string& what) {
        if (n == 0)
            return;
        why += (why.empty() ? "" : ", ") + std::to_string(n) + " " + what;
    };
    add(writes, "file(s) open for writing");
    add(staged, "staging file(s) (an editor's or sed -i's temporary file)");
    add(others, "open director(ies) or key/certificate file(s)");
    return why;
}

std::string Filesystem::export_handles()
{
    std::ostringstream out;
    out << "mounted " << mounted_at_.tv_sec << ' ' << mounted_at_.tv_nsec << '\n';
    for (const auto& [fh, h] : handles_.all()) {
        if (h->kind != Handle::Kind::value)
            continue;
        const auto& v = static_cast<const ValueHandle&>(*h);
        out << "value " << fh << ' ' << v.secret.value << ' ' << v.version.value << ' ' << (v.follows_name ? 1 : 0)
            << ' ' << v.reader.ino().value_or(0) << ' ' << v.charge.uid() << '\n';
    }
    return out.str();
}

std::size_t Filesystem::adopt(const std::string& exported)
{
    std::istringstream in(exported);
    std::string kind;
    std::size_t adopted = 0;
    while (in >> kind) {
        if (kind == "mounted") {
            in >> mounted_at_.tv_sec >> mounted_at_.tv_nsec;
            continue;
        }
        std::uint64_t fh = 0, ino = 0;
        std::int64_t secret = 0, version = 0;
        int follows = 0;
        uid_t uid = 0;
        if (kind != "value" || !(in >> fh >> secret >> version >> follows >> ino >> uid))
            break;
        auto value = service_.reopen_value(vault::VersionId{version});
        auto charge = quota_.open(uid);
        if (!value || !charge) {
            spdlog::error("restart: the reader (handle {}) of version id {} cannot be opened again ({}); its reads "
                          "fail with EBADF",
                          fh, version, value ? "the uid's open-file limit" : value.error().message);
            continue;
        }
        vault::SecretView view;
        view.id = vault::SecretId{secret};
        view.version.id = vault::VersionId{version};
        view.pinned = follows == 0;
        PageCacheReaders::Ticket ticket = ino != 0 ? page_cache_readers_.enter(ino) : PageCacheReaders::Ticket{};
        ticket.filled();  // its pages are there, or reads come here
        if (handles_.add_at(fh, std::make_shared<ValueHandle>(std::move(*value), view, std::move(*charge),
                                                               std::move(ticket))))
            ++adopted;
    }
    return adopted;
}

void Filesystem::number_from(std::uint64_t base)
{
    handles_.number_from(base);
    staging_.number_from(static_cast<std::int64_t>(base));
}

}  // namespace vaultfs::fs
