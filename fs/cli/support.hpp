// cli/support: what every `vaultfs` subcommand does the same way: report a
// failure, read an input file.
#pragma once

#include <optional>
#include <string>

namespace vaultfs::fs {

// Prints "vaultfs: MESSAGE" to stderr; returns the exit status 1.
int fail(const std::string& message);

// The bytes of `path` ("-": standard input); nullopt with errno set when it
// cannot be read.
std::optional<std::string> slurp(const std::string& path);

}  // namespace vaultfs::fs
