// errno_map: the one place where domain outcomes become errno values.
#pragma once

#include "vault/model/error.hpp"

namespace vaultfs::fs {

int to_errno(vault::Errc code);

}  // namespace vaultfs::fs
