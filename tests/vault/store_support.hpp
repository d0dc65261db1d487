// What the Store unit tests share (tests/vault/store*_test.cpp): a
// connection of the test's own to the file behind the store's back, and
// rows made through the store.
#pragma once

#include "vault/store/store.hpp"

#include <catch2/catch.hpp>

#include <sqlite3.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/postgres.hpp"
#include "tests/support/sqlite_file.hpp"
#include "tests/support/temp_token.hpp"

namespace vaultfs::vault::store_test {

using testing::TempDir;

// A connection of the test's own, to look at the file behind the store's back.
using Db = testing::SqliteFile;

// Where a test's store lives on `engine`: a file in `dir`, or a new
// database on the test process's own PostgreSQL server.
inline std::string location(const std::string& engine, const TempDir& dir)
{
    return engine == "sqlite" ? dir / "vault.db" : testing::shared_pg().new_database();
}

inline std::unique_ptr<Store> create_store(const std::string& path)
{
    auto store = Store::open(path, Store::Mode::create);
    if (!store)
        FAIL("cannot create " << path << ": " << store.error().message);
    return std::move(*store);
}

inline VaultId add_vault(Store& store, const std::string& name)
{
    VaultId id;
    auto w = store.write([&](Store::Transaction& tx) -> Result<void> {
        auto v = tx.insert_vault(VaultRow{VaultId{}, name, "00112233445566778899aabbccddeeff", 90, false, now_micros(), 0},
                                 PolicyRow{"allow uid:0 *\n", now_micros(), 0});
        if (!v)
            return tl::unexpected(v.error());
        id = *v;
        return {};
    });
    REQUIRE(w);
    return id;
}

inline SecretId add_secret(Store& store, VaultId vault, const std::string& name)
{
    SecretId id;
    auto w = store.write([&](Store::Transaction& tx) -> Result<void> {
        auto s = tx.ensure_secret(vault, name, now_micros(), 0);
        if (!s)
            return tl::unexpected(s.error());
        id = s->id;
        return {};
    });
    REQUIRE(w);
    return id;
}

// A version row with placeholder ciphertext (the store never looks inside).
inline SealedVersion version_row(SecretId secret, std::uint64_t number, std::size_t blob_size = 48)
{
    const Micros now = now_micros();
    return SealedVersion{VersionRow{VersionId{}, secret, number, blob_size - 16, now, now, 0, true, std::nullopt,
                                    std::nullopt, std::nullopt},
                         "00112233445566778899aabbccddeeff", std::vector<std::uint8_t>(12, 0x11),
                         std::vector<std::uint8_t>(blob_size, static_cast<std::uint8_t>(number)),
                         std::vector<std::uint8_t>(60, 0x22)};
}

// Inserts the next version of `secret` in one write, numbered as the
// daemon numbers them (in the transaction); returns its number.
inline Result<std::uint64_t> add_version(Store& store, SecretId secret, std::size_t blob_size = 48)
{
    std::uint64_t number = 0;
    auto w = store.write([&](Store::Transaction& tx) -> Result<void> {
        auto allocated = tx.allocate_version(secret);
        if (!allocated)
            return tl::unexpected(allocated.error());
        number = *allocated;
        auto v = tx.insert_version(version_row(secret, number, blob_size));
        if (!v)
            return tl::unexpected(v.error());
        return {};
    });
    if (!w)
        return tl::unexpected(w.error());
    return number;
}

}  // namespace vaultfs::vault::store_test
