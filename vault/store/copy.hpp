// copy: a whole store from one engine into another (`vaultfs migrate --to`),
// row for row and id for id. Ciphertext, sealed DEKs and signatures are
// copied as bytes: nothing is decrypted or re-sealed.
#pragma once

#include "vault/store/store.hpp"

namespace vaultfs::vault {

// Copies every vault, policy, secret, version, tag, key, certificate, the
// settings and the audit anchor of `from` into `to`, an empty store just
// created, in one transaction of `to`. Hosts, grants and the change feed are
// `to`'s own. Returns the number of rows copied.
Result<std::size_t> copy_store(Store& from, Store& to);

}  // namespace vaultfs::vault
