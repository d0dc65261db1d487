// handles: the open-file table. A FUSE file handle (fh) is a number that
// indexes this table — never a pointer — so a stale or forged fh finds
// nothing instead of freed memory.
//
// Value handles hold the plaintext of the version they opened (pinned: a
// later write never changes what an open reader sees) in locked memory,
// wiped when the handle is released. Write handles assemble a new value in
// locked memory and commit it at flush.
//
// Thread-safety: the table is synchronised; a handle's own mutex guards its
// mutable state (several fds can share one handle after dup/fork).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fs/inode.hpp"
#include "hsm/secure_buffer.hpp"
#include "vault/secret_service.hpp"

namespace vaultfs::fs {

struct Handle {
    enum class Kind { value, write, policy, directory };
    explicit Handle(Kind k) : kind(k) {}
    virtual ~Handle() = default;
    const Kind kind;
};

struct ValueHandle final : Handle {
    explicit ValueHandle(hsm::SecureBuffer v) : Handle(Kind::value), value(std::move(v)) {}
    const hsm::SecureBuffer value;
};

struct WriteHandle final : Handle {
    WriteHandle(vault::Caller c, vault::WriteGrant g, bool truncated)
        : Handle(Kind::write), caller(std::move(c)), grant(std::move(g)), dirty(truncated)
    {
    }
    std::mutex mutex;
    const vault::Caller caller;
    const vault::WriteGrant grant;
    hsm::SecureBuffer buffer;
    bool dirty;              // a value (maybe empty) not yet committed
    bool written = false;    // bytes written since the last commit
    bool too_large = false;  // a write went past 25 KiB: nothing will commit
};

struct PolicyHandle final : Handle {
    PolicyHandle(vault::Caller c, vault::VaultId v, bool w, std::string t)
        : Handle(Kind::policy), caller(std::move(c)), vault(v), writing(w), text(std::move(t))
    {
    }
    std::mutex mutex;
    const vault::Caller caller;
    const vault::VaultId vault;
    const bool writing;
    std::string text;      // current policy (reading) or the new one (writing)
    bool written = false;  // bytes written since the last swap (like WriteHandle)
    bool too_large = false;
};

struct DirHandle final : Handle {
    DirHandle(NodeKind k, std::optional<vault::ListingGrant> g) : Handle(Kind::directory), node_kind(k), grant(std::move(g)) {}
    const NodeKind node_kind;
    const std::optional<vault::ListingGrant> grant;
    std::vector<std::pair<std::string, Node>> vaults;  // root listing, taken at opendir
};

class HandleTable {
public:
    std::uint64_t add(std::shared_ptr<Handle> h);
    std::shared_ptr<Handle> find(std::uint64_t fh) const;
    std::shared_ptr<Handle> remove(std::uint64_t fh);
    std::size_t size() const;

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
