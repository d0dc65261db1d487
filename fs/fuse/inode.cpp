#include "fs/fuse/inode.hpp"

namespace vaultfs::fs {

namespace {
constexpr int kind_shift = 56;
constexpr std::uint64_t id_mask = (std::uint64_t{1} << kind_shift) - 1;
}  // namespace

std::uint64_t to_ino(Node node)
{
    if (node.kind == NodeKind::root)
        return root_ino;
    return (static_cast<std::uint64_t>(node.kind) << kind_shift) | (static_cast<std::uint64_t>(node.id) & id_mask);
}

std::optional<Node> from_ino(std::uint64_t ino)
{
    if (ino == root_ino)
        return Node{NodeKind::root, 0};
    const auto kind = ino >> kind_shift;
    const auto id = static_cast<std::int64_t>(ino & id_mask);
    if (kind < 1 || kind > 17 || id <= 0)
        return std::nullopt;
    return Node{static_cast<NodeKind>(kind), id};
}

}  // namespace vaultfs::fs
