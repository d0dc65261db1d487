// Unit tests for vault::Store on real SQLite files: how it creates and opens
// databases (and refuses wrong ones), quick_check at open, group-committed
// writes from many threads, and that one failing unit of a batch does not
// undo the others.
#include "tests/vault/store_support.hpp"

namespace vaultfs::vault {
namespace {

using namespace store_test;  // with TempDir

TEST_CASE("create makes a new WAL database at schema 5, readable only by its owner", "[store]")
{
    TempDir dir;
    const std::string path = dir / "vault.db";
    {
        auto store = create_store(path);
        CHECK(store->path() == path);
        struct stat st{};
        REQUIRE(::stat(path.c_str(), &st) == 0);
        CHECK((st.st_mode & 0777) == 0600);
        Db db(path, SQLITE_OPEN_READONLY);
        CHECK(db.integer("PRAGMA user_version") == 8);
        CHECK(db.text("PRAGMA journal_mode") == "wal");
        CHECK(db.integer("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                         "('vaults', 'policies', 'secrets', 'versions', 'tags', 'settings', 'audit_anchor', 'hosts', "
                         "'kek_grants', 'kek_checks', 'feed', 'changes')") == 12);
        auto vaults = store->vaults();
        REQUIRE(vaults);
        CHECK(vaults->empty());
    }
    // It opens again, as it is.
    auto again = Store::open(path, Store::Mode::open_existing);
    REQUIRE(again);
    auto ro = Store::open(path, Store::Mode::read_only);
    REQUIRE(ro);
}

TEST_CASE("create refuses a file that exists", "[store]")
{
    TempDir dir;
    const std::string path = dir / "vault.db";
    { create_store(path); }
    const auto size_before = std::filesystem::file_size(path);
    auto again = Store::open(path, Store::Mode::create);
    REQUIRE_FALSE(again);
    CHECK(again.error().code == Errc::already_exists);
    CHECK_THAT(again.error().message, Catch::Contains(path));
    CHECK(std::filesystem::file_size(path) == size_before);

    // Even an empty file.
    std::ofstream(dir / "empty.db").flush();
    auto empty = Store::open(dir / "empty.db", Store::Mode::create);
    REQUIRE_FALSE(empty);
    CHECK(empty.error().code == Errc::already_exists);
}

TEST_CASE("open_existing refuses a missing file and creates nothing", "[store]")
{
    TempDir dir;
    const std::string path = dir / "missing.db";
    for (const auto mode : {Store::Mode::open_existing, Store::Mode::read_only}) {
        auto store = Store::open(path, mode);
        REQUIRE_FALSE(store);
        CHECK(store.error().code == Errc::not_found);
        CHECK_THAT(store.error().message, Catch::Contains(path));
        CHECK_FALSE(std::filesystem::exists(path));
    }
}

TEST_CASE("open_existing refuses a file that is not a vaultfs database", "[store]")
{
    TempDir dir;
    SECTION("text")
    {
        const std::string path = dir / "notes.txt";
        {
            std::ofstream out(path);
            for (int i = 0; i < 200; ++i)
                out << "this is not a database, line " << i << "\n";
        }
        auto store = Store::open(path, Store::Mode::open_existing);
        REQUIRE_FALSE(store);
        CHECK(store.error().code == Errc::storage);
        CHECK_THAT(store.error().message, Catch::Contains(path));
    }
    SECTION("a SQLite database without the vaultfs schema")
    {
        const std::string path = dir / "other.db";
        {
            Db db(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
            db.exec("CREATE TABLE t (x INTEGER)");
        }
        auto store = Store::open(path, Store::Mode::open_existing);
        REQUIRE_FALSE(store);
        CHECK(store.error().code == Errc::storage);
        CHECK_THAT(store.error().message, Catch::Contains(path));
        CHECK_THAT(store.error().message, Catch::Contains("not a vaultfs database"));
    }
    SECTION("a database from a newer vaultfs")
    {
        const std::string path = dir / "newer.db";
        { create_store(path); }
        {
            Db db(path);
            db.exec("PRAGMA user_version = 99");
        }
        auto store = Store::open(path, Store::Mode::open_existing);
        REQUIRE_FALSE(store);
        CHECK_THAT(store.error().message, Catch::Contains(path));
        CHECK_THAT(store.error().message, Catch::Contains("upgrade"));
    }
}

TEST_CASE("a database damaged in its middle pages fails quick_check at open", "[store]")
{
    TempDir dir;
    const std::string path = dir / "vault.db";
    {
        auto store = create_store(path);
        const VaultId vault = add_vault(*store, "payments");
        for (int s = 0; s < 20; ++s) {
            const SecretId secret = add_secret(*store, vault, "secret-" + std::to_string(s));
            for (int v = 0; v < 5; ++v)
                REQUIRE(add_version(*store, secret, 1500));
        }
    }  // the last connection checkpoints the WAL into the file
    REQUIRE_FALSE(std::filesystem::exists(path + "-wal"));
    const auto size = std::filesystem::file_size(path);
    const std::size_t page = 4096;
    REQUIRE(size >= 20 * page);
    {
        // A healthy copy opens.
        auto fine = Store::open(path, Store::Mode::open_existing);
        REQUIRE(fine);
    }
    REQUIRE_FALSE(std::filesystem::exists(path + "-wal"));

    // Garbage over a run of pages in the middle (never page 1, the header).
    {
        std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
        REQUIRE(f);
        const std::size_t pages = size / page;
        std::uint32_t x = 0x9e3779b9;
        for (std::size_t p = pages / 3; p < 2 * pages / 3; ++p) {
            std::string junk(page, '\0');
            for (auto& c : junk) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                c = static_cast<char>(x);
            }
            f.seekp(static_cast<std::streamoff>(p * page));
            f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
        }
        REQUIRE(f.good());
    }
    for (const auto mode : {Store::Mode::open_existing, Store::Mode::read_only}) {
        auto store = Store::open(path, mode);
        REQUIRE_FALSE(store);
        INFO(store.error().message);
        CHECK(store.error().code == Errc::storage);
        CHECK_THAT(store.error().message, Catch::Contains(path));
        CHECK_THAT(store.error().message, Catch::Contains("backup"));
    }
}

TEST_CASE("group commit from 8 threads hands out distinct version numbers", "[store][concurrency]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    auto store = create_store(location(engine, dir));
    const VaultId vault = add_vault(*store, "payments");
    const SecretId secret = add_secret(*store, vault, "counter");

    constexpr int threads = 8;
    constexpr int per_thread = 25;
    std::mutex mutex;
    std::vector<std::uint64_t> numbers;
    std::vector<std::string> errors;
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&] {
            for (int i = 0; i < per_thread; ++i) {
                auto n = add_version(*store, secret);
                std::lock_guard lock(mutex);
                if (n)
                    numbers.push_back(*n);
                else
                    errors.push_back(n.error().message);
            }
        });
    }
    for (auto& w : workers)
        w.join();

    INFO((errors.empty() ? std::string() : errors.front()));
    CHECK(errors.empty());
    const std::set<std::uint64_t> distinct(numbers.begin(), numbers.end());
    CHECK(numbers.size() == threads * per_thread);
    CHECK(distinct.size() == numbers.size());
    CHECK(*distinct.begin() == 1);
    CHECK(*distinct.rbegin() == threads * per_thread);

    // What the database holds agrees.
    auto versions = store->versions_of(secret);
    REQUIRE(versions);
    CHECK(versions->size() == threads * per_thread);
    auto row = store->secret_by_id(secret);
    REQUIRE(row);
    REQUIRE(*row);
    CHECK((*row)->next_version == threads * per_thread + 1);
}

TEST_CASE("a failing unit in a batch does not undo the others", "[store][concurrency]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    auto store = create_store(location(engine, dir));
    const VaultId vault = add_vault(*store, "payments");
    const SecretId secret = add_secret(*store, vault, "batch");

    // One writer holds the lead while the others queue behind it, so that
    // they run together as one batch (each in its own savepoint).
    constexpr int writers = 6;
    std::vector<Result<void>> results(writers);
    std::vector<std::thread> threads;
    std::atomic<bool> leading{false};
    auto leader = std::thread([&] {
        auto r = store->write([&](Store::Transaction&) -> Result<void> {
            leading = true;
            // Hold the lead until every writer is queued behind it.
            while (store->pending_writes() < writers)
                std::this_thread::yield();
            return {};
        });
        (void)r;
    });
    while (!leading)
        std::this_thread::yield();
    const std::uint64_t generation = store->generation();
    for (int i = 0; i < writers; ++i) {
        threads.emplace_back([&, i] {
            results[i] = store->write([&, i](Store::Transaction& tx) -> Result<void> {
                // Every writer inserts a version numbered 100 + i ...
                if (auto r = tx.insert_version(version_row(secret, 100 + i)); !r)
                    return tl::unexpected(r.error());
                // ... and the odd ones then fail, after writing.
                if (i % 2 == 1)
                    return fail(Errc::invalid_argument, "unit " + std::to_string(i) + " gives up");
                return {};
            });
        });
    }
    leader.join();
    for (auto& t : threads)
        t.join();
    // The leader's batch, then one batch of all six (each batch moves the
    // generation once; on PostgreSQL the feed may move it again as it
    // sees the same revisions).
    if (engine == "sqlite")
        CHECK(store->generation() == generation + 2);
    else
        CHECK(store->generation() >= generation + 2);

    for (int i = 0; i < writers; ++i) {
        INFO("writer " << i);
        auto v = store->version(secret, 100 + i);
        REQUIRE(v);
        if (i % 2 == 1) {
            REQUIRE_FALSE(results[i]);
            CHECK(results[i].error().code == Errc::invalid_argument);
            CHECK_FALSE(*v);
        } else {
            CHECK(results[i]);
            CHECK(*v);
        }
    }

    // A unit whose SQL fails (a duplicate version number) is undone alone too.
    auto dup = store->write([&](Store::Transaction& tx) -> Result<void> {
        if (auto r = tx.set_setting("touched", "yes"); !r)
            return r;
        if (auto r = tx.insert_version(version_row(secret, 100)); !r)
            return tl::unexpected(r.error());
        return {};
    });
    REQUIRE_FALSE(dup);
    CHECK(dup.error().code == Errc::already_exists);
    auto touched = store->setting("touched");
    REQUIRE(touched);
    CHECK_FALSE(*touched);
}

TEST_CASE("allocate_version numbers in the transaction, and a unit that fails gives its number back", "[store]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    auto store = create_store(location(engine, dir));
    const VaultId vault = add_vault(*store, "payments");
    const SecretId secret = add_secret(*store, vault, "numbered");
    const auto next = [&] {
        auto row = store->secret_by_id(secret);
        REQUIRE(row);
        REQUIRE(*row);
        return (*row)->next_version;
    };
    CHECK(next() == 1);
    std::uint64_t got = 0;
    REQUIRE(store->write([&](Store::Transaction& tx) -> Result<void> {
        auto a = tx.allocate_version(secret);
        auto b = tx.allocate_version(secret);
        if (!a || !b)
            return fail(Errc::storage, "allocate failed");
        got = *a * 10 + *b;
        return {};
    }));
    CHECK(got == 12);
    CHECK(next() == 3);
    auto failed = store->write([&](Store::Transaction& tx) -> Result<void> {
        if (auto r = tx.allocate_version(secret); !r)
            return tl::unexpected(r.error());
        return fail(Errc::invalid_argument, "the commit gives up");
    });
    REQUIRE_FALSE(failed);
    CHECK(next() == 3);
    auto gone = store->write([&](Store::Transaction& tx) { return tx.allocate_version(SecretId{999}).map([](auto) {}); });
    REQUIRE_FALSE(gone);
    CHECK(gone.error().code == Errc::not_found);
}

TEST_CASE("reads see every committed write, through the lookup cache", "[store]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    auto store = create_store(location(engine, dir));
    const VaultId vault = add_vault(*store, "payments");
    const SecretId secret = add_secret(*store, vault, "db-password");

    // A name without versions resolves to the row only.
    auto none = store->secret_with_version(vault, "db-password", std::nullopt);
    REQUIRE(none);
    REQUIRE(*none);
    CHECK_FALSE((*none)->version);

    for (std::uint64_t expected = 1; expected <= 3; ++expected) {
        auto n = add_version(*store, secret);
        REQUIRE(n);
        CHECK(*n == expected);
        auto current = store->secret_with_version(vault, "db-password", std::nullopt);
        REQUIRE(current);
        REQUIRE(*current);
        REQUIRE((*current)->version);
        CHECK((*current)->version->number == expected);
        auto by_id = store->secret_with_current(secret);
        REQUIRE(by_id);
        REQUIRE(*by_id);
        CHECK((*by_id)->version->number == expected);
    }
    auto pinned = store->secret_with_version(vault, "db-password", 2);
    REQUIRE(pinned);
    REQUIRE(*pinned);
    CHECK((*pinned)->version->number == 2);
    auto missing = store->secret_with_version(vault, "db-password", 4);
    REQUIRE(missing);
    CHECK_FALSE(*missing);
}

TEST_CASE("the audit anchor is stored and read back", "[store]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    auto store = create_store(location(engine, dir));
    auto none = store->audit_anchor();
    REQUIRE(none);
    CHECK_FALSE(*none);
    const std::string hash(64, 'c');
    REQUIRE(store->write([&](Store::Transaction& tx) { return tx.set_audit_anchor(AuditAnchor{42, hash, true}); }));
    const std::vector<std::uint8_t> sig(64, 0x5a);
    REQUIRE(store->write(
        [&](Store::Transaction& tx) { return tx.set_audit_anchor(AuditAnchor{43, hash, false, 1234567, 7, sig}); }));
    auto a = store->audit_anchor();
    REQUIRE(a);
    REQUIRE(*a);
    CHECK((*a)->seq == 43);
    CHECK((*a)->hash == hash);
    CHECK_FALSE((*a)->clean_shutdown);
    CHECK((*a)->time == 1234567);
    CHECK((*a)->file_start == 7);
    CHECK((*a)->sig == sig);
}

TEST_CASE("a schema-1 database migrates to the current schema: its anchor reads back unsigned, owners are the defaults",
          "[store]")
{
    TempDir dir;
    const std::string path = dir / "vault.db";
    {
        sqlite3* db = nullptr;
        REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
        // The tables the migrations alter, as schema 1 had them.
        const char* v1 =
            "CREATE TABLE vaults (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, kek_id TEXT NOT "
            "NULL, retention_days INTEGER NOT NULL DEFAULT 90, purge_protection INTEGER NOT NULL DEFAULT 0, created "
            "INTEGER NOT NULL, created_by INTEGER NOT NULL);"
            "CREATE TABLE secrets (id INTEGER PRIMARY KEY AUTOINCREMENT, vault_id INTEGER NOT NULL, name TEXT NOT "
            "NULL, created INTEGER NOT NULL, next_version INTEGER NOT NULL DEFAULT 1, deleted_at INTEGER, purge_at "
            "INTEGER, UNIQUE (vault_id, name));"
            "INSERT INTO vaults (name, kek_id, created, created_by) VALUES ('old', 'ab', 1, 0);"
            "INSERT INTO secrets (vault_id, name, created, next_version) VALUES (1, 's', 1, 2);"
            "CREATE TABLE audit_anchor (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT "
            "NULL, clean_shutdown INTEGER NOT NULL);"
            "INSERT INTO audit_anchor VALUES (1, 5, 'abc', 1);"
            "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
            "INSERT INTO settings VALUES ('audit_signing_key', 'abcd');"
            "PRAGMA user_version = 1;";
        REQUIRE(sqlite3_exec(db, v1, nullptr, nullptr, nullptr) == SQLITE_OK);
        sqlite3_close(db);
    }
    auto store = Store::open(path, Store::Mode::open_existing);
    INFO((store ? std::string() : store.error().message));
    REQUIRE(store);
    // Settings are this host's (1) now.
    auto key = (*store)->setting("audit_signing_key");
    REQUIRE(key);
    CHECK(*key == std::optional<std::string>("abcd"));
    auto a = (*store)->audit_anchor();
    REQUIRE(a);
    REQUIRE(*a);
    CHECK((*a)->seq == 5);
    CHECK((*a)->sig.empty());
    CHECK((*a)->time == 0);
    auto v = (*store)->vault_by_name("old");
    REQUIRE(v);
    REQUIRE(*v);
    CHECK((*v)->defaults == Ownership{0, 0, 0400});
    auto sec = (*store)->secret_by_name((*v)->id, "s");
    REQUIRE(sec);
    REQUIRE(*sec);
    CHECK_FALSE((*sec)->owner);
    CHECK_FALSE((*sec)->mode);
    CHECK_FALSE((*sec)->created_by);  // made before schema 8: nobody's fresh file
    auto none = (*store)->objects((*v)->id, ObjectKind::key);
    REQUIRE(none);
    CHECK(none->empty());
}

TEST_CASE("keys and certificates: numbered versions, the current one, names unique as Azure has them", "[store]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    auto store = create_store(location(engine, dir));
    const VaultId vault = add_vault(*store, "apps");
    const auto object = [&](ObjectKind kind, const std::string& name) -> Result<ObjectId> {
        ObjectId id;
        auto w = store->write([&](Store::Transaction& tx) -> Result<void> {
            auto made = tx.insert_object(ObjectRow{{}, vault, kind, name, now_micros(), 0, "{}", 1});
            if (!made)
                return tl::unexpected(made.error());
            id = *made;
            return {};
        });
        if (!w)
            return tl::unexpected(w.error());
        return id;
    };
    const auto version = [&](ObjectId id, bool enabled) {
        ObjectVersionRow row;
        row.object = id;
        row.created = now_micros();
        row.enabled = enabled;
        row.body = "{}";
        REQUIRE(store->write([&](Store::Transaction& tx) { return tx.insert_object_version(row); }));
        return row.number;
    };
    auto key = object(ObjectKind::key, "signing");
    REQUIRE(key);
    CHECK(version(*key, true) == 1);
    CHECK(version(*key, true) == 2);
    CHECK(version(*key, false) == 3);
    auto current = store->object_version(*key, std::nullopt);
    REQUIRE(current);
    REQUIRE(*current);
    CHECK((*current)->number == 2);  // the highest enabled one
    auto all = store->object_versions(*key);
    REQUIRE(all);
    CHECK(all->size() == 3);

    // A key and a certificate cannot share a name.
    auto clash = object(ObjectKind::certificate, "signing");
    REQUIRE_FALSE(clash);
    CHECK(clash.error().code == Errc::already_exists);
    // A certificate's name is taken among secrets too, both ways.
    REQUIRE(store->write([&](Store::Transaction& tx) -> Result<void> {
        auto s = tx.ensure_secret(vault, "db", now_micros(), 0);
        if (!s)
            return tl::unexpected(s.error());
        return tx.allocate_version(s->id).map([](auto) {});
    }));
    auto over_secret = object(ObjectKind::certificate, "db");
    REQUIRE_FALSE(over_secret);
    CHECK(over_secret.error().code == Errc::already_exists);
    CHECK(object(ObjectKind::key, "db"));  // keys and secrets are apart
    REQUIRE(object(ObjectKind::certificate, "web"));
    auto secret_over = store->write([&](Store::Transaction& tx) -> Result<void> {
        return tx.ensure_secret(vault, "web", now_micros(), 0).map([](auto&&) {});
    });
    REQUIRE_FALSE(secret_over);
    CHECK(secret_over.error().code == Errc::already_exists);
    // A vault holding objects is not empty.
    auto n = store->secret_count(vault);
    REQUIRE(n);
    CHECK(*n == 4);
}

TEST_CASE("a read-only store refuses writes", "[store]")
{
    const std::string engine = GENERATE(as<std::string>{}, "sqlite", "postgresql");
    INFO("engine " << engine);
    TempDir dir;
    const std::string path = location(engine, dir);
    { create_store(path); }
    auto ro = Store::open(path, Store::Mode::read_only);
    REQUIRE(ro);
    auto w = (*ro)->write([](Store::Transaction& tx) { return tx.set_setting("k", "v"); });
    REQUIRE_FALSE(w);
    CHECK(w.error().code == Errc::storage);
    CHECK_THAT(w.error().message, Catch::Contains("read-only"));
}


// ---- PostgreSQL: one database, several stores (hosts) --------------------------

}  // namespace
}  // namespace vaultfs::vault
