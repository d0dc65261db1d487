// Unit tests for vault::Store on a real PostgreSQL server of the test's own
// (tests/support/postgres.hpp): the schema, several stores writing at once,
// the leader of the background rounds, and the change feed's bound.
#include "tests/vault/store_support.hpp"

namespace vaultfs::vault {
namespace {

using namespace store_test;  // with TempDir

TEST_CASE("PostgreSQL: create makes the schema once; open needs it; an unreachable server is named", "[store][pg]")
{
    auto& pg = testing::shared_pg();
    const std::string url = pg.new_database();
    auto none = Store::open(url, Store::Mode::open_existing);
    REQUIRE_FALSE(none);
    CHECK(none.error().code == Errc::not_found);
    CHECK_THAT(none.error().message, Catch::Contains("holds no vaultfs store") && Catch::Contains("init --store"));
    {
        auto store = create_store(url);
        CHECK(store->shared());
        CHECK(store->path() == url);
        bool ok = false;
        CHECK(pg.psql("SELECT version FROM schema", url.substr(url.rfind('/') + 1), &ok) == "8");
        CHECK(ok);
    }
    auto twice = Store::open(url, Store::Mode::create);
    REQUIRE_FALSE(twice);
    CHECK(twice.error().code == Errc::already_exists);
    CHECK(Store::open(url, Store::Mode::open_existing));
    // A password in the connection string never reaches a message.
    auto away = Store::open("postgresql://postgres:hunter2@127.0.0.1:1/vaultfs?connect_timeout=2",
                            Store::Mode::open_existing);
    REQUIRE_FALSE(away);
    CHECK(away.error().code == Errc::storage);
    CHECK_THAT(away.error().message, Catch::Contains("127.0.0.1:1") && !Catch::Contains("hunter2"));
}

TEST_CASE("PostgreSQL: a store of schema 6 is brought up to 8 by a new host, never by a restart's new process",
          "[store][pg]")
{
    auto& pg = testing::shared_pg();
    const std::string url = pg.new_database();
    const std::string db = url.substr(url.rfind('/') + 1);
    VaultId vault;
    {
        auto store = create_store(url);
        vault = add_vault(*store, "payments");
    }
    // What vaultfs 0.1 made: no KEK rotation columns, no secret creators.
    bool ok = false;
    pg.psql("ALTER TABLE vaults DROP COLUMN rekey_after_days, DROP COLUMN kek_created; ALTER TABLE secrets DROP "
            "COLUMN created_by; UPDATE schema SET version = 6",
            db, &ok);
    REQUIRE(ok);
    StoreOptions restart;
    restart.migrate = false;
    auto refused = Store::open(url, Store::Mode::open_existing, restart);
    REQUIRE_FALSE(refused);
    CHECK_THAT(refused.error().message, Catch::Contains("has schema 6"));
    CHECK(pg.psql("SELECT version FROM schema", db) == "6");
    auto upgraded = Store::open(url, Store::Mode::open_existing);
    INFO((upgraded ? std::string() : upgraded.error().message));
    REQUIRE(upgraded);
    CHECK(pg.psql("SELECT version FROM schema", db) == "8");
    auto row = (*upgraded)->vault_by_id(vault);
    REQUIRE(row);
    REQUIRE(*row);
    CHECK((*row)->rekey_after_days == 0);
    CHECK((*row)->kek_created == (*row)->created);  // 0 in the column: the vault's creation
    // A second host of the new version finds it done.
    CHECK(Store::open(url, Store::Mode::open_existing));
}

TEST_CASE("PostgreSQL: two stores writing one secret at once get distinct numbers, and none is lost",
          "[store][pg][concurrency]")
{
    const std::string url = testing::shared_pg().new_database();
    auto a = create_store(url);
    auto opened = Store::open(url, Store::Mode::open_existing);
    REQUIRE(opened);
    auto b = std::move(*opened);
    const VaultId vault = add_vault(*a, "payments");
    const SecretId secret = add_secret(*a, vault, "counter");

    constexpr int per_thread = 20;
    std::mutex mutex;
    std::vector<std::uint64_t> numbers;
    std::vector<std::string> errors;
    std::vector<std::thread> workers;
    for (Store* s : {a.get(), b.get(), a.get(), b.get()}) {
        workers.emplace_back([&, s] {
            for (int i = 0; i < per_thread; ++i) {
                auto n = add_version(*s, secret);
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
    CHECK(distinct.size() == 4 * per_thread);
    CHECK(*distinct.rbegin() == 4 * per_thread);
    auto versions = b->versions_of(secret);
    REQUIRE(versions);
    CHECK(versions->size() == 4 * per_thread);
}

TEST_CASE("PostgreSQL: one store at a time leads the background rounds; another takes over when it goes",
          "[store][pg]")
{
    const std::string url = testing::shared_pg().new_database();
    auto a = create_store(url);
    auto opened = Store::open(url, Store::Mode::open_existing);
    REQUIRE(opened);
    auto b = std::move(*opened);
    CHECK(a->background_leader());
    CHECK_FALSE(b->background_leader());
    CHECK(a->background_leader());  // still
    a.reset();
    // b asks again at most every 5 s.
    const auto start = std::chrono::steady_clock::now();
    bool took_over = false;
    while (!took_over && std::chrono::steady_clock::now() - start < std::chrono::seconds(8)) {
        took_over = b->background_leader();
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    CHECK(took_over);
    TempDir dir;
    auto local = create_store(dir / "vault.db");
    CHECK(local->background_leader());  // SQLite: always
}

TEST_CASE("PostgreSQL: another store's write reaches this one's cache within the bound; past it reads fail closed",
          "[store][pg]")
{
    testing::PgServer pg;  // its own: this test stops it
    const std::string url = pg.new_database();
    StoreOptions options;
    options.staleness_bound = std::chrono::milliseconds(1000);
    auto made = Store::open(url, Store::Mode::create, options);
    REQUIRE(made);
    auto a = std::move(*made);
    auto opened = Store::open(url, Store::Mode::open_existing, options);
    REQUIRE(opened);
    auto b = std::move(*opened);
    const VaultId vault = add_vault(*a, "payments");
    const SecretId secret = add_secret(*a, vault, "db-password");
    REQUIRE(add_version(*a, secret));

    // b caches what it read (no query per lookup) ...
    const auto current_on_b = [&]() -> std::uint64_t {
        auto v = b->secret_with_version(vault, "db-password", std::nullopt);
        REQUIRE(v);
        REQUIRE(*v);
        return (*v)->version ? (*v)->version->number : 0;
    };
    const auto within = [&](std::chrono::milliseconds limit, auto&& done) {
        const auto start = std::chrono::steady_clock::now();
        while (!done()) {
            if (std::chrono::steady_clock::now() - start > limit)
                return false;
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        return true;
    };
    REQUIRE(within(options.staleness_bound, [&] { return current_on_b() == 1; }));
    // ... and a write on a reaches it within the bound.
    REQUIRE(add_version(*a, secret));
    const auto wrote = std::chrono::steady_clock::now();
    CHECK(within(options.staleness_bound, [&] { return current_on_b() == 2; }));
    CHECK(std::chrono::steady_clock::now() - wrote <= options.staleness_bound);
    // Read-your-writes: a sees its own at once.
    REQUIRE(add_version(*a, secret));
    auto mine = a->secret_with_version(vault, "db-password", std::nullopt);
    REQUIRE(mine);
    REQUIRE(*mine);
    CHECK((*mine)->version->number == 3);
    REQUIRE(within(options.staleness_bound, [&] { return current_on_b() == 3; }));

    // The server stops: b serves what it holds until the bound, then fails closed.
    pg.stop(true);
    const auto stopped = std::chrono::steady_clock::now();
    CHECK(within(options.staleness_bound * 2, [&] {
        return !b->secret_with_version(vault, "db-password", std::nullopt).has_value();
    }));
    CHECK(std::chrono::steady_clock::now() - stopped >= options.staleness_bound / 2);
    auto refused = b->secret_with_version(vault, "db-password", std::nullopt);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().code == Errc::not_fresh);
    CHECK_THAT(refused.error().message, Catch::Contains("staleness bound 1000 ms"));
    CHECK_FALSE(b->fresh());
    // Back: it recovers by itself, and sees what was written before.
    REQUIRE(pg.start());
    CHECK(within(std::chrono::milliseconds(10000), [&] { return b->fresh().has_value(); }));
    CHECK(current_on_b() == 3);
    // Writes work again too, on a new session.
    CHECK(within(std::chrono::milliseconds(5000), [&] { return add_version(*b, secret).has_value(); }));
}

}  // namespace
}  // namespace vaultfs::vault
