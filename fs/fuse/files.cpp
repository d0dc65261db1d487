// Filesystem: opening, reading, writing, flushing and releasing files (see
// filesystem.hpp).
#include "fs/fuse/filesystem.hpp"

#include <poll.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <variant>

#include "fs/fuse/errno_map.hpp"
#include "fs/fuse/filesystem_detail.hpp"
#include "fs/fuse/reply.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::fs {

using policy::Permission;
using policy::PermissionSet;
using vault::Errc;
using namespace detail;

// ---- files ------------------------------------------------------------------------------

Reply Filesystem::open_value(const vault::Caller& caller, const vault::SecretView& view, fuse_file_info* fi,
                             std::optional<fuse_ino_t> cached)
{
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "get", view.vault_name, view.name, vault::Errc::too_many_open));
    // A reader through the page cache gets the value open_value
    // authenticated, to fill the pages with (wiped when this returns).
    hsm::SecureBuffer plain;
    auto value = service_.open_value(caller, view, cached ? &plain : nullptr);
    if (!value)
        return Reply::err(value.error());
    fi->noflush = 1;  // nothing to commit on close of a reader
    if (!cached) {
        fi->direct_io = 1;
        fi->keep_cache = 0;
        fi->fh = handles_.add(std::make_shared<ValueHandle>(std::move(*value), view, std::move(*charge)));
        return Reply{Reply::Open{*fi}};
    }
    // For the life of this open, the inode of the version `S` stands for
    // holds the value in the page cache: every read() of it, the one at EOF
    // included, is answered by the kernel without a round trip. That
    // inode's content never changes (it is one version's), so what an
    // earlier reader left is the same bytes; the first reader fills the
    // pages here, before the open is answered, and release drops them.
    // Another opener of the inode waits in enter() until this fill is done:
    // a read of its own would lock pages the fill then waits for.
    auto ticket = page_cache_readers_.enter(*cached);
    fi->direct_io = 0;
    fi->keep_cache = 1;
    if (ticket.first()) {
        if (!fill_page_cache(*cached, plain))
            fi->keep_cache = 0;  // the kernel clears the pages; reads come here
        ticket.filled();
    }
    fi->fh = handles_.add(std::make_shared<ValueHandle>(std::move(*value), view, std::move(*charge), std::move(ticket)));
    return Reply{Reply::Open{*fi}};
}

bool Filesystem::fill_page_cache(fuse_ino_t ino, const hsm::SecureBuffer& plain)
{
    if (plain.size() == 0)
        return true;
    fuse_bufvec bv{};  // FUSE_BUFVEC_INIT, without its compound literal
    bv.count = 1;
    bv.buf[0].size = plain.size();
    bv.buf[0].fd = -1;
    bv.buf[0].mem = const_cast<std::uint8_t*>(plain.data());
    if (const int r = fuse_lowlevel_notify_store(session_, ino, 0, &bv, FUSE_BUF_NO_SPLICE); r != 0) {
        spdlog::warn("could not fill the page cache of inode {}: {} (reads go to the daemon)", ino, std::strerror(-r));
        return false;
    }
    return true;
}

Reply Filesystem::open_for_write(const vault::Caller& caller, vault::VaultId vault, const std::string& name,
                                 vault::SecretService::WriteIntent intent, fuse_file_info* fi, bool reply_create)
{
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "set", "", name, vault::Errc::too_many_open));
    auto grant = service_.open_for_write(caller, vault, name, intent);
    if (!grant)
        return Reply::err(grant.error());
    // Every writer starts from an empty value: it writes a whole new version.
    auto handle = std::make_shared<WriteHandle>(caller, std::move(*grant), (fi->flags & O_TRUNC) != 0 || intent.create,
                                                std::move(*charge));
    handle->readable = (fi->flags & O_ACCMODE) == O_RDWR;
    if (reply_create) {
        handle->creating = true;
        creating(handle->grant.secret.value, caller.who.uid, true);
    }
    fi->fh = handles_.add(handle);
    fi->direct_io = 1;
    fi->keep_cache = 0;
    if (!reply_create)
        return Reply{Reply::Open{*fi}};
    auto entry = entry_for(caller, Node{NodeKind::secret, handle->grant.secret.value});
    fuse_entry_param e{};
    if (const auto* found = std::get_if<Reply::Entry>(&entry.v)) {
        e = found->e;
    } else {
        e.ino = to_ino(Node{NodeKind::secret, handle->grant.secret.value});
        e.attr.st_ino = e.ino;
        e.attr.st_mode = S_IFREG | 0400;
        e.attr.st_nlink = 1;
        e.attr.st_blksize = 4096;
        e.generation = static_cast<std::uint64_t>(handle->grant.secret_created);
    }
    // What is being written changes with every write, and the name stands
    // for another inode once a version commits: the kernel asks again.
    e.attr_timeout = 0;
    e.entry_timeout = 0;
    return Reply{Reply::Create{e, *fi}};
}

Reply Filesystem::open_policy(const vault::Caller& caller, vault::VaultId vault, fuse_file_info* fi)
{
    const int mode = fi->flags & O_ACCMODE;
    if (mode == O_RDWR || (fi->flags & O_APPEND))
        return Reply::err(EINVAL);
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, mode == O_RDONLY ? "policy_get" : "policy_set", "", "",
                                                     vault::Errc::too_many_open));
    std::shared_ptr<PolicyHandle> handle;
    if (mode == O_RDONLY) {
        auto text = service_.read_policy(caller, vault);
        if (!text)
            return Reply::err(text.error());
        if (!charge->grow(text->size()))
            return Reply::err(service_.refuse_over_limit(caller, "policy_get", "", "", Errc::out_of_memory));
        handle = std::make_shared<PolicyHandle>(caller, vault, false, std::move(*text), std::move(*charge));
    } else {
        if (auto r = service_.authorize(caller, vault, Permission::manage, "policy_set"); !r)
            return Reply::err(r.error());
        handle = std::make_shared<PolicyHandle>(caller, vault, true, std::string(), std::move(*charge));
    }
    fi->fh = handles_.add(handle);
    fi->direct_io = 1;
    return Reply{Reply::Open{*fi}};
}

Reply Filesystem::create(fuse_req_t req, fuse_ino_t parent, const char* name_c, mode_t mode, fuse_file_info* fi)
{
    const auto p = from_ino(parent);
    if (!p || p->kind != NodeKind::vault)
        return Reply::err(EPERM);
    const std::string name(name_c);
    if (name == ".policy" || name == ".versions" || name == ".deleted" || name == ".keys" || name == ".certs")
        return Reply::err(EEXIST);
    const auto caller = caller_of(req);
    if (is_staging_name(name))
        return staging_create(caller, vault::VaultId{p->id}, name, mode, fi);
    if (const auto path = vault::parse_secret_path(name); path && path->version)
        return Reply::err(EROFS);
    // A new file: O_RDWR reads back what it wrote (mkstemp's files are O_RDWR).
    if (fi->flags & O_APPEND)
        return Reply::err(EINVAL);
    const vault::SecretService::WriteIntent intent{true, (fi->flags & O_EXCL) != 0};
    return open_for_write(caller, vault::VaultId{p->id}, name, intent, fi, true);
}

Reply Filesystem::open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    const int mode = fi->flags & O_ACCMODE;
    if (is_object_kind(node->kind))
        return object_open(caller, *node, fi);
    switch (node->kind) {
    case NodeKind::policy_file:
        return open_policy(caller, vault::VaultId{node->id}, fi);
    case NodeKind::staging: {
        const auto file = staging_.by_id(node->id, caller.who.uid);
        if (!file)
            return Reply::err(ESTALE);  // renamed or discarded: the kernel looks the name up again
        return staging_open(caller, file, fi, false);
    }
    case NodeKind::version: {
        if (mode != O_RDONLY)
            return Reply::err(EROFS);
        auto view = service_.version_by_id(caller, vault::VersionId{node->id});
        if (!view)
            return Reply::err(view.error());
        return open_value(caller, *view, fi);
    }
    case NodeKind::secret:
    case NodeKind::current: {
        // A value is written whole: O_APPEND never, O_RDWR only for a new
        // file. A readable writer of this inode could map it and see (or,
        // through its own reads, fill) the page cache its readers share.
        if (mode == O_RDWR || (fi->flags & O_APPEND))
            return Reply::err(EINVAL);
        if (mode != O_RDONLY) {
            auto view = node->kind == NodeKind::secret ? service_.secret_by_id(caller, vault::SecretId{node->id})
                                                       : service_.secret_at_version(caller, vault::VersionId{node->id});
            if (!view)
                return Reply::err(gone_is_stale(*node, view.error()));
            return open_for_write(caller, view->vault, view->name, {false, false}, fi, false);
        }
        // A reader gets what S stands for now: on the inode of an older
        // version (a name the kernel still caches), ESTALE makes the kernel
        // look S up again and open the inode of the version now.
        auto view = node->kind == NodeKind::secret ? service_.secret_by_id(caller, vault::SecretId{node->id})
                                                   : current_view(caller, node->id);
        if (!view)
            return Reply::err(gone_is_stale(*node, view.error()));
        return open_value(caller, *view, fi,
                          node->kind == NodeKind::current ? std::optional<fuse_ino_t>(ino) : std::nullopt);
    }
    case NodeKind::deleted_secret:
        return Reply::err(EACCES);  // no value until it is recovered
    default:
        return Reply::err(EISDIR);
    }
}

Reply Filesystem::read(fuse_req_t, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi)
{
    auto h = handles_.find(fi->fh);
    if (!h)
        return Reply::err(EBADF);
    if (off < 0)
        return Reply::err(EINVAL);
    const auto slice = [&](const void* data, std::size_t total) {
        const auto start = std::min<std::size_t>(static_cast<std::size_t>(off), total);
        const auto n = std::min(size, total - start);
        return Reply{Reply::Buffer{static_cast<const char*>(data) + start, n, h}};
    };
    // A locked copy of [off, off + size) of `bytes`, wiped once sent.
    const auto copy_out = [&](std::span<const std::uint8_t> bytes) -> Reply {
        const auto start = std::min(static_cast<std::size_t>(off), bytes.size());
        const auto n = std::min(size, bytes.size() - start);
        if (n == 0)
            return Reply{Reply::Buffer{nullptr, 0, nullptr}};
        auto copy = hsm::SecureBuffer::copy_of(bytes.subspan(start, n));
        if (!copy)
            return Reply::err(ENOMEM);
        auto owned = std::make_shared<const hsm::SecureBuffer>(std::move(*copy));
        return Reply{Reply::Buffer{owned->data(), owned->size(), owned}};
    };
    switch (h->kind) {
    case Handle::Kind::value: {
        const auto& v = static_cast<const ValueHandle&>(*h).value;
        if (static_cast<std::uint64_t>(off) >= v.size())
            return Reply{Reply::Buffer{nullptr, 0, nullptr}};  // end of file: nothing to decrypt
        // Decrypted for this read only, into locked memory wiped once the
        // reply is sent.
        auto plain = v.plaintext();
        if (!plain)
            return Reply::err(plain.error());
        auto owned = std::make_shared<const hsm::SecureBuffer>(std::move(*plain));
        const auto start = std::min(static_cast<std::size_t>(off), owned->size());
        const auto n = std::min(size, owned->size() - start);
        return Reply{Reply::Buffer{owned->data() + start, n, owned}};
    }
    case Handle::Kind::policy: {
        auto& p = static_cast<PolicyHandle&>(*h);
        if (p.writing)
            return Reply::err(EBADF);
        return slice(p.text.data(), p.text.size());
    }
    case Handle::Kind::write: {
        // O_RDWR: the writer's own bytes, nothing of any version.
        auto& w = static_cast<WriteHandle&>(*h);
        if (!w.readable)
            return Reply::err(EBADF);
        std::lock_guard lock(w.mutex);
        return copy_out(w.buffer.bytes());
    }
    case Handle::Kind::staging: {
        auto& file = *static_cast<StagingHandle&>(*h).file;
        std::lock_guard lock(file.mutex);
        return copy_out(file.data.bytes());
    }
    case Handle::Kind::object:
        return object_read(h, size, off);
    default:
        return Reply::err(EBADF);
    }
}

namespace {

// Copies `size` bytes from libfuse's buffer into `into` at `off`, growing it
// (charged to `charge`) up to `limit`; then wipes libfuse's copy (ordinary,
// reused heap). Returns 0 or the errno.
int write_into(hsm::SecureBuffer& into, UidQuota::Charge& charge, std::size_t limit, const char* buf,
               std::size_t size, std::size_t off)
{
    const std::size_t end = off + size;
    int err = 0;
    if (end > limit)
        err = EFBIG;
    else if (end > into.size() && !charge.grow(end - into.size()))
        err = ENOMEM;
    else if (end > into.size() && !into.resize(end))
        err = ENOMEM;
    if (err == 0)
        std::memcpy(into.data() + off, buf, size);
    OPENSSL_cleanse(const_cast<char*>(buf), size);
    return err;
}

}  // namespace

Reply Filesystem::write(fuse_req_t, fuse_ino_t, const char* buf, size_t size, off_t off, fuse_file_info* fi)
{
    auto h = handles_.find(fi->fh);
    if (!h)
        return Reply::err(EBADF);
    if (off < 0)
        return Reply::err(EINVAL);
    const auto end = static_cast<std::size_t>(off) + size;
    if (h->kind == Handle::Kind::object)
        return object_write(h, buf, size);
    if (h->kind == Handle::Kind::write) {
        auto& w = static_cast<WriteHandle&>(*h);
        std::lock_guard lock(w.mutex);
        // After a failed write nothing from this handle will ever commit,
        // and every later write says so (a shell's `printf > S` never sees
        // close()'s error, so write() must carry it).
        if (w.failed != 0) {
            OPENSSL_cleanse(const_cast<char*>(buf), size);
            return Reply::err(w.failed);
        }
        // What would fail the commit and is known now fails this write:
        // `set` revoked, the secret deleted, the audit or the token down.
        // Asked once per value (its first write), not for every piece of it;
        // the commit checks again.
        if (auto r = w.written ? vault::Result<void>{} : service_.check_commit(w.caller, w.grant); !r) {
            OPENSSL_cleanse(const_cast<char*>(buf), size);
            w.failed = to_errno(r.error().code);
            spdlog::warn("write to {}/{} by uid {} refused: {}", w.grant.vault_name, w.grant.name, w.caller.who.uid,
                         r.error().message);
            return Reply::err(w.failed);
        }
        if (const int err = write_into(w.buffer, w.charge, vault::max_value_size, buf, size,
                                       static_cast<std::size_t>(off));
            err != 0) {
            w.failed = err;
            if (err == ENOMEM)
                return Reply::err(service_.refuse_over_limit(w.caller, "commit", w.grant.vault_name, w.grant.name,
                                                             vault::Errc::out_of_memory));
            return Reply::err(err);
        }
        w.dirty = true;
        w.written = true;
        return Reply{Reply::Written{size}};
    }
    if (h->kind == Handle::Kind::staging) {
        auto& file = *static_cast<StagingHandle&>(*h).file;
        std::lock_guard lock(file.mutex);
        if (file.gone) {
            OPENSSL_cleanse(const_cast<char*>(buf), size);
            return Reply::err(ESTALE);  // renamed or removed: these bytes would reach nothing
        }
        if (const int err = write_into(file.data, file.charge, StagingArea::max_bytes, buf, size,
                                       static_cast<std::size_t>(off));
            err != 0)
            return Reply::err(err);
        file.modified = vault::now_micros();
        return Reply{Reply::Written{size}};
    }
    if (h->kind == Handle::Kind::policy) {
        auto& p = static_cast<PolicyHandle&>(*h);
        std::lock_guard lock(p.mutex);
        if (!p.writing)
            return Reply::err(EBADF);
        if (p.failed != 0)
            return Reply::err(p.failed);
        if (end > max_policy_size) {
            p.failed = EFBIG;
            return Reply::err(EFBIG);
        }
        if (end > p.text.size()) {
            if (!p.charge.grow(end - p.text.size())) {
                p.failed = ENOMEM;
                return Reply::err(service_.refuse_over_limit(p.caller, "policy_set", "", "", vault::Errc::out_of_memory));
            }
            p.text.resize(end, '\0');
        }
        p.text.replace(static_cast<std::size_t>(off), size, buf, size);
        p.written = true;
        // Each line is checked as it arrives, so that a shell's `printf >
        // .policy` -- which never sees close()'s error -- sees this write's.
        if (static_cast<std::size_t>(off) < p.checked) {
            p.failed = EINVAL;  // rewriting lines already checked: write the policy once, in order
            spdlog::warn("policy of vault {} by uid {}: rewritten in place", p.vault.value, p.caller.who.uid);
            return Reply::err(EINVAL);
        }
        for (std::size_t nl; (nl = p.text.find('\n', p.checked)) != std::string::npos && nl < end;) {
            const std::string_view line(p.text.data() + p.checked, nl - p.checked);
            ++p.checked_lines;
            if (auto r = service_.check_policy_line(p.caller, p.vault, line, p.checked_lines); !r) {
                p.failed = EINVAL;
                spdlog::warn("policy of vault {} refused from uid {}: {}", p.vault.value, p.caller.who.uid,
                             r.error().message);
                return Reply::err(EINVAL);
            }
            p.checked = nl + 1;
        }
        return Reply{Reply::Written{size}};
    }
    return Reply::err(EBADF);
}

Reply Filesystem::flush(fuse_req_t, fuse_ino_t ino, fuse_file_info* fi)
{
    auto h = handles_.find(fi->fh);
    // Only writers are flushed (readers and operation files are opened
    // noflush); one this process does not know was dropped by
    // `restart --force`, and what it held was never committed.
    if (!h)
        return Reply::err(EBADF);
    if (h->kind == Handle::Kind::write) {
        auto& w = static_cast<WriteHandle&>(*h);
        std::lock_guard lock(w.mutex);
        if (w.failed != 0)
            return Reply::err(w.failed);
        // A flush comes with every close(), including that of a shell's
        // temporary duplicate before anything is written; only a flush that
        // follows written bytes commits. One version per such flush, and
        // its failure is close()'s error. (A value left empty by O_TRUNC
        // with no writes commits at release.)
        if (!w.written)
            return Reply::ok();
        auto version = service_.commit(w.caller, w.grant, w.buffer);
        w.written = false;
        w.dirty = false;
        if (!version) {
            spdlog::warn("commit to {}/{} by uid {} failed: {}", w.grant.vault_name, w.grant.name, w.caller.who.uid,
                         version.error().message.empty() ? std::string(vault::result_name(version.error().code))
                                                         : version.error().message);
            return Reply::err(version.error());
        }
        invalidate_attributes(ino);
        staging_.expire_copies(w.grant.secret.value, w.caller.who.uid);
        return Reply::ok();
    }
    if (h->kind == Handle::Kind::policy) {
        auto& p = static_cast<PolicyHandle&>(*h);
        std::lock_guard lock(p.mutex);
        if (p.failed != 0)
            return Reply::err(p.failed);
        // As for secrets, only a close after written bytes swaps the policy
        // in; an empty write never replaces it.
        if (!p.writing || !p.written)
            return Reply::ok();
        auto r = service_.write_policy(p.caller, p.vault, p.text);
        p.written = false;
        if (!r) {
            // Whole-text checks (someone must manage) can only fail here.
            spdlog::warn("policy of vault {} refused from uid {}: {}", p.vault.value, p.caller.who.uid,
                         r.error().message);
            return Reply::err(r.error());
        }
        return Reply::ok();
    }
    return Reply::ok();
}

Reply Filesystem::release(fuse_req_t, fuse_ino_t ino, fuse_file_info* fi)
{
    polls_.forget(fi->fh);
    auto h = handles_.remove(fi->fh);
    // What a reader's open, read() or mmap left in the page cache is
    // dropped within 100 ms (also while other readers of it are open: their
    // reads then come here).
    if (h && h->kind == Handle::Kind::value)
        drop_page_cache(ino);
    if (h && h->kind == Handle::Kind::write) {
        auto& w = static_cast<WriteHandle&>(*h);
        std::lock_guard lock(w.mutex);
        // A flush normally committed already; this covers a writer whose
        // flush never came (there is no one left to report an error to).
        if (w.dirty && w.failed == 0) {
            if (auto r = service_.commit(w.caller, w.grant, w.buffer); !r) {
                if (r.error().code == Errc::not_found)
                    spdlog::info("{}/{} was removed before its writer closed: nothing committed", w.grant.vault_name,
                                 w.grant.name);
                else
                    spdlog::error("commit at release of {}/{} failed: {}", w.grant.vault_name, w.grant.name,
                                  r.error().message);
            } else {
                invalidate_attributes(ino);
                staging_.expire_copies(w.grant.secret.value, w.caller.who.uid);
            }
        }
        if (w.creating)
            creating(w.grant.secret.value, w.caller.who.uid, false);
    }
    return Reply::ok();  // the buffer is wiped as the handle goes
}

void Filesystem::creating(std::int64_t secret, uid_t uid, bool add)
{
    std::lock_guard lock(creating_mutex_);
    if (add) {
        creating_.emplace(secret, uid);
        return;
    }
    for (auto [it, end] = creating_.equal_range(secret); it != end; ++it)
        if (it->second == uid) {
            creating_.erase(it);
            return;
        }
}

bool Filesystem::is_creating(std::int64_t secret, uid_t uid)
{
    std::lock_guard lock(creating_mutex_);
    for (auto [it, end] = creating_.equal_range(secret); it != end; ++it)
        if (it->second == uid)
            return true;
    return false;
}

void Filesystem::sweep_staging()
{
    if (const auto n = staging_.sweep(std::chrono::steady_clock::now()); n > 0)
        spdlog::info("{} staging file(s) idle for {} s discarded", n, staging_.idle().count());
}

}  // namespace vaultfs::fs
