// Unit tests for vault/audit/log, the writer: what it puts in the file, the
// signed coverage it keeps (and fails closed without), the signed anchor,
// the check it makes before continuing a file it finds at start, and the
// bound on what callers who hold nothing can write.
//
// Signatures come from a real SoftHSM2 token (one at a time per process);
// a full disk is a real tmpfs.
#include "vault/audit/log.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "tests/support/small_tmpfs.hpp"
#include "tests/vault/audit/audit_support.hpp"

namespace vaultfs::vault::audit {
namespace {

using namespace testing;

VerifyReport verify(const std::string& path, const std::string& pem, VerifyOptions options = {})
{
    return verify_files({path}, pem, options);
}

VerifyOptions with_anchor(Store& store)
{
    VerifyOptions o;
    auto a = store.audit_anchor();
    REQUIRE(a);
    o.anchor = *a;
    o.anchor_expected = true;
    return o;
}

const Caller outsider_caller{policy::Subject{1001, 1001, {}}, 77};

Event outsider_refusal(std::string_view op = "vault_create", std::string_view vault = "not-mine")
{
    return Event{.op = op,
                 .caller = &outsider_caller,
                 .vault = vault,
                 .allowed = false,
                 .rule = "not-admin",
                 .result = "EACCES",
                 .coalesce = true};
}

TEST_CASE("create writes a signed init record; open adds a signed start record", "[audit][log]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    REQUIRE(Log::create(path, signing.signer(), Bound{7, 9}, nullptr));
    struct stat st{};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);

    const Lines one = read_lines(path);
    REQUIRE(one.size() == 1);
    auto init = parse(one[0]);
    REQUIRE(init);
    CHECK(init->op == "init");
    CHECK(init->seq == 1);
    CHECK(init->prev == genesis_hash());
    CHECK(init->count("bound_records") == 7);
    CHECK(init->count("bound_seconds") == 9);
    REQUIRE(init->is_signed());
    const SignatureVerifier verifier(signing.pem);
    CHECK(verifier.verify(body_digest(init->body), init->sig));

    // create never overwrites.
    auto again = Log::create(path, signing.signer(), Bound{}, nullptr);
    REQUIRE_FALSE(again);
    CHECK(again.error().code == Errc::audit_unavailable);
    CHECK_THAT(again.error().message, Catch::Contains(path));
    CHECK(read_lines(path) == one);

    {
        auto log = Log::open(options_for(path), signing.signer(), nullptr);
        REQUIRE(log);
        CHECK((*log)->healthy());
        CHECK((*log)->last_seq() == 2);
    }
    const Lines two = read_lines(path);
    REQUIRE(two.size() == 2);
    auto start = parse(two[1]);
    REQUIRE(start);
    CHECK(start->op == "start");
    CHECK(start->prev == init->hash);
    CHECK(start->is_signed());
    CHECK(start->fields["clean"] == false);  // no anchor says the last stop was clean
    CHECK(start->count("records") == 0);

    auto missing = Log::open(options_for(dir / "absent.jsonl"), signing.signer(), nullptr);
    REQUIRE_FALSE(missing);
    CHECK(missing.error().code == Errc::audit_unavailable);
    CHECK_THAT(missing.error().message, Catch::Contains("absent.jsonl"));
}

TEST_CASE("appended records form a chain that verifies", "[audit][log]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto log = create_and_open(signing, path);
    append_n(*log, 10);
    const Caller user{policy::Subject{1000, 1000, {}}, 1};
    REQUIRE(log->append(Event{.op = "set",
                              .caller = &user,
                              .vault = "payments",
                              .secret = "db-password",
                              .allowed = false,
                              .rule = "default-deny",
                              .result = "EACCES",
                              .reason = "the \"policy\" says no \xc3\xa9",
                              .attribute = "tags"}));
    CHECK(log->last_seq() == 13);

    const Lines lines = read_lines(path);
    REQUIRE(lines.size() == 13);
    for (std::size_t i = 0; i < lines.size(); ++i) {
        INFO("line " << i + 1);
        auto r = parse(lines[i]);
        REQUIRE(r);
        CHECK(r->seq == i + 1);
        if (i > 0)
            CHECK(r->prev == parse(lines[i - 1])->hash);
        for (const char* field : {"time", "op", "vault", "secret", "version", "uid", "gid", "pid", "exe", "decision",
                                  "rule", "result", "bytes", "prev"})
            CHECK(r->fields.contains(field));
    }
    const json get = fields(lines[2]);
    CHECK(get["op"] == "get");
    CHECK(get["vault"] == "payments");
    CHECK(get["version"] == 1);
    CHECK(get["uid"] == 0);
    CHECK(get["decision"] == "allow");
    CHECK(get["bytes"] == 7);
    const json set = fields(lines[12]);
    CHECK(set["decision"] == "deny");
    CHECK(set["uid"] == 1000);
    CHECK(set["reason"] == "the \"policy\" says no \xc3\xa9");

    const VerifyReport rep = verify(path, signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK(rep.records == 13);
    CHECK(rep.signed_records == 2);
    CHECK(rep.unsigned_tail == 11);
}

TEST_CASE("a signed checkpoint every N records", "[audit][log]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    {
        auto log = create_and_open(signing, path, nullptr, Bound{5, 60});
        append_n(*log, 12);
    }
    const Lines lines = read_lines(path);
    // init, start, 5 gets, checkpoint, 5 gets, checkpoint, 2 gets
    REQUIRE(lines.size() == 2 + 12 + 2);
    std::vector<std::size_t> at;
    for (std::size_t i = 0; i < lines.size(); ++i) {
        auto r = parse(lines[i]);
        REQUIRE(r);
        if (r->op == "checkpoint") {
            at.push_back(i + 1);
            CHECK(r->count("records") == 5);
            CHECK(r->count("bound_records") == 5);
            CHECK(r->is_signed());
        }
    }
    CHECK(at == std::vector<std::size_t>{8, 14});
    const VerifyReport rep = verify(path, signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK(rep.signed_records == 4);
    CHECK(rep.unsigned_tail == 2);
}

TEST_CASE("a signed checkpoint before a record would fall outside the time bound", "[audit][log]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    TestClock clock;
    auto log = create_and_open(signing, path, nullptr, Bound{1000, 10}, clock.fn());
    append_n(*log, 1);
    clock.advance_seconds(9.9);
    append_n(*log, 1);
    CHECK(count_op(read_lines(path), "checkpoint") == 0);
    clock.advance_seconds(0.2);  // 10.1 s after the first unsigned record
    append_n(*log, 1);
    Lines lines = read_lines(path);
    REQUIRE(lines.size() == 6);
    CHECK(op_of(lines[4]) == "checkpoint");
    CHECK(parse(lines[4])->count("records") == 2);
    CHECK(op_of(lines[5]) == "get");

    // An idle log gets its checkpoint from the background duties.
    clock.advance_seconds(11);
    log->tick();
    lines = read_lines(path);
    REQUIRE(lines.size() == 7);
    CHECK(op_of(lines[6]) == "checkpoint");
    log->tick();
    CHECK(read_lines(path).size() == 7);  // nothing unsigned: nothing to sign

    const VerifyReport rep = verify(path, signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK(rep.unsigned_tail == 0);
}

TEST_CASE("a due checkpoint the token refuses fails the append: nothing is written uncovered", "[audit][log]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto log = create_and_open(signing, path, nullptr, Bound{3, 60});
    append_n(*log, 2);
    signing.flaky.refuse_signatures = true;
    // The third record is written; its checkpoint is refused.
    REQUIRE(log->append(get_event()));
    const auto size = read_all(path).size();
    // The fourth would make the stretch longer than the bound: refused.
    auto r = log->append(get_event());
    REQUIRE_FALSE(r);
    CHECK(r.error().code == Errc::audit_unavailable);
    CHECK_FALSE(log->healthy());
    CHECK(read_all(path).size() == size);

    signing.flaky.refuse_signatures = false;
    REQUIRE(log->append(get_event()));
    const Lines lines = read_lines(path);
    CHECK(op_of(lines[lines.size() - 2]) == "checkpoint");
    REQUIRE(log->close());
    const VerifyReport rep = verify(path, signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
}

TEST_CASE("the chain head is anchored in the database, signed by the token", "[audit][log][anchor]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto store = Store::open(dir / "vault.db", Store::Mode::create);
    REQUIRE(store);
    auto log = create_and_open(signing, path, store->get());
    {
        // init anchors the first record, and open its start record at once
        // (not clean: a daemon is running).
        auto a = (*store)->audit_anchor();
        REQUIRE(a);
        REQUIRE(*a);
        CHECK((*a)->seq == 2);
        CHECK_FALSE((*a)->clean_shutdown);
    }
    append_n(*log, 4);
    log->tick();
    auto a = (*store)->audit_anchor();
    REQUIRE(a);
    REQUIRE(*a);
    const Lines lines = read_lines(path);
    CHECK((*a)->seq == lines.size());
    CHECK((*a)->hash == parse(lines.back())->hash);
    CHECK_FALSE((*a)->clean_shutdown);
    const SignatureVerifier verifier(signing.pem);
    CHECK(verifier.verify(anchor_digest(**a), (*a)->sig));
    const VerifyReport rep = verify(path, signing.pem, with_anchor(**store));
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK(rep.anchor_reached);
}

// ---- verify before continuing ---------------------------------------------------------

struct Restartable {
    Restartable(Bound b = {5, 60})
        : bound(b)
    {
        auto s = Store::open(dir / "vault.db", Store::Mode::create);
        REQUIRE(s);
        store = std::move(*s);
        REQUIRE(Log::create(path, signing.signer(), bound, store.get()));
    }
    std::unique_ptr<Log> open()
    {
        auto log = Log::open(options_for(path, bound), signing.signer(), store.get());
        if (!log)
            FAIL("Log::open failed: " << log.error().message);
        return std::move(*log);
    }
    json last_start()
    {
        const Lines lines = read_lines(path);
        for (auto it = lines.rbegin(); it != lines.rend(); ++it)
            if (op_of(*it) == "start")
                return fields(*it);
        FAIL("no start record");
        return {};
    }
    Signing signing;
    TempDir dir;
    std::string path = dir / "audit.jsonl";
    Bound bound;
    std::unique_ptr<Store> store;
};

TEST_CASE("after a crash the start record signs over the unsigned tail", "[audit][log][start]")
{
    Restartable r;
    {
        auto log = r.open();
        append_n(*log, 3);
        log->tick();
    }  // no close(): a crash
    {
        auto log = r.open();
        CHECK(log->healthy());
    }
    const json start = r.last_start();
    CHECK(start["records"] == 3);
    CHECK(start["clean"] == false);
    CHECK_FALSE(start.contains("break"));
    const VerifyReport rep = verify(r.path, r.signing.pem, with_anchor(*r.store));
    INFO(joined(rep.problems));
    CHECK(rep.ok);

    // A clean stop is said to be clean.
    {
        auto log = r.open();
        REQUIRE(log->close());
    }
    { auto log = r.open(); }
    CHECK(r.last_start()["clean"] == true);
}

TEST_CASE("a record torn by a crash is dropped at the next start and recorded", "[audit][log][start]")
{
    Restartable r;
    {
        auto log = r.open();
        append_n(*log, 3);
        log->tick();
    }
    const Lines before = read_lines(r.path);
    const std::string torn = before[2].substr(0, 57);
    std::ofstream(r.path, std::ios::binary | std::ios::app) << torn;
    CHECK(verify(r.path, r.signing.pem).ok);  // torn, not tampered
    { auto log = r.open(); }
    const std::string text = read_all(r.path);
    CHECK(text.back() == '\n');
    CHECK(text.find(torn + "{") == std::string::npos);
    const json start = r.last_start();
    CHECK(start["torn_bytes"] == torn.size());
    CHECK_FALSE(start.contains("break"));
    const VerifyReport rep = verify(r.path, r.signing.pem, with_anchor(*r.store));
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK_THAT(joined(rep.warnings), !Catch::Contains("torn"));
}

TEST_CASE("a chain broken while the daemon was down is not continued, and the break is kept for ever",
          "[audit][log][start][tamper]")
{
    Restartable r(Bound{20, 60});
    {
        auto log = r.open();
        append_n(*log, 6);
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(r.path);

    SECTION("the daemon's own trail rewritten and re-chained, signatures stripped: the issue's attack")
    {
        // Keep the signed init, drop the uid-0 gets, strip every later
        // signature by turning signed records into status records.
        Lines forged{lines[0]};
        for (std::size_t i = 1; i < lines.size(); ++i)
            if (op_of(lines[i]) != "get")
                forged.push_back(lines[i]);
        forged = forge(forged, 1, [](json& f) {
            if (is_signed_op(f["op"].get<std::string>()))
                f["op"] = "status";
        });
        write_lines(r.path, forged);
    }
    SECTION("the database anchor edited to match a cut file")
    {
        Lines cut(lines.begin(), lines.end() - 3);
        write_lines(r.path, cut);
        auto last = parse(cut.back());
        REQUIRE(r.store->write([&](Store::Transaction& tx) {
            return tx.set_audit_anchor(AuditAnchor{last->seq, last->hash, true, 0, 1, std::vector<std::uint8_t>(64, 7)});
        }));
    }
    SECTION("the file cut back behind the anchor")
    {
        write_lines(r.path, Lines(lines.begin(), lines.end() - 2));
    }
    SECTION("a record after the last signature edited")
    {
        // The signed shutdown removed, so that the gets are the unsigned tail
        // (as after a crash), and one of them changed.
        Lines edited(lines.begin(), lines.end() - 1);
        edited[4] = forge(edited, 4, [](json& f) { f["uid"] = 4242; })[4];
        write_lines(r.path, edited);
    }

    const std::size_t lines_before = read_lines(r.path).size();
    {
        auto log = r.open();
        append_n(*log, 2);
        REQUIRE(log->close());
    }
    const Lines after = read_lines(r.path);
    REQUIRE(after.size() > lines_before);
    const json start = fields(after[lines_before]);
    REQUIRE(start["op"] == "start");
    REQUIRE(start.contains("break"));
    CHECK(start["clean"] == false);
    CHECK(start.contains("trusted_seq"));
    INFO("break: " << start["break"]);

    // verify reports the break, with or without the state, for ever.
    for (const auto& options : {VerifyOptions{}, with_anchor(*r.store)}) {
        const VerifyReport rep = verify(r.path, r.signing.pem, options);
        CHECK_FALSE(rep.ok);
        REQUIRE(rep.breaks.size() == 1);
        CHECK_THAT(rep.breaks[0], Catch::Contains("found the chain broken"));
        CHECK_THAT(joined(rep.problems), Catch::Contains("recorded a break"));
    }
    // Later starts continue the new segment, and the break stays.
    { auto log = r.open(); }
    CHECK_FALSE(r.last_start().contains("break"));
    const VerifyReport later = verify(r.path, r.signing.pem, with_anchor(*r.store));
    CHECK_FALSE(later.ok);
    CHECK(later.breaks.size() == 1);

    // And tampering after the break is still found.
    Lines again = read_lines(r.path);
    const std::size_t n = again.size();
    again[n - 2].replace(again[n - 2].find("\"op\":\""), 6, "\"op\":\"x");
    write_lines(r.path, again);
    const VerifyReport more = verify(r.path, r.signing.pem);
    CHECK_THAT(joined(more.problems), Catch::Contains("line " + std::to_string(n - 1) + ": "));
}

TEST_CASE("an emptied, removed, cut or appended-to file is a break, not a continuation", "[audit][log][start][tamper]")
{
    Restartable r;
    {
        auto log = r.open();
        append_n(*log, 2);
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(r.path);
    const std::uint64_t last = parse(lines.back())->seq;
    const auto expect_break = [&](const std::string& why) {
        { auto log = r.open(); }
        const Lines now = read_lines(r.path);
        json start;
        for (const auto& l : now)
            if (op_of(l) == "start" && fields(l).contains("break"))
                start = fields(l);
        INFO(why);
        REQUIRE(start.is_object());
        CHECK_THAT(start["break"].get<std::string>(), Catch::Contains(why));
        const VerifyReport rep = verify(r.path, r.signing.pem, with_anchor(*r.store));
        CHECK_FALSE(rep.ok);
        CHECK(rep.breaks.size() == 1);
    };

    SECTION("emptied while the daemon was down (the history gone)")
    {
        std::ofstream(r.path, std::ios::trunc).close();
        expect_break("the audit file is empty");
        CHECK(parse(read_lines(r.path).front())->seq == last + 1);
    }
    SECTION("records appended after the clean shutdown, chained and within the bound")
    {
        Lines more = lines;
        more.push_back(lines[lines.size() - 2]);  // a get, re-chained after the shutdown
        more = forge(more, more.size() - 1, [](json& f) { f["uid"] = 4242; });
        write_lines(r.path, more);
        // The files alone already say so.
        const VerifyReport files_only = verify(r.path, r.signing.pem);
        CHECK_FALSE(files_only.ok);
        CHECK_THAT(files_only.problem, Catch::Contains("follows the shutdown"));
        expect_break("added while the daemon was down");
    }
    SECTION("the file's first records cut away")
    {
        write_lines(r.path, Lines(lines.begin() + 2, lines.end()));
        CHECK_FALSE(verify(r.path, r.signing.pem, with_anchor(*r.store)).ok);  // starts in the middle
        expect_break("replaced or cut");
    }
}

TEST_CASE("a file removed while the daemon runs: the new file records the break; a rotation does not",
          "[audit][log][tamper]")
{
    Restartable r;
    auto log = r.open();
    append_n(*log, 2);
    // logrotate's way: renamed, then SIGHUP. The new file starts where the
    // anchor says it does.
    REQUIRE(::rename(r.path.c_str(), (r.path + ".1").c_str()) == 0);
    log->request_reopen();
    append_n(*log, 1);
    auto anchor = r.store->audit_anchor();
    REQUIRE(anchor);
    REQUIRE(*anchor);
    CHECK((*anchor)->file_start == parse(read_lines(r.path).front())->seq);
    CHECK_FALSE(fields(read_lines(r.path).front()).contains("break"));

    // Removed outright: its records are gone, and that is said.
    REQUIRE(::unlink(r.path.c_str()) == 0);
    append_n(*log, 1);
    const json first = fields(read_lines(r.path).front());
    CHECK(first["op"] == "rotate");
    CHECK_THAT(first["break"].get<std::string>(), Catch::Contains("removed while the daemon ran"));
    REQUIRE(log->close());
    const VerifyReport rep = verify(r.path, r.signing.pem, with_anchor(*r.store));
    CHECK_FALSE(rep.ok);
    CHECK(rep.breaks.size() == 1);
}

// ---- refusals of callers who hold nothing --------------------------------------------

TEST_CASE("an outsider's refusals are coalesced: one record, then a count per window", "[audit][log][coalesce]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    TestClock clock;
    auto log = create_and_open(signing, path, nullptr, Bound{}, clock.fn());
    const std::size_t before = read_lines(path).size();
    const std::string long_name(200, 'x');
    for (int i = 0; i < 10000; ++i) {
        REQUIRE(log->append(outsider_refusal("vault_create", long_name)));
        clock.advance_seconds(0.0005);
    }
    Lines lines = read_lines(path);
    REQUIRE(lines.size() == before + 1);  // the first, at once
    const json first = fields(lines.back());
    CHECK(first["op"] == "vault_create");
    CHECK(first["uid"] == 1001);
    CHECK(first["decision"] == "deny");
    CHECK(first["vault"] == long_name.substr(0, 64) + "...");
    CHECK(log->stats().coalesced == 9999);

    // Allowed records are never coalesced.
    append_n(*log, 3);
    CHECK(read_lines(path).size() == before + 4);

    clock.advance_seconds(10);
    log->tick();
    lines = read_lines(path);
    const json repeats = fields(lines.back());
    CHECK(repeats["op"] == "repeats");
    CHECK(repeats["of"] == "vault_create");
    CHECK(repeats["result"] == "EACCES");
    CHECK(repeats["uid"] == 1001);
    CHECK(repeats["count"] == 9999);

    // The next window starts with a record written at once.
    REQUIRE(log->append(outsider_refusal()));
    CHECK(op_of(read_lines(path).back()) == "vault_create");
    REQUIRE(log->close());
    const VerifyReport rep = verify(path, signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
}

TEST_CASE("below the disk reserve an outsider's records are counted, allowed ones still written",
          "[audit][log][coalesce]")
{
    Signing signing;
    TempDir dir;
    vaultfs::testing::SmallTmpfs small(dir / "small", "size=2m,mode=0700");
    const std::string path = small / "audit.jsonl";
    TestClock clock;
    REQUIRE(Log::create(path, signing.signer(), Bound{}, nullptr));
    Log::Options o = options_for(path, Bound{}, clock.fn());
    o.reserve_bytes = 1 << 20;
    auto opened = Log::open(o, signing.signer(), nullptr);
    REQUIRE(opened);
    auto& log = **opened;

    // Room: the outsider's first refusal is written.
    REQUIRE(log.append(outsider_refusal("vault_create")));
    CHECK(op_of(read_lines(path).back()) == "vault_create");

    // Leave less than the reserve free.
    {
        std::ofstream filler(small / "filler", std::ios::binary);
        filler << std::string(1200 * 1024, 'F');
    }
    clock.advance_seconds(0.3);  // the free-space check is cached for 250 ms
    const std::size_t before = read_lines(path).size();
    REQUIRE(log.append(outsider_refusal("lookup", "other")));  // a new group, but no room for it
    CHECK(read_lines(path).size() == before);
    CHECK(log.stats().dropped == 1);
    CHECK(log.stats().low_space);
    // Repeats of the first group are counted, and when their window ends
    // the count is dropped too -- as a count, not as one.
    for (int i = 0; i < 5; ++i)
        REQUIRE(log.append(outsider_refusal("vault_create")));
    clock.advance_seconds(11);
    log.tick();
    CHECK(log.stats().dropped == 1 + 5);
    append_n(log, 2);  // allowed work still gets its records
    CHECK(read_lines(path).size() == before + 2);

    // The count lands in the next signed record.
    REQUIRE(log.close());
    const json shutdown = fields(read_lines(path).back());
    CHECK(shutdown["op"] == "shutdown");
    std::uint64_t dropped = 0;
    for (const auto& l : read_lines(path))
        dropped += fields(l).value("dropped", std::uint64_t{0});
    CHECK(dropped == 6);
    opened->reset();
    CHECK(verify(path, signing.pem).ok);
}

// ---- faults -------------------------------------------------------------------------------

TEST_CASE("a full disk makes append fail closed until space returns", "[audit][log]")
{
    Signing signing;
    TempDir dir;
    vaultfs::testing::SmallTmpfs small(dir / "small", "size=64k,mode=0700");
    const std::string path = small / "audit.jsonl";
    auto log = create_and_open(signing, path);
    append_n(*log, 3);
    CHECK(log->healthy());

    CHECK(small.fill("filler") > 0);
    // The audit file's last page may still hold a few records.
    Result<void> r;
    int appended = 0;
    std::uintmax_t size_before_failure = 0;
    for (; appended < 200; ++appended) {
        size_before_failure = std::filesystem::file_size(path);
        r = log->append(get_event());
        if (!r)
            break;
    }
    REQUIRE_FALSE(r);
    CHECK(appended < 200);
    CHECK(r.error().code == Errc::audit_unavailable);
    CHECK_FALSE(log->healthy());
    CHECK(std::filesystem::file_size(path) == size_before_failure);  // no half record
    const std::uint64_t seq_at_failure = log->last_seq();
    auto again = log->append(get_event());
    REQUIRE_FALSE(again);
    CHECK(log->last_seq() == seq_at_failure);

    REQUIRE(::unlink((small / "filler").c_str()) == 0);
    REQUIRE(log->append(get_event()));
    CHECK(log->healthy());
    CHECK(log->last_seq() == seq_at_failure + 1);
    append_n(*log, 2);
    REQUIRE(log->close());
    log.reset();
    const VerifyReport rep = verify(path, signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK(rep.warnings.empty());
}

TEST_CASE("a hand-over to another signing key verifies with the new key alone, and is checked in place",
          "[audit][log][handover]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto log = create_and_open(signing, path);
    REQUIRE(log->append(get_event()));

    // The next key is of the other scheme: RSA-PSS after ECDSA.
    auto rsa = signing.token.open(TempToken::pin,
                                  hsm::Schemes{hsm::SealScheme::aes_gcm, hsm::SignatureScheme::rsa_pss_sha256});
    REQUIRE(rsa);
    auto next = (*rsa)->create_signing_key("next");
    REQUIRE(next);
    auto der = (*rsa)->public_key_der(*next);
    REQUIRE(der);
    const std::string next_pem = *public_key_pem(*der);
    REQUIRE(log->hand_over(Signer{rsa->get(), *next}, "token 'next'"));
    REQUIRE(log->append(get_event()));
    REQUIRE(log->close());
    log.reset();

    const Lines lines = read_lines(path);
    std::size_t at = 0;
    for (std::size_t i = 0; i < lines.size(); ++i)
        if (parse(lines[i])->op == "handover")
            at = i;
    REQUIRE(at > 0);
    const auto handover = parse(lines[at]);
    CHECK(handover->fields["old_key"] == signing.pem);
    CHECK(handover->fields["new_key"] == next_pem);
    CHECK(handover->fields["token"] == "token 'next'");
    CHECK(handover->sig.size() == 64);  // signed by the old, ECDSA key
    const auto confirm = parse(lines[at + 1]);
    CHECK(confirm->op == "checkpoint");
    CHECK(confirm->sig.size() == 384);  // and confirmed by the new, RSA-3072 one

    auto rep = verify(path, next_pem);
    INFO(rep.problem);
    CHECK(rep.ok);
    CHECK(rep.signed_records == 5);  // init, start, handover, checkpoint, shutdown

    // The old key alone does not reach the end.
    rep = verify(path, signing.pem);
    CHECK_FALSE(rep.ok);
    CHECK(rep.problem == "the handover record hands over to a key that does not lead to the audit public key");

    // A hand-over the new key never confirmed is not taken on trust.
    const std::string cut = dir / "cut.jsonl";
    {
        std::ofstream out(cut);
        for (std::size_t i = 0; i <= at; ++i)
            out << lines[i] << "\n";
    }
    rep = verify(cut, next_pem);
    CHECK_FALSE(rep.ok);
    CHECK(rep.problem == "the handover at seq " + std::to_string(handover->seq) +
                             " is not confirmed by any record signed with the key it hands over to");

    // After the hand-over the old key signs nothing: the confirming
    // checkpoint, byte for byte the same but signed by the old key, is a
    // forgery (the chain itself is intact: only the signature differs).
    const std::string mixed = dir / "mixed.jsonl";
    {
        auto old_sig = signing.keys->sign_digest(signing.key, body_digest(confirm->body));
        REQUIRE(old_sig);
        const SealedLine forged = seal(confirm->body, *old_sig);
        REQUIRE(forged.hash == confirm->hash);
        std::ofstream out(mixed);
        for (std::size_t i = 0; i < lines.size(); ++i)
            out << (i == at + 1 ? forged.text : lines[i]) << "\n";
    }
    rep = verify(mixed, next_pem);
    CHECK_FALSE(rep.ok);
    CHECK(rep.line == at + 2);
    CHECK(rep.problem == "forged checkpoint record: its signature does not verify with the audit public key");
}

}  // namespace
}  // namespace vaultfs::vault::audit
