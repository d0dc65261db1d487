// Keys and certificates in the filesystem (docs/keys-and-certificates.md "Certificates and keys"):
//
//   V/.keys/NAME/public.pem public.jwk      the public half (`get`)
//   V/.keys/NAME/sign.ES256 ...            write a digest, read the signature (`sign`)
//   V/.keys/NAME/decrypt.RSA-OAEP-256 ...  write ciphertext, read the plaintext (`decrypt`)
//   V/.keys/NAME/unwrap.RSA-OAEP ...       the same for a wrapped key (`unwrap`)
//   V/.certs/NAME/cert.pem chain.pem ...   vault/certificates/certificates.hpp
//   NAME@N/                                the same for version N
//
// NAME is a directory per version it stands for (inode.hpp): a path walk
// through NAME/ finds the version NAME stands for then, and every file
// opened from one open NAME/ (openat on its fd) is of the same version, so a
// renewal never pairs a new cert.pem with an old key.pem for such a reader.
// Nothing here is cached by the kernel (timeouts 0), and every file is
// opened with direct_io: nothing enters the page cache.
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <cstring>

#include "fs/fuse/errno_map.hpp"
#include "fs/fuse/reply.hpp"
#include "vault/model/names.hpp"

namespace vaultfs::fs {

using policy::Permission;
using vault::Errc;
namespace keys = vault::keys;
namespace certs = vault::certificates;

namespace {

// Key files by index (object_file_id): public.pem, public.jwk, then one per
// signing algorithm, then decrypt and unwrap per decryption algorithm.
constexpr int public_pem_file = 0;
constexpr int public_jwk_file = 1;
constexpr int first_sign_file = 2;      // + SignAlgorithm (9)
constexpr int first_decrypt_file = 11;  // + DecryptAlgorithm (3)
constexpr int first_unwrap_file = 14;   // + DecryptAlgorithm (3)

constexpr keys::SignAlgorithm all_sign[] = {keys::SignAlgorithm::RS256, keys::SignAlgorithm::RS384,
                                            keys::SignAlgorithm::RS512, keys::SignAlgorithm::PS256,
                                            keys::SignAlgorithm::PS384, keys::SignAlgorithm::PS512,
                                            keys::SignAlgorithm::ES256, keys::SignAlgorithm::ES384,
                                            keys::SignAlgorithm::ES512};
constexpr keys::DecryptAlgorithm all_decrypt[] = {keys::DecryptAlgorithm::RSA_OAEP,
                                                  keys::DecryptAlgorithm::RSA_OAEP_256,
                                                  keys::DecryptAlgorithm::RSA1_5};

std::string key_file_name(int index)
{
    if (index == public_pem_file)
        return "public.pem";
    if (index == public_jwk_file)
        return "public.jwk";
    if (index >= first_sign_file && index < first_decrypt_file)
        return "sign." + std::string(keys::to_string(all_sign[index - first_sign_file]));
    if (index >= first_decrypt_file && index < first_unwrap_file)
        return "decrypt." + std::string(keys::to_string(all_decrypt[index - first_decrypt_file]));
    if (index >= first_unwrap_file && index < first_unwrap_file + 3)
        return "unwrap." + std::string(keys::to_string(all_decrypt[index - first_unwrap_file]));
    return {};
}

// The files a key version has, by index: what its type and operations offer.
std::vector<int> key_files(const keys::KeySpec& spec)
{
    std::vector<int> out{public_pem_file, public_jwk_file};
    for (const auto a : keys::sign_algorithms(spec.type, spec.ops))
        out.push_back(first_sign_file + static_cast<int>(a));
    for (const auto a : keys::decrypt_algorithms(spec.type, spec.ops)) {
        if (spec.ops.decrypt)
            out.push_back(first_decrypt_file + static_cast<int>(a));
        if (spec.ops.unwrap)
            out.push_back(first_unwrap_file + static_cast<int>(a));
    }
    return out;
}

std::optional<int> key_file_index(const keys::KeySpec& spec, std::string_view name)
{
    for (const int i : key_files(spec))
        if (key_file_name(i) == name)
            return i;
    return std::nullopt;
}

bool is_key_kind(NodeKind k) { return k == NodeKind::key || k == NodeKind::key_version; }
bool is_cert_kind(NodeKind k) { return k == NodeKind::cert || k == NodeKind::cert_version; }

std::size_t modulus_bytes(hsm::KeyType t)
{
    return t == hsm::KeyType::rsa_2048 ? 256 : t == hsm::KeyType::rsa_3072 ? 384 : 512;
}

}  // namespace

bool Filesystem::is_object_kind(NodeKind kind) { return static_cast<int>(kind) >= static_cast<int>(NodeKind::keys_dir); }

vault::Result<vault::ObjectView> Filesystem::object_view(const vault::Caller& caller, Node node)
{
    const bool key = is_key_kind(node.kind) || node.kind == NodeKind::key_file;
    std::int64_t version = node.id;
    bool pinned = node.kind == NodeKind::key_version || node.kind == NodeKind::cert_version;
    if (node.kind == NodeKind::key_file || node.kind == NodeKind::cert_file)
        version = object_file_version(node.id);
    if (key) {
        if (objects_.keys == nullptr)
            return vault::fail(Errc::not_found);
        return objects_.keys->objects().by_version_id(caller, vault::ObjectVersionId{version}, pinned);
    }
    if (objects_.certificates == nullptr)
        return vault::fail(Errc::not_found);
    return objects_.certificates->objects().by_version_id(caller, vault::ObjectVersionId{version}, pinned);
}

Reply Filesystem::object_lookup(const vault::Caller& caller, Node parent, std::string_view name)
{
    switch (parent.kind) {
    case NodeKind::keys_dir:
    case NodeKind::certs_dir: {
        const bool key = parent.kind == NodeKind::keys_dir;
        vault::Objects* objects = key ? (objects_.keys ? &objects_.keys->objects() : nullptr)
                                      : (objects_.certificates ? &objects_.certificates->objects() : nullptr);
        if (objects == nullptr)
            return Reply::err(ENOENT);
        auto view = objects->find(caller, vault::VaultId{parent.id}, name);
        if (!view)
            return Reply::err(view.error());
        const NodeKind kind = key ? (view->pinned ? NodeKind::key_version : NodeKind::key)
                                  : (view->pinned ? NodeKind::cert_version : NodeKind::cert);
        return entry_for(caller, Node{kind, view->version.id.value});
    }
    case NodeKind::key:
    case NodeKind::key_version: {
        auto view = object_view(caller, parent);
        if (!view)
            return Reply::err(view.error());
        const auto index = key_file_index(objects_.keys->spec_of(*view), name);
        if (!index)
            return Reply::err(ENOENT);
        return entry_for(caller, Node{NodeKind::key_file, object_file_id(parent.id, *index)});
    }
    case NodeKind::cert:
    case NodeKind::cert_version: {
        auto view = object_view(caller, parent);
        if (!view)
            return Reply::err(view.error());
        const auto file = certs::cert_file(name);
        const auto files = certs::files_of(*view);
        if (!file || std::find(files.begin(), files.end(), *file) == files.end())
            return Reply::err(ENOENT);
        return entry_for(caller, Node{NodeKind::cert_file, object_file_id(parent.id, static_cast<int>(*file))});
    }
    default:
        return Reply::err(ENOTDIR);
    }
}

vault::Result<Filesystem::NodeAttr> Filesystem::object_stat(const vault::Caller& caller, Node node)
{
    NodeAttr attr;
    struct stat& st = attr.st;
    st.st_ino = to_ino(node);
    st.st_blksize = 4096;
    st.st_nlink = 1;
    if (node.kind == NodeKind::keys_dir || node.kind == NodeKind::certs_dir) {
        auto v = service_.vault(caller, vault::VaultId{node.id});
        if (!v)
            return tl::unexpected(v.error());
        if (v->permissions.empty())
            return vault::fail(Errc::not_found);
        st.st_mode = S_IFDIR | 0755;
        st.st_nlink = 2;
        st.st_mtim = st.st_ctim = st.st_atim = to_timespec(v->created);
        attr.generation = static_cast<std::uint64_t>(v->created);
        return attr;
    }
    auto view = object_view(caller, node);
    if (!view)
        return tl::unexpected(view.error());
    st.st_mtim = st.st_ctim = st.st_atim = to_timespec(view->version.created);
    attr.generation = static_cast<std::uint64_t>(view->object.created);
    if (is_key_kind(node.kind) || is_cert_kind(node.kind)) {
        st.st_mode = S_IFDIR | 0555;
        st.st_nlink = 2;
        return attr;
    }
    const int index = object_file_index(node.id);
    if (node.kind == NodeKind::key_file) {
        // Public files are public: their size is shown (programs that read
        // st_size bytes get all of them). Operation files are read-write.
        if (index == public_pem_file) {
            st.st_mode = S_IFREG | 0444;
            const auto pem = keys::public_pem(view->version.public_der);
            st.st_size = pem ? static_cast<off_t>(pem->size()) : 0;
        } else if (index == public_jwk_file) {
            st.st_mode = S_IFREG | 0444;  // size 0: read it to the end
        } else {
            st.st_mode = S_IFREG | 0666;
        }
        return attr;
    }
    // Certificate files: sizes are not shown (a private part cannot be
    // measured without decrypting it); read them to the end.
    const auto file = static_cast<certs::CertFile>(index);
    const bool private_part =
        file == certs::CertFile::key || file == certs::CertFile::bundle || file == certs::CertFile::bundle_p12;
    st.st_mode = S_IFREG | (private_part ? 0400 : 0444);
    return attr;
}

Reply Filesystem::object_open(const vault::Caller& caller, Node node, fuse_file_info* fi)
{
    if (node.kind != NodeKind::key_file && node.kind != NodeKind::cert_file)
        return Reply::err(EISDIR);
    auto view = object_view(caller, node);
    if (!view)
        return Reply::err(view.error());
    const int mode = fi->flags & O_ACCMODE;
    const int index = object_file_index(node.id);
    auto charge = this->charge(caller);
    if (!charge)
        return Reply::err(service_.refuse_over_limit(caller, "get", view->vault_name, view->object.name,
                                                     vault::Errc::too_many_open));
    std::shared_ptr<ObjectHandle> handle;
    if (node.kind == NodeKind::key_file && index >= first_sign_file) {
        // An operation: read-write, one input at a time.
        if (mode != O_RDWR || (fi->flags & O_APPEND))
            return Reply::err(EINVAL);
        const auto spec = objects_.keys->spec_of(*view);
        ObjectHandle::Op op = ObjectHandle::Op::sign;
        int algorithm = 0;
        std::size_t max_input = 0;
        Permission wanted = Permission::sign;
        if (index < first_decrypt_file) {
            algorithm = index - first_sign_file;
            max_input = keys::digest_size(all_sign[algorithm]);
        } else {
            const bool unwrap = index >= first_unwrap_file;
            op = unwrap ? ObjectHandle::Op::unwrap : ObjectHandle::Op::decrypt;
            algorithm = index - (unwrap ? first_unwrap_file : first_decrypt_file);
            max_input = modulus_bytes(spec.type);
            wanted = unwrap ? Permission::unwrap : Permission::decrypt;
        }
        // The open is checked (a refusal audited); each operation is audited
        // when it runs.
        const std::string op_name = op == ObjectHandle::Op::sign      ? "key_sign"
                                    : op == ObjectHandle::Op::decrypt ? "key_decrypt"
                                                                      : "key_unwrap";
        if (auto r = objects_.keys->objects().authorize(caller, *view, wanted, op_name); !r)
            return Reply::err(r.error());
        handle = std::make_shared<ObjectHandle>(caller, *view, op, algorithm, max_input, std::move(*charge));
    } else {
        if (mode != O_RDONLY)
            return Reply::err(EACCES);
        vault::Result<hsm::SecureBuffer> content = vault::fail(Errc::not_found);
        if (node.kind == NodeKind::key_file) {
            auto der = objects_.keys->public_key(caller, *view);
            if (!der)
                return Reply::err(der.error());
            const auto spec = objects_.keys->spec_of(*view);
            const std::string kid = view->vault_name + "/.keys/" + view->object.name + "@" +
                                    std::to_string(view->version.number);
            const auto text = index == public_pem_file ? keys::public_pem(*der)
                                                       : keys::public_jwk(*der, kid, spec.ops.names());
            if (!text)
                return Reply::err(EIO);
            auto copy = hsm::SecureBuffer::copy_of(
                std::span(reinterpret_cast<const std::uint8_t*>(text->data()), text->size()));
            if (!copy)
                return Reply::err(ENOMEM);
            content = std::move(*copy);
        } else {
            content = objects_.certificates->read_file(caller, *view, static_cast<certs::CertFile>(index));
        }
        if (!content)
            return Reply::err(content.error());
        // What the handle holds counts against its opener's buffered bytes,
        // as a writer's buffer does: open handles cannot fill the locked heap.
        if (!charge->grow(content->size()))
            return Reply::err(service_.refuse_over_limit(caller, "get", view->vault_name, view->object.name,
                                                         vault::Errc::out_of_memory));
        handle = std::make_shared<ObjectHandle>(caller, *view, ObjectHandle::Op::none, 0, 0, std::move(*charge));
        handle->charged = content->size();
        handle->content = std::move(*content);
    }
    fi->fh = handles_.add(handle);
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fi->noflush = 1;
    return Reply{Reply::Open{*fi}};
}

Reply Filesystem::object_write(const std::shared_ptr<Handle>& h, const char* buf, size_t size)
{
    auto& o = static_cast<ObjectHandle&>(*h);
    std::lock_guard lock(o.mutex);
    const auto wipe = [&] { OPENSSL_cleanse(const_cast<char*>(buf), size); };
    if (o.op == ObjectHandle::Op::none) {
        wipe();
        return Reply::err(EBADF);
    }
    if (o.content || o.failed != 0) {
        // A write after a result starts the next operation.
        o.content.reset();
        o.failed = 0;
        o.result_at = 0;
        o.oversized = false;
        static_cast<void>(o.input.resize(0));
    }
    // Input beyond what the operation takes fails here, where it is known,
    // and is audited once per operation.
    const std::size_t end = o.input.size() + size;
    if (end > o.max_input) {
        wipe();
        if (!o.oversized) {
            o.oversized = true;
            const bool sign = o.op == ObjectHandle::Op::sign;
            const std::string_view alg =
                sign ? keys::to_string(all_sign[o.algorithm]) : keys::to_string(all_decrypt[o.algorithm]);
            const std::string_view op = sign ? "key_sign" : o.op == ObjectHandle::Op::unwrap ? "key_unwrap" : "key_decrypt";
            auto r = objects_.keys->refuse_input(o.caller, o.view, op, alg, end, o.max_input);
            o.failed = r ? EINVAL : to_errno(r.error().code);  // a read then fails too, running nothing
            static_cast<void>(o.input.resize(0));
            return Reply::err(o.failed);
        }
        return Reply::err(EINVAL);
    }
    if (end > o.charged) {
        if (!o.charge.grow(end - o.charged)) {
            wipe();
            return Reply::err(ENOMEM);
        }
        o.charged = end;
    }
    if (!o.input.resize(end)) {
        wipe();
        return Reply::err(ENOMEM);
    }
    std::memcpy(o.input.data() + end - size, buf, size);
    wipe();
    return Reply{Reply::Written{size}};
}

Reply Filesystem::object_read(const std::shared_ptr<Handle>& h, size_t size, off_t off)
{
    auto& o = static_cast<ObjectHandle&>(*h);
    std::lock_guard lock(o.mutex);
    if (o.op != ObjectHandle::Op::none && !o.content) {
        if (o.failed != 0)
            return Reply::err(o.failed);
        if (o.input.size() == 0)
            return Reply{Reply::Buffer{nullptr, 0, nullptr}};  // nothing written yet: nothing to read
        vault::Result<hsm::SecureBuffer> result = vault::fail(Errc::invalid_argument);
        if (o.op == ObjectHandle::Op::sign) {
            auto sig = objects_.keys->sign(o.caller, o.view, all_sign[o.algorithm], o.input.bytes());
            if (sig) {
                auto copy = hsm::SecureBuffer::copy_of(*sig);
                result = copy ? vault::Result<hsm::SecureBuffer>(std::move(*copy)) : vault::fail(Errc::out_of_memory);
            } else {
                result = tl::unexpected(sig.error());
            }
        } else {
            result = objects_.keys->decrypt(o.caller, o.view, all_decrypt[o.algorithm], o.input.bytes(),
                                            o.op == ObjectHandle::Op::unwrap);
        }
        static_cast<void>(o.input.resize(0));
        if (!result) {
            o.failed = to_errno(result.error().code);
            return Reply::err(o.failed);
        }
        o.content = std::move(*result);
        o.result_at = off;  // the result starts where the input ended
    }
    if (!o.content)
        return Reply{Reply::Buffer{nullptr, 0, nullptr}};
    // Offsets of an operation's result count from the read that ran it (a
    // read before that, after an lseek back, starts it again).
    const auto bytes = o.content->bytes();
    const std::size_t at = off >= o.result_at ? static_cast<std::size_t>(off - o.result_at) : 0;
    const std::size_t start = std::min(at, bytes.size());
    const std::size_t n = std::min(size, bytes.size() - start);
    if (n == 0)
        return Reply{Reply::Buffer{nullptr, 0, nullptr}};
    auto copy = hsm::SecureBuffer::copy_of(bytes.subspan(start, n));
    if (!copy)
        return Reply::err(ENOMEM);
    auto owned = std::make_shared<const hsm::SecureBuffer>(std::move(*copy));
    return Reply{Reply::Buffer{owned->data(), owned->size(), owned}};
}

Reply Filesystem::object_access(const vault::Caller& caller, Node node, int mask)
{
    if (node.kind == NodeKind::keys_dir || node.kind == NodeKind::certs_dir) {
        auto attr = object_stat(caller, node);
        if (!attr)
            return Reply::err(attr.error());
        return Reply::err((mask & W_OK) ? EACCES : 0);
    }
    auto view = object_view(caller, node);
    if (!view)
        return Reply::err(view.error());
    if (node.kind != NodeKind::key_file && node.kind != NodeKind::cert_file)
        return Reply::err((mask & W_OK) ? EACCES : 0);  // NAME/, NAME@N/: look and list
    const auto& p = view->permissions;
    const int index = object_file_index(node.id);
    bool r = false;
    bool w = false;
    if (node.kind == NodeKind::key_file) {
        if (index < first_sign_file) {
            r = p.contains(Permission::get);
        } else {
            const Permission op = index < first_decrypt_file  ? Permission::sign
                                  : index < first_unwrap_file ? Permission::decrypt
                                                              : Permission::unwrap;
            r = w = p.contains(op);
        }
    } else {
        const auto file = static_cast<certs::CertFile>(index);
        const bool private_part =
            file == certs::CertFile::key || file == certs::CertFile::bundle || file == certs::CertFile::bundle_p12;
        r = p.contains(Permission::get) || (!private_part && p.contains(Permission::certificates));
    }
    const bool ok = (!(mask & R_OK) || r) && (!(mask & W_OK) || w) && !(mask & X_OK);
    return Reply::err(ok ? 0 : EACCES);
}

vault::Result<std::vector<std::pair<std::string, Node>>> Filesystem::object_entries(const vault::Caller& caller,
                                                                                     Node node)
{
    std::vector<std::pair<std::string, Node>> out;
    if (node.kind == NodeKind::keys_dir || node.kind == NodeKind::certs_dir) {
        const bool key = node.kind == NodeKind::keys_dir;
        vault::Objects* objects = key ? (objects_.keys ? &objects_.keys->objects() : nullptr)
                                      : (objects_.certificates ? &objects_.certificates->objects() : nullptr);
        if (objects == nullptr)
            return out;
        auto rows = objects->list(caller, vault::VaultId{node.id});
        if (!rows)
            return tl::unexpected(rows.error());
        for (const auto& row : *rows) {
            auto view = objects->find(caller, vault::VaultId{node.id}, row.name);
            if (!view)
                continue;  // no version yet
            out.emplace_back(row.name, Node{key ? NodeKind::key : NodeKind::cert, view->version.id.value});
        }
        return out;
    }
    auto view = object_view(caller, node);
    if (!view)
        return tl::unexpected(view.error());
    if (is_key_kind(node.kind)) {
        for (const int i : key_files(objects_.keys->spec_of(*view)))
            out.emplace_back(key_file_name(i), Node{NodeKind::key_file, object_file_id(node.id, i)});
    } else {
        for (const auto f : certs::files_of(*view))
            out.emplace_back(std::string(certs::to_string(f)),
                             Node{NodeKind::cert_file, object_file_id(node.id, static_cast<int>(f))});
    }
    return out;
}

vault::Result<std::vector<std::pair<std::string, std::string>>> Filesystem::object_attributes(
    const vault::Caller& caller, Node node)
{
    if (!is_key_kind(node.kind) && !is_cert_kind(node.kind))
        return vault::fail(Errc::no_attribute);
    auto view = object_view(caller, node);
    if (!view)
        return tl::unexpected(view.error());
    if (is_key_kind(node.kind))
        return objects_.keys->attributes(caller, *view);
    return objects_.certificates->attributes(caller, *view);
}

Reply Filesystem::object_setxattr(const vault::Caller& caller, Node node, std::string_view name,
                                  std::optional<std::string_view> value)
{
    if (!is_key_kind(node.kind) && !is_cert_kind(node.kind))
        return Reply::err(ENOTSUP);
    auto view = object_view(caller, node);
    if (!view)
        return Reply::err(view.error());
    vault::Objects& objects =
        is_key_kind(node.kind) ? objects_.keys->objects() : objects_.certificates->objects();
    auto r = objects.set_attribute(caller, *view, name, value);
    return r ? Reply::ok() : Reply::err(r.error());
}

}  // namespace vaultfs::fs
