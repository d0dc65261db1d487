// handles: the open-file table. A FUSE file handle (fh) is a number that
// indexes this table — never a pointer — so a stale or forged fh finds
// nothing instead of freed memory.
//
// Value handles keep the version they opened (pinned: a later write never
// changes what an open reader sees) as ciphertext and a shared DEK; each
// read decrypts into a transient locked buffer. Write handles assemble a
// new value in locked memory and commit it at flush. Every handle carries
// its charge against its opener's per-uid quota (uid_quota.hpp), given back
// when the handle goes.
//
// Thread-safety: the table is synchronised; a handle's own mutex guards its
// mutable state (several fds can share one handle after dup/fork).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "fs/fuse/inode.hpp"
#include "fs/fuse/staging.hpp"
#include "fs/fuse/uid_quota.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/objects/objects.hpp"
#include "vault/secrets/secret_service.hpp"

namespace vaultfs::fs {

struct Handle {
    enum class Kind { value, write, policy, directory, staging, object };
    Handle(Kind k, UidQuota::Charge c) : kind(k), charge(std::move(c)) {}
    virtual ~Handle() = default;
    const Kind kind;
    UidQuota::Charge charge;
};

// The open readers of each inode whose value may be in the kernel's page
// cache (Filesystem::open_value). While one of them is open, a READ of the
// inode may be in flight holding a page lock, and filling the pages from a
// request handler would wait for it; so only the open that finds no other
// reader fills them, and every other opener of that inode waits in enter()
// until the fill is done (its own reads would lock pages the fill needs).
class PageCacheReaders {
public:
    class Ticket {
    public:
        Ticket() = default;
        Ticket(Ticket&& o) noexcept
            : readers_(std::exchange(o.readers_, nullptr)), ino_(o.ino_), first_(o.first_),
              filling_(std::exchange(o.filling_, false))
        {
        }
        Ticket& operator=(Ticket&&) = delete;
        ~Ticket();
        // No other reader of the inode was open when this one entered: it
        // fills the pages, then says so with filled().
        bool first() const { return first_; }
        void filled();
        // The inode whose page cache this reader may have filled.
        std::optional<std::uint64_t> ino() const { return readers_ ? std::optional(ino_) : std::nullopt; }

    private:
        friend class PageCacheReaders;
        Ticket(PageCacheReaders* r, std::uint64_t ino, bool first)
            : readers_(r), ino_(ino), first_(first), filling_(first)
        {
        }
        PageCacheReaders* readers_ = nullptr;
        std::uint64_t ino_ = 0;
        bool first_ = false;
        bool filling_ = false;
    };
    // One more open reader of `ino`, until the ticket goes; waits while
    // the first reader of `ino` is filling its pages.
    Ticket enter(std::uint64_t ino);

private:
    std::mutex mutex_;
    std::condition_variable filled_;
    std::unordered_map<std::uint64_t, unsigned> open_;
    std::unordered_set<std::uint64_t> filling_;
};

struct ValueHandle final : Handle {
    ValueHandle(vault::OpenValue v, const vault::SecretView& view, UidQuota::Charge c, PageCacheReaders::Ticket t = {})
        : Handle(Kind::value, std::move(c)), value(std::move(v)), secret(view.id), version(view.version.id),
          follows_name(!view.pinned), reader(std::move(t))
    {
    }
    const vault::OpenValue value;
    const vault::SecretId secret;
    const vault::VersionId version;  // the version opened, pinned for this handle
    const bool follows_name;          // opened as S (not S@N): poll reports when S moves on
    const PageCacheReaders::Ticket reader;
};

struct WriteHandle final : Handle {
    WriteHandle(vault::Caller c, vault::WriteGrant g, bool truncated, UidQuota::Charge q)
        : Handle(Kind::write, std::move(q)), caller(std::move(c)), grant(std::move(g)), dirty(truncated)
    {
    }
    std::mutex mutex;
    const vault::Caller caller;
    const vault::WriteGrant grant;
    hsm::SecureBuffer buffer;
    bool dirty;            // a value (maybe empty) not yet committed
    bool written = false;  // bytes written since the last commit
    // The errno of a write that failed (EFBIG past 25 KiB, ENOMEM past the
    // quota or the locked heap, or what check_commit found): nothing from
    // this handle will commit, and every later write and flush reports it.
    int failed = 0;
    bool readable = false;  // opened O_RDWR: reads return what it wrote so far
    bool creating = false;  // registered in Filesystem::creating_ (a new name's first version)
};

struct PolicyHandle final : Handle {
    PolicyHandle(vault::Caller c, vault::VaultId v, bool w, std::string t, UidQuota::Charge q)
        : Handle(Kind::policy, std::move(q)), caller(std::move(c)), vault(v), writing(w), text(std::move(t))
    {
    }
    std::mutex mutex;
    const vault::Caller caller;
    const vault::VaultId vault;
    const bool writing;
    std::string text;      // current policy (reading) or the new one (writing)
    bool written = false;  // bytes written since the last swap (like WriteHandle)
    int failed = 0;        // as for WriteHandle
    // Writing: the complete lines checked so far (bytes of `text`, lines).
    std::size_t checked = 0;
    int checked_lines = 0;
    int rules = 0;
};

// An open staging file (staging.hpp).
struct StagingHandle final : Handle {
    StagingHandle(std::shared_ptr<StagedFile> f, UidQuota::Charge q) : Handle(Kind::staging, std::move(q)), file(std::move(f))
    {
        std::lock_guard lock(file->mutex);
        ++file->open_handles;
    }
    ~StagingHandle() override
    {
        std::lock_guard lock(file->mutex);
        --file->open_handles;
        file->last_closed = std::chrono::steady_clock::now();
    }
    const std::shared_ptr<StagedFile> file;
};

// An open file of a key or certificate (fs/fuse/objects.cpp). A content file
// (public.pem, chain.pem, key.pem, ...) holds what it serves, fetched and
// audited at open. An operation file (sign.ES256, decrypt.RSA-OAEP, ...)
// collects its input from write() and runs the operation -- audited -- at
// the first read() after it; the result is read from the same fd, and a
// write after it starts the next operation.
struct ObjectHandle final : Handle {
    enum class Op { none, sign, decrypt, unwrap };
    ObjectHandle(vault::Caller c, vault::ObjectView v, Op o, int a, std::size_t max, UidQuota::Charge q)
        : Handle(Kind::object, std::move(q)), caller(std::move(c)), view(std::move(v)), op(o), algorithm(a),
          max_input(max)
    {
    }
    std::mutex mutex;
    const vault::Caller caller;
    const vault::ObjectView view;
    const Op op;
    const int algorithm;           // keys::SignAlgorithm or DecryptAlgorithm
    const std::size_t max_input;   // the digest size, or the modulus size
    hsm::SecureBuffer input;
    std::optional<hsm::SecureBuffer> content;  // what reads serve (a content file, or the last result)
    int failed = 0;                // the errno of the last operation, until the next write
    std::size_t charged = 0;       // bytes charged to the opener's quota (the most ever held)
    off_t result_at = 0;           // the file offset of the read that ran the operation: its result's byte 0
    bool oversized = false;        // this operation's input overflowed (audited once)
};

struct DirHandle final : Handle {
    DirHandle(NodeKind k, vault::Caller c, std::optional<vault::ListingGrant> g, UidQuota::Charge q)
        : Handle(Kind::directory, std::move(q)), node_kind(k), caller(std::move(c)), grant(std::move(g))
    {
    }
    const NodeKind node_kind;
    const vault::Caller caller;
    const std::optional<vault::ListingGrant> grant;
    std::vector<std::pair<std::string, Node>> vaults;  // root listing, taken at opendir
    std::vector<std::pair<std::string, Node>> entries;  // a key or certificate directory, taken at opendir
};

class HandleTable {
public:
    std::uint64_t add(std::shared_ptr<Handle> h);
    std::shared_ptr<Handle> find(std::uint64_t fh) const;
    std::shared_ptr<Handle> remove(std::uint64_t fh);
    std::size_t size() const;
    // A restart (fs/daemon/restart/): numbers handed out from here on start at
    // `base`; a handle a previous process handed out keeps its number.
    void number_from(std::uint64_t base);
    bool add_at(std::uint64_t fh, std::shared_ptr<Handle> h);
    std::vector<std::pair<std::uint64_t, std::shared_ptr<Handle>>> all() const;

    template <class T>
    std::shared_ptr<T> find_as(std::uint64_t fh, Handle::Kind kind) const
    {
        auto h = find(fh);
        if (!h || h->kind != kind)
            return nullptr;
        return std::static_pointer_cast<T>(h);
    }

private:
    mutable std::shared_mutex mutex_;
    std::uint64_t next_ = 1;
    std::unordered_map<std::uint64_t, std::shared_ptr<Handle>> handles_;
};

}  // namespace vaultfs::fs
