// inode: how a FUSE inode number names a node. Numbers are computed from
// database ids, not stored: the same node always has the same number (also
// across restarts), nothing grows with the number of secrets, and a forget
// needs no bookkeeping. Ids come from AUTOINCREMENT columns and are never
// reused; the generation (the object's creation time) tells a re-created
// name from the old one even so.
//
//   1                          the mount root (FUSE_ROOT_ID)
//   kind << 56 | database id   everything else
#pragma once

#include <cstdint>
#include <optional>

namespace vaultfs::fs {

enum class NodeKind : std::uint8_t {
    root = 0,
    vault = 1,           // /V                 id: vault id
    policy_file = 2,     // /V/.policy         id: vault id
    versions_dir = 3,    // /V/.versions       id: vault id
    deleted_dir = 4,     // /V/.deleted        id: vault id
    secret = 5,          // /V/S               id: secret id
    version = 6,         // /V/S@N             id: version row id
    deleted_secret = 7,  // /V/.deleted/S      id: secret id
    current = 8,         // /V/S as it stands  id: version row id of the version S stands for
    staging = 9,         // /V/.cfg.swp, ...   id: the staging file's (staging.hpp), never reused while running
    // Keys and certificates (fs/fuse/objects.cpp). NAME and NAME@N are
    // directories named by the object version they stand for; their files
    // by that version and the file's index (object_file_id).
    keys_dir = 10,       // /V/.keys           id: vault id
    key = 11,            // /V/.keys/NAME      id: object version row id of the version NAME stands for
    key_version = 12,    // /V/.keys/NAME@N    id: object version row id
    key_file = 13,       // .../public.pem     id: object_file_id(version, file)
    certs_dir = 14,      // /V/.certs          id: vault id
    cert = 15,           // /V/.certs/NAME     id: as for key
    cert_version = 16,   // /V/.certs/NAME@N
    cert_file = 17,      // .../chain.pem      id: object_file_id(version, file)
};

// A file of a key's or certificate's version: 32 files per version.
inline constexpr std::int64_t object_file_id(std::int64_t version, int file) { return version * 32 + file; }
inline constexpr std::int64_t object_file_version(std::int64_t id) { return id / 32; }
inline constexpr int object_file_index(std::int64_t id) { return static_cast<int>(id % 32); }
// S has an inode per version it stands for: a new version, or a disable
// that makes S stand for another one, gives S a new inode (and the kernel a
// new page cache), so pages a reader's mmap of one version keeps alive can
// never be served to an opener of another. `secret` names S while its first
// version is being written, and writers' handles.

struct Node {
    NodeKind kind = NodeKind::root;
    std::int64_t id = 0;
};

inline constexpr std::uint64_t root_ino = 1;

std::uint64_t to_ino(Node node);
// nullopt for numbers this daemon never hands out.
std::optional<Node> from_ino(std::uint64_t ino);

}  // namespace vaultfs::fs
