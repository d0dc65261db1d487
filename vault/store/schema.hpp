// schema: the tables of a vaultfs store, created and upgraded the same way
// on both engines (vault/store/store.hpp).
#pragma once

#include <string>

#include "vault/store/db.hpp"

namespace vaultfs::vault::schema {

constexpr int version = 8;

// SQLite: checks the file (quick_check, when `check_pages`), refuses a
// newer schema or a file that is not vaultfs's, and migrates forward unless
// read_only. Without `may_migrate`, any other schema than this version's is
// refused.
Result<void> prepare_sqlite(db::Connection& c, const std::string& path, bool create, bool read_only,
                            bool check_pages, bool may_migrate = true);
// PRAGMA integrity_check (full) or quick_check; Errc::storage naming the
// first problem.
Result<void> check_sqlite(db::Connection& c, const std::string& path, bool full);

// PostgreSQL: `create` makes the schema in an empty database (and refuses
// one that already holds a store); otherwise the schema must be there, and
// an older one (from 6 on) is brought up to this version when
// `may_migrate` (not by a restart's new process, nor a read-only open).
Result<void> prepare_postgresql(db::Connection& c, const std::string& where, bool create, bool may_migrate = true);

}  // namespace vaultfs::vault::schema
