#include "fs/cli/support.hpp"

#include <cstdio>
#include <fstream>
#include <sstream>

namespace vaultfs::fs {

int fail(const std::string& message)
{
    std::fprintf(stderr, "vaultfs: %s\n", message.c_str());
    return 1;
}

std::optional<std::string> slurp(const std::string& path)
{
    std::ifstream in(path == "-" ? "/dev/stdin" : path, std::ios::binary);
    if (!in)
        return std::nullopt;
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

}  // namespace vaultfs::fs
