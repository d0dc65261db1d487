// Unit tests for vault/audit/verify: what `audit verify` says about copies
// of a log that were edited, cut, reordered, forged or rotated, and the
// forgeries of issue 13 -- signatures stripped, records deleted or changed
// and the chain recomputed -- which must fail without the token key.
#include "vault/audit/verify.hpp"

#include <catch2/catch.hpp>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "tests/vault/audit/audit_support.hpp"

namespace vaultfs::vault::audit {
namespace {

using namespace testing;

VerifyReport verify(const std::vector<std::string>& files, const std::string& pem, VerifyOptions options = {})
{
    return verify_files(files, pem, options);
}

// ECDSA P-256 by a key that is not the token's, as r | s.
class ForeignKey {
public:
    ForeignKey() : key_(EVP_EC_gen("P-256")) { REQUIRE(key_ != nullptr); }
    ~ForeignKey() { EVP_PKEY_free(key_); }
    ForeignKey(const ForeignKey&) = delete;
    ForeignKey& operator=(const ForeignKey&) = delete;

    std::vector<std::uint8_t> sign(std::span<const std::uint8_t, 32> digest) const
    {
        EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key_, nullptr);
        std::vector<std::uint8_t> der(128);
        std::size_t len = der.size();
        REQUIRE(ctx != nullptr);
        REQUIRE(EVP_PKEY_sign_init(ctx) == 1);
        REQUIRE(EVP_PKEY_sign(ctx, der.data(), &len, digest.data(), digest.size()) == 1);
        EVP_PKEY_CTX_free(ctx);
        const unsigned char* p = der.data();
        ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(len));
        REQUIRE(sig != nullptr);
        std::vector<std::uint8_t> rs(64);
        BN_bn2binpad(ECDSA_SIG_get0_r(sig), rs.data(), 32);
        BN_bn2binpad(ECDSA_SIG_get0_s(sig), rs.data() + 32, 32);
        ECDSA_SIG_free(sig);
        return rs;
    }

    std::string pem() const
    {
        BIO* bio = BIO_new(BIO_s_mem());
        REQUIRE(PEM_write_bio_PUBKEY(bio, key_) == 1);
        char* data = nullptr;
        const long len = BIO_get_mem_data(bio, &data);
        std::string out(data, static_cast<std::size_t>(len));
        BIO_free(bio);
        return out;
    }

private:
    EVP_PKEY* key_;
};

// A line signed again, with `sign` over its (unchanged) body.
template <class Sign>
std::string resigned(const std::string& line, Sign&& sign)
{
    auto r = parse(line);
    REQUIRE(r);
    return seal(r->body, sign(std::span<const std::uint8_t, 32>(body_digest(r->body)))).text;
}

// A closed log: init, start, 8 gets, shutdown.
struct ClosedLog {
    ClosedLog()
    {
        auto log = create_and_open(signing, path);
        append_n(*log, 8);
        REQUIRE(log->close());
        lines = read_lines(path);
        REQUIRE(lines.size() == 11);
        REQUIRE(op_of(lines[10]) == "shutdown");
    }
    Signing signing;
    TempDir dir;
    std::string path = dir / "audit.jsonl";
    Lines lines;
};

TEST_CASE("an untouched log verifies, every record signed over", "[audit][verify]")
{
    ClosedLog c;
    const VerifyReport rep = verify({c.path}, c.signing.pem);
    INFO(joined(rep.problems));
    CHECK(rep.ok);
    CHECK(rep.records == 11);
    CHECK(rep.signed_records == 3);
    CHECK(rep.unsigned_tail == 0);
    CHECK(rep.breaks.empty());

    ForeignKey other;
    const VerifyReport wrong_key = verify({c.path}, other.pem());
    CHECK_FALSE(wrong_key.ok);
    CHECK(wrong_key.line == 1);
    CHECK_THAT(wrong_key.problem, Catch::Contains("forged init record"));
    const VerifyReport no_key = verify({c.path}, "not a key");
    CHECK_FALSE(no_key.ok);
    CHECK_THAT(no_key.problem, Catch::Contains("public key"));
}

TEST_CASE("verify names the first bad line of an edited, cut, reordered or forged copy", "[audit][verify][tamper]")
{
    ClosedLog c;
    const auto check_bad = [&](const std::string& copy, std::uint64_t line, const std::string& word) {
        const VerifyReport rep = verify({copy}, c.signing.pem);
        INFO("problems: " << joined(rep.problems));
        CHECK_FALSE(rep.ok);
        CHECK(rep.file == copy);
        CHECK(rep.line == line);
        CHECK_THAT(rep.problem, Catch::Contains(word));
    };
    const std::string copy = c.dir / "copy.jsonl";

    SECTION("a field edited in one line")
    {
        tampered_copy(copy, c.lines, [](Lines& l) {
            const auto at = l[4].find("\"uid\":0");
            REQUIRE(at != std::string::npos);
            l[4].replace(at, 7, "\"uid\":1");
        });
        check_bad(copy, 5, "record edited");
    }
    SECTION("a field edited and the line's hash recomputed")
    {
        tampered_copy(copy, c.lines, [](Lines& l) {
            auto r = parse(l[4]);
            REQUIRE(r);
            std::string body = r->body;
            body.replace(body.find("db-password"), 11, "other-value");
            l[4] = seal(body).text;
        });
        check_bad(copy, 6, "chain broken");
    }
    SECTION("whitespace added, hash recomputed over the old bytes")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { l[4].insert(l[4].find(",\"op\""), " "); });
        check_bad(copy, 5, "hash does not match");
    }
    SECTION("a line deleted")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { l.erase(l.begin() + 5); });
        check_bad(copy, 6, "deleted");
    }
    SECTION("the first line deleted")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { l.erase(l.begin()); });
        check_bad(copy, 1, "missing");
    }
    SECTION("two adjacent lines swapped")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { std::swap(l[4], l[5]); });
        check_bad(copy, 5, "reordered");
    }
    SECTION("a line duplicated")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { l.insert(l.begin() + 5, l[4]); });
        check_bad(copy, 6, "reordered");
    }
    SECTION("a line that is not a record")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { l[3] = "{\"hello\": 1"; });
        check_bad(copy, 4, "not a valid audit record");
    }
    SECTION("a signed record re-signed with another EC key")
    {
        ForeignKey other;
        const auto foreign = [&](std::span<const std::uint8_t, 32> d) { return other.sign(d); };
        tampered_copy(copy, c.lines, [&](Lines& l) { l[10] = resigned(l[10], foreign); });
        check_bad(copy, 11, "forged shutdown");
        tampered_copy(copy, c.lines, [&](Lines& l) { l[1] = resigned(l[1], foreign); });
        check_bad(copy, 2, "forged start");
        // The same re-signing with the token's own key is accepted: the
        // failure above is the key's, not the procedure's.
        const auto genuine = [&](std::span<const std::uint8_t, 32> d) {
            auto s = c.signing.keys->sign_digest(c.signing.key, d);
            REQUIRE(s);
            return *s;
        };
        tampered_copy(copy, c.lines, [&](Lines& l) { l[10] = resigned(l[10], genuine); });
        const VerifyReport rep = verify({copy}, c.signing.pem);
        INFO(joined(rep.problems));
        CHECK(rep.ok);
    }
    SECTION("a signed record with its signature removed")
    {
        tampered_copy(copy, c.lines, [&](Lines& l) {
            auto r = parse(l[10]);
            REQUIRE(r);
            l[10] = seal(r->body).text;
        });
        check_bad(copy, 11, "carries no signature");
    }
    SECTION("an op that does not exist")
    {
        tampered_copy(copy, c.lines, [](Lines& l) { l = forge(l, 4, [](json& f) { f["op"] = "note"; }); });
        check_bad(copy, 5, "unknown op 'note'");
    }
    SECTION("an ordinary record that carries a signature")
    {
        tampered_copy(copy, c.lines, [&](Lines& l) {
            auto r = parse(l[4]);
            REQUIRE(r);
            l[4] = seal(r->body, std::vector<std::uint8_t>(64, 1)).text;
        });
        check_bad(copy, 5, "cannot carry a signature");
    }
    SECTION("a torn last line is a warning, not tampering")
    {
        write_lines(copy, c.lines);
        std::ofstream(copy, std::ios::binary | std::ios::app) << c.lines[5].substr(0, c.lines[5].size() / 2);
        const VerifyReport rep = verify({copy}, c.signing.pem);
        INFO(joined(rep.problems));
        CHECK(rep.ok);
        CHECK(rep.records == 11);
        CHECK_THAT(joined(rep.warnings), Catch::Contains("torn"));
    }
    SECTION("a torn line inside the log is tampering")
    {
        const std::string first = c.dir / "first.jsonl";
        {
            std::ofstream out(first, std::ios::binary);
            for (std::size_t i = 0; i < 5; ++i)
                out << c.lines[i] << '\n';
            out << c.lines[5].substr(0, 40);
        }
        const std::string second = c.dir / "second.jsonl";
        write_lines(second, Lines(c.lines.begin() + 6, c.lines.end()));
        const VerifyReport rep = verify({first, second}, c.signing.pem);
        CHECK_FALSE(rep.ok);
        CHECK(rep.file == first);
        CHECK(rep.line == 6);
    }
}

// The forgery of issue 13 against a log with checkpoints every 5 records:
// keep the signed init, rewrite what follows without the token key.
TEST_CASE("a forger without the token key cannot rewrite the trail", "[audit][verify][tamper]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    const Caller alice{policy::Subject{1001, 1001, {}}, 4242};
    {
        auto log = create_and_open(signing, path, nullptr, Bound{5, 60});
        for (int i = 0; i < 6; ++i) {
            append_n(*log, 2);
            append_n(*log, 1, alice);
        }
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(path);
    REQUIRE(count_op(lines, "checkpoint") == 3);
    const VerifyReport clean = verify({path}, signing.pem);
    INFO(joined(clean.problems));
    REQUIRE(clean.ok);
    const std::string copy = dir / "forged.jsonl";

    SECTION("signed records turned into unsigned ones of another op, one user's records deleted")
    {
        Lines forged(lines.begin(), lines.begin() + 1);  // the signed init
        for (std::size_t i = 1; i < lines.size(); ++i) {
            const json f = fields(lines[i]);
            if (f["uid"] == 1001)
                continue;
            forged.push_back(lines[i]);
        }
        forged = forge(forged, 1, [](json& f) {
            if (is_signed_op(f["op"].get<std::string>()))
                f["op"] = "status";
        });
        write_lines(copy, forged);
        const VerifyReport rep = verify({copy}, signing.pem);
        INFO(joined(rep.problems));
        CHECK_FALSE(rep.ok);
        CHECK_THAT(rep.problem, Catch::Contains("more than 5 unsigned records"));
        CHECK_THAT(rep.problem, Catch::Contains("signature is missing"));
    }
    SECTION("a uid changed, everything after it re-chained; the next signature is left in place")
    {
        std::size_t at = 0;
        for (std::size_t i = 0; i < lines.size() && at == 0; ++i)
            if (fields(lines[i])["uid"] == 1001)
                at = i;
        REQUIRE(at > 0);
        Lines forged = forge(lines, at, [&](json& f) {
            if (f["uid"] == 1001)
                f["uid"] = 0;
        });
        write_lines(copy, forged);
        const VerifyReport rep = verify({copy}, signing.pem);
        CHECK_FALSE(rep.ok);
        // The first signed record after the edit no longer verifies: its body
        // names the old chain.
        CHECK_THAT(joined(rep.problems), Catch::Contains("carries no signature"));
    }
    SECTION("the tail after the last signature rewritten, within the bound, is only caught by the anchor")
    {
        // Documented limit: without the database anchor, the records after the
        // last signature (at most the bound) can be rewritten.
        const std::size_t last_signed = lines.size() - 1;  // shutdown
        REQUIRE(op_of(lines[last_signed]) == "shutdown");
        Lines cut(lines.begin(), lines.begin() + static_cast<std::ptrdiff_t>(last_signed));
        // Now the tail after the last checkpoint is unsigned; rewrite it.
        std::size_t last_cp = 0;
        for (std::size_t i = 0; i < cut.size(); ++i)
            if (parse(cut[i])->is_signed())
                last_cp = i;
        REQUIRE(last_cp + 1 < cut.size());
        cut = forge(cut, last_cp + 1, [](json& f) { f["uid"] = 0; });
        write_lines(copy, cut);
        const VerifyReport rep = verify({copy}, signing.pem);
        INFO(joined(rep.problems));
        CHECK(rep.ok);
        CHECK(rep.unsigned_tail == cut.size() - 1 - last_cp);
        CHECK(rep.unsigned_tail <= 5);
        CHECK_THAT(joined(rep.warnings), Catch::Contains("does not end with a shutdown"));
    }
}

TEST_CASE("a slice whose first signed record is forged, its hash redone and its old signature kept, is refused by "
          "verify --slice and by the check at start",
          "[audit][verify][tamper]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    {
        auto log = create_and_open(signing, path, nullptr, Bound{5, 60});
        append_n(*log, 2);
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(path);
    auto init = parse(lines[0]);
    REQUIRE(init);
    REQUIRE(init->is_signed());
    // As it was, one record is a slice that verifies: signed at both ends.
    const std::string honest = dir / "honest.jsonl";
    write_lines(honest, {lines[0]});
    VerifyOptions as_slice;
    as_slice.slice = true;
    const VerifyReport ok = verify({honest}, signing.pem, as_slice);
    INFO(joined(ok.problems));
    REQUIRE(ok.ok);
    // Its time moved, its body hashed again, the signature of the old body kept.
    json f = init->fields;
    f["time"] = "2000-01-01T00:00:00.000000Z";
    const SealedLine forged = seal(body_of(f), init->sig);
    REQUIRE(parse(forged.text));  // a well-formed record: only its signature can tell
    const std::string copy = dir / "forged.jsonl";
    write_lines(copy, {forged.text});
    const VerifyReport rep = verify({copy}, signing.pem, as_slice);
    INFO(joined(rep.problems));
    CHECK_FALSE(rep.ok);
    CHECK_THAT(rep.problem, Catch::Contains("signature"));
    // The daemon's check before it appends to a file starts at its last
    // signed record, the same way.
    const VerifyReport start = verify_tail(copy, {forged.text}, 1, signing.pem, VerifyOptions{});
    INFO(joined(start.problems));
    CHECK_FALSE(start.ok);
    CHECK_THAT(start.problem, Catch::Contains("signature"));
}

TEST_CASE("an unsigned tail longer than the bound fails, the daemon running or not", "[audit][verify]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    {
        auto log = create_and_open(signing, path, nullptr, Bound{5, 60});
        append_n(*log, 3);
    }  // no close: a crash leaves an unsigned tail of 3
    Lines lines = read_lines(path);
    const VerifyReport crash = verify({path}, signing.pem);
    INFO(joined(crash.problems));
    CHECK(crash.ok);
    CHECK(crash.unsigned_tail == 3);

    // The same tail grown past the bound: a checkpoint is missing.
    for (int i = 0; i < 4; ++i)
        lines.push_back(lines.back());
    lines = forge(lines, lines.size() - 4);
    const std::string copy = dir / "long-tail.jsonl";
    write_lines(copy, lines);
    const VerifyReport dead = verify({copy}, signing.pem);
    CHECK_FALSE(dead.ok);
    CHECK_THAT(dead.problem, Catch::Contains("unsigned tail"));
    CHECK(dead.unsigned_tail == 7);
}

TEST_CASE("unsigned records spanning more seconds than the bound fail", "[audit][verify]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    TestClock clock;
    {
        auto log = create_and_open(signing, path, nullptr, Bound{100, 10}, clock.fn());
        append_n(*log, 2);
        clock.advance_seconds(4);
        append_n(*log, 2);
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(path);
    REQUIRE(verify({path}, signing.pem).ok);
    // Push the third get 30 s later, as if the checkpoint that was due had
    // been removed and the records re-dated.
    const std::string copy = dir / "wide.jsonl";
    write_lines(copy, forge(lines, 4, [](json& f) {
                    if (f["op"] == "get")
                        f["time"] = time_text(*parse_time(f["time"].get<std::string>()) + 30'000'000);
                }));
    const VerifyReport rep = verify({copy}, signing.pem);
    CHECK_FALSE(rep.ok);
    CHECK_THAT(joined(rep.problems), Catch::Contains("spanning 10 s"));
}

TEST_CASE("the database anchor: signed, reached, and not behind the file's end", "[audit][verify][anchor]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto store = Store::open(dir / "vault.db", Store::Mode::create);
    REQUIRE(store);
    {
        auto log = create_and_open(signing, path, store->get());
        append_n(*log, 8);
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(path);
    auto anchor = (*store)->audit_anchor();
    REQUIRE(anchor);
    REQUIRE(*anchor);
    CHECK((*anchor)->seq == parse(lines.back())->seq);
    CHECK((*anchor)->hash == parse(lines.back())->hash);
    CHECK((*anchor)->clean_shutdown);
    CHECK_FALSE((*anchor)->sig.empty());

    VerifyOptions with;
    with.anchor = **anchor;
    with.anchor_expected = true;
    const VerifyReport whole = verify({path}, signing.pem, with);
    INFO(joined(whole.problems));
    CHECK(whole.ok);
    CHECK(whole.anchor_reached);
    CHECK(whole.warnings.empty());

    const auto cut = tampered_copy(dir / "cut.jsonl", lines, [](Lines& l) { l.resize(l.size() - 3); });
    const VerifyReport truncated = verify({cut}, signing.pem, with);
    CHECK_FALSE(truncated.ok);
    CHECK_THAT(truncated.problem, Catch::Contains("tail truncated"));
    CHECK_THAT(truncated.problem, Catch::Contains(std::to_string((*anchor)->seq)));
    // Without the anchor the cut copy looks like a log still being written.
    const VerifyReport without = verify({cut}, signing.pem);
    CHECK(without.ok);

    SECTION("an anchor edited to match a cut file fails its signature")
    {
        VerifyOptions edited = with;
        auto r = parse(read_lines(cut).back());
        edited.anchor->seq = r->seq;
        edited.anchor->hash = r->hash;
        const VerifyReport rep = verify({cut}, signing.pem, edited);
        CHECK_FALSE(rep.ok);
        CHECK_THAT(rep.problem, Catch::Contains("anchor's signature does not verify"));
    }
    SECTION("an unsigned anchor fails")
    {
        VerifyOptions bare = with;
        bare.anchor->sig.clear();
        const VerifyReport rep = verify({path}, signing.pem, bare);
        CHECK_FALSE(rep.ok);
        CHECK_THAT(rep.problem, Catch::Contains("anchor is not signed"));
    }
    SECTION("an anchor whose hash differs from its record")
    {
        VerifyOptions other = with;
        other.anchor->hash = std::string(64, 'a');
        const VerifyReport rep = verify({path}, signing.pem, other);
        CHECK_FALSE(rep.ok);
        CHECK_THAT(joined(rep.problems), Catch::Contains("differs from the one anchored"));
    }
    SECTION("a state whose anchor was deleted")
    {
        VerifyOptions none;
        none.anchor_expected = true;
        const VerifyReport rep = verify({path}, signing.pem, none);
        CHECK_FALSE(rep.ok);
        CHECK_THAT(rep.problem, Catch::Contains("no audit anchor"));
    }
}

TEST_CASE("rotated files verify together and a missing one is named", "[audit][verify]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    const std::string one = path + ".1";
    const std::string two = path + ".2";
    auto log = create_and_open(signing, path);
    append_n(*log, 3);

    // logrotate: move the file away, then SIGHUP.
    REQUIRE(::rename(path.c_str(), one.c_str()) == 0);
    log->request_reopen();
    append_n(*log, 3);
    {
        const Lines old = read_lines(one);
        CHECK(op_of(old.back()) == "checkpoint");  // the old file ends covered
        const Lines fresh = read_lines(path);
        REQUIRE(fresh.size() == 4);
        CHECK(op_of(fresh[0]) == "rotate");
        CHECK(parse(fresh[0])->is_signed());
        CHECK(parse(fresh[0])->prev == parse(old.back())->hash);
        const VerifyReport rep = verify({one, path}, signing.pem);
        INFO(joined(rep.problems));
        CHECK(rep.ok);
        CHECK(rep.records == old.size() + fresh.size());
        // The rotated file alone: all of it is signed over.
        const VerifyReport alone = verify({one}, signing.pem);
        CHECK(alone.ok);
        CHECK(alone.unsigned_tail == 0);
    }

    REQUIRE(::rename(one.c_str(), two.c_str()) == 0);
    REQUIRE(::rename(path.c_str(), one.c_str()) == 0);
    log->request_reopen();
    append_n(*log, 2);
    REQUIRE(log->close());

    const VerifyReport all = verify({two, one, path}, signing.pem);
    INFO(joined(all.problems));
    CHECK(all.ok);
    CHECK(all.records == read_lines(two).size() + read_lines(one).size() + read_lines(path).size());

    const VerifyReport gap = verify({two, path}, signing.pem);
    CHECK_FALSE(gap.ok);
    CHECK(gap.file == path);
    CHECK(gap.line == 1);
    CHECK_THAT(gap.problem, Catch::Contains("missing from the rotation"));
    CHECK_FALSE(verify({one, two, path}, signing.pem).ok);

    const VerifyReport newest = verify({path}, signing.pem);
    CHECK(newest.ok);
    CHECK_THAT(joined(newest.warnings), Catch::Contains("rotation"));
}

TEST_CASE("a signed record's count of the records before it must match the log", "[audit][verify]")
{
    ClosedLog c;
    // Signed by the token itself, but counting one record too many: only a
    // writer bug could do this; verify says so.
    auto r = parse(c.lines.back());
    REQUIRE(r);
    std::string body = r->body;
    const std::string records = "\"records\":" + std::to_string(*r->count("records"));
    body.replace(body.find(records), records.size(), "\"records\":" + std::to_string(*r->count("records") + 1));
    auto sig = c.signing.keys->sign_digest(c.signing.key, body_digest(body));
    REQUIRE(sig);
    const std::string copy = c.dir / "miscounted.jsonl";
    tampered_copy(copy, c.lines, [&](Lines& l) { l.back() = seal(body, *sig).text; });
    const VerifyReport rep = verify({copy}, c.signing.pem);
    CHECK_FALSE(rep.ok);
    CHECK(rep.line == 11);
    CHECK_THAT(rep.problem, Catch::Contains("counts 9 records"));
}

TEST_CASE("the anchor names where its file begins: a file put together from others is caught", "[audit][verify][anchor]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto store = Store::open(dir / "vault.db", Store::Mode::create);
    REQUIRE(store);
    auto log = create_and_open(signing, path, store->get());
    append_n(*log, 2);
    REQUIRE(::rename(path.c_str(), (path + ".1").c_str()) == 0);
    log->request_reopen();
    append_n(*log, 2);
    REQUIRE(log->close());
    auto anchor = (*store)->audit_anchor();
    REQUIRE(anchor);
    REQUIRE(*anchor);
    VerifyOptions with;
    with.anchor = **anchor;
    with.anchor_expected = true;
    REQUIRE(verify_files({path + ".1", path}, signing.pem, with).ok);
    // One file holding both: every link holds, but it does not begin where
    // the anchored file began.
    Lines joined_lines = read_lines(path + ".1");
    for (const auto& l : read_lines(path))
        joined_lines.push_back(l);
    write_lines(path, joined_lines);
    const VerifyReport rep = verify_files({path}, signing.pem, with);
    CHECK_FALSE(rep.ok);
    CHECK_THAT(joined(rep.problems), Catch::Contains("replaced or cut from the front"));
}

}  // namespace
}  // namespace vaultfs::vault::audit
