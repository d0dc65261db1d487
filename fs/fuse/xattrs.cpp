// Filesystem: the user.vault.* extended attributes (see filesystem.hpp).
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

// ---- extended attributes -----------------------------------------------------------

namespace {

constexpr std::string_view xattr_prefix = "user.vault.";

// The attribute name inside vaultfs, or nullopt for names outside user.vault.*.
std::optional<std::string_view> vault_attribute(const char* xattr)
{
    const std::string_view n(xattr);
    if (n.substr(0, xattr_prefix.size()) != xattr_prefix || n.size() == xattr_prefix.size())
        return std::nullopt;
    return n.substr(xattr_prefix.size());
}

// Answers a getxattr of `value` for a buffer of `size` (0: size query).
Reply xattr_value(std::string value, size_t size)
{
    if (size == 0)
        return Reply{Reply::XattrSize{value.size()}};
    if (value.size() > size)
        return Reply::err(ERANGE);
    auto owned = std::make_shared<std::string>(std::move(value));
    return Reply{Reply::Buffer{owned->data(), owned->size(), owned}};
}

// Answers a listxattr of `names` (prefixed) for a buffer of `size`.
Reply xattr_list(const std::vector<std::string>& names, size_t size)
{
    std::string packed;
    for (const auto& n : names) {
        packed += xattr_prefix;
        packed += n;
        packed.push_back('\0');
    }
    return xattr_value(std::move(packed), size);
}

}  // namespace

// The secret or version a node stands for, for attribute calls.
vault::Result<vault::SecretView> Filesystem::attribute_target(const vault::Caller& caller, Node node)
{
    if (node.kind == NodeKind::secret)
        return service_.secret_by_id(caller, vault::SecretId{node.id});
    if (node.kind == NodeKind::current)
        return current_view(caller, node.id);
    if (node.kind == NodeKind::version)
        return service_.version_by_id(caller, vault::VersionId{node.id});
    return vault::fail(Errc::no_attribute);
}

vault::Result<vault::SecretView> Filesystem::current_view(const vault::Caller& caller, std::int64_t version_id)
{
    auto view = service_.secret_at_version(caller, vault::VersionId{version_id});
    if (!view)
        return view;
    auto now = service_.secret_by_id(caller, view->id);
    if (!now)
        return tl::unexpected(now.error());
    if (now->version.id != view->version.id)
        return vault::fail(Errc::stale);  // the kernel looks the name up again
    return view;
}

namespace {

bool is_value_node(NodeKind k) { return k == NodeKind::secret || k == NodeKind::current || k == NodeKind::version; }

}  // namespace

// The object behind an inode the kernel still holds is gone (deleted, or a
// tool's temporary file renamed over another name): ESTALE, so that the
// kernel looks the name up again and finds what it names now -- or ENOENT.
int Filesystem::gone_is_stale(Node node, const vault::Error& e)
{
    if (e.code == Errc::not_found && (is_value_node(node.kind) || node.kind == NodeKind::staging))
        return ESTALE;
    return to_errno(e.code);
}

namespace {

}  // namespace

// A vault's settings or a soft-deleted secret's dates.
vault::Result<std::vector<std::pair<std::string, std::string>>> Filesystem::fixed_attributes(
    const vault::Caller& caller, Node node)
{
    if (node.kind == NodeKind::vault)
        return service_.vault_attributes(caller, vault::VaultId{node.id});
    return service_.deleted_by_id(caller, vault::SecretId{node.id}).and_then([&](const vault::DeletedView& d) {
        return service_.deleted_attributes(caller, d);
    });
}

Reply Filesystem::getxattr(fuse_req_t req, fuse_ino_t ino, const char* name_c, size_t size)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto name = vault_attribute(name_c);
    // Other user.* names are simply not set; security.*, system.* (ACLs)
    // and trusted.* are not supported here at all. Saying so (ENOTSUP)
    // lets `ls -l`, cp and sed stop asking for the rest of the mount.
    if (!name)
        return Reply::err(std::string_view(name_c).substr(0, 5) == "user." ? ENODATA : EOPNOTSUPP);
    const auto caller = caller_of(req);
    if (node->kind == NodeKind::vault || node->kind == NodeKind::deleted_secret || is_object_kind(node->kind)) {
        auto attrs = is_object_kind(node->kind) ? object_attributes(caller, *node) : fixed_attributes(caller, *node);
        if (!attrs)
            return Reply::err(attrs.error().code == Errc::no_attribute ? ENODATA : to_errno(attrs.error().code));
        for (auto& [key, value] : *attrs)
            if (key == *name)
                return xattr_value(value, size);
        return Reply::err(ENODATA);
    }
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto value = service_.get_attribute(caller, *target, *name);
    if (!value)
        return Reply::err(value.error());
    return xattr_value(std::move(*value), size);
}

Reply Filesystem::listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto caller = caller_of(req);
    if (node->kind == NodeKind::vault || node->kind == NodeKind::deleted_secret ||
        (is_object_kind(node->kind) && node->kind != NodeKind::key_file && node->kind != NodeKind::cert_file &&
         node->kind != NodeKind::keys_dir && node->kind != NodeKind::certs_dir)) {
        auto attrs = is_object_kind(node->kind) ? object_attributes(caller, *node) : fixed_attributes(caller, *node);
        if (!attrs)
            return Reply::err(attrs.error());
        std::vector<std::string> names;
        for (const auto& [key, value] : *attrs)
            names.push_back(key);
        return xattr_list(names, size);
    }
    if (!is_value_node(node->kind))
        return xattr_list({}, size);
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto names = service_.list_attributes(caller, *target);
    if (!names)
        return Reply::err(names.error());
    return xattr_list(*names, size);
}

Reply Filesystem::setxattr(fuse_req_t req, fuse_ino_t ino, const char* name_c, const char* value, size_t size, int)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto name = vault_attribute(name_c);
    if (!name)
        return Reply::err(ENOTSUP);
    const auto caller = caller_of(req);
    const std::string_view text(value, size);
    if (node->kind == NodeKind::vault) {
        auto r = service_.set_vault_attribute(caller, vault::VaultId{node->id}, *name, text);
        return r ? Reply::ok() : Reply::err(r.error());
    }
    if (is_object_kind(node->kind))
        return object_setxattr(caller, *node, *name, text);
    if (!is_value_node(node->kind))
        return Reply::err(EPERM);
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto r = service_.set_attribute(caller, *target, *name, text);
    if (!r)
        return Reply::err(r.error());
    // Enabling or disabling a version can change what S stands for.
    invalidate_attributes(ino);
    return Reply::ok();
}

Reply Filesystem::removexattr(fuse_req_t req, fuse_ino_t ino, const char* name_c)
{
    const auto node = from_ino(ino);
    if (!node)
        return Reply::err(ENOENT);
    const auto name = vault_attribute(name_c);
    if (!name)
        return Reply::err(ENODATA);
    if (is_object_kind(node->kind))
        return object_setxattr(caller_of(req), *node, *name, std::nullopt);
    if (!is_value_node(node->kind))
        return Reply::err(EPERM);
    const auto caller = caller_of(req);
    auto target = attribute_target(caller, *node);
    if (!target)
        return Reply::err(target.error());
    auto r = service_.set_attribute(caller, *target, *name, std::nullopt);
    if (!r)
        return Reply::err(r.error());
    invalidate_attributes(ino);
    return Reply::ok();
}

}  // namespace vaultfs::fs
