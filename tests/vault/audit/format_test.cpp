// Unit tests for vault/audit/format: the bytes of a record, its hash over
// exactly those bytes, and parsing that refuses anything else.
#include "vault/audit/format.hpp"

#include <catch2/catch.hpp>

#include "tests/vault/audit/audit_support.hpp"

namespace vaultfs::vault::audit {
namespace {

using testing::json;

std::string sample_body()
{
    Body b;
    b.number("seq", 7)
        .text("time", "2026-11-28T13:36:11.123456Z")
        .text("op", "get")
        .text("vault", "payments")
        .text("secret", "")
        .number("version", std::nullopt)
        .integer("pid", -1)
        .boolean("clean", true)
        .text("reason", "the \"policy\" says no \xc3\xa9 \xff")
        .text("prev", genesis_hash());
    return std::move(b).finish();
}

TEST_CASE("a body is one JSON object, fields in the order written, strings escaped", "[audit][format]")
{
    const std::string body = sample_body();
    CHECK(body.rfind("{\"seq\":7,\"time\":\"2026-11-28T13:36:11.123456Z\",\"op\":\"get\",\"vault\":\"payments\","
                     "\"secret\":null,\"version\":null,\"pid\":-1,\"clean\":true,",
                     0) == 0);
    const json j = json::parse(body);
    CHECK(j["reason"] == "the \"policy\" says no \xc3\xa9 \xef\xbf\xbd");  // invalid UTF-8 replaced
    CHECK(j["prev"] == genesis_hash());
}

TEST_CASE("seal and parse: the hash is over the body's bytes, the signature over the hash", "[audit][format]")
{
    const std::string body = sample_body();
    const SealedLine unsigned_line = seal(body);
    CHECK(unsigned_line.hash == sha256_hex(body));
    CHECK(unsigned_line.text == body.substr(0, body.size() - 1) + ",\"hash\":\"" + unsigned_line.hash + "\"}");
    CHECK_FALSE(looks_signed(unsigned_line.text));
    auto r = parse(unsigned_line.text);
    REQUIRE(r);
    CHECK(r->body == body);
    CHECK(r->hash == unsigned_line.hash);
    CHECK_FALSE(r->is_signed());
    CHECK(r->seq == 7);
    CHECK(r->op == "get");
    CHECK(r->time == *parse_time("2026-11-28T13:36:11.123456Z"));
    // The whole line is JSON too, for jq and friends.
    CHECK(json::parse(unsigned_line.text)["hash"] == unsigned_line.hash);

    const std::vector<std::uint8_t> sig(64, 0xab);
    const SealedLine signed_line = seal(body, sig);
    CHECK(looks_signed(signed_line.text));
    auto s = parse(signed_line.text);
    REQUIRE(s);
    CHECK(s->sig == sig);
    CHECK(s->hash == unsigned_line.hash);
    CHECK(s->body == body);
}

TEST_CASE("any change to the bytes fails, whitespace and key order included", "[audit][format]")
{
    const std::string line = seal(sample_body()).text;
    REQUIRE(parse(line));
    const auto fails = [](const std::string& edited) {
        auto r = parse(edited);
        INFO(edited);
        CHECK_FALSE(r);
        return r ? std::string() : r.error();
    };
    std::string spaced = line;
    spaced.insert(spaced.find(",\"op\""), " ");
    CHECK_THAT(fails(spaced), Catch::Contains("hash does not match"));

    std::string reordered = line;
    const std::string seq = "\"seq\":7,";
    reordered.erase(1, seq.size());
    reordered.insert(reordered.find("\"prev\""), seq);
    CHECK_THAT(fails(reordered), Catch::Contains("hash does not match"));

    // The same record re-serialised by a JSON library is not the record.
    const std::string redumped = json::parse(line).dump();
    CHECK(json::parse(redumped) == json::parse(line));
    fails(redumped);

    std::string value = line;
    value.replace(value.find("payments"), 8, "paymentz");
    CHECK_THAT(fails(value), Catch::Contains("hash does not match"));

    CHECK_THAT(fails(line.substr(0, line.size() - 1)), Catch::Contains("not a valid audit record"));
    CHECK_THAT(fails("{\"hello\":1}"), Catch::Contains("not a valid audit record"));
    CHECK_THAT(fails(""), Catch::Contains("not a valid audit record"));

    // A body that carries a hash of its own is not a record, even when the
    // outer hash matches it.
    Body twice;
    twice.number("seq", 1).text("time", time_text(0)).text("op", "get").text("hash", "x").text("prev", genesis_hash());
    CHECK_THAT(fails(seal(std::move(twice).finish()).text), Catch::Contains("second hash"));

    // Required fields.
    Body no_seq;
    no_seq.text("time", time_text(0)).text("op", "get").text("prev", genesis_hash());
    CHECK_THAT(fails(seal(std::move(no_seq).finish()).text), Catch::Contains("seq, time, op or prev"));
}

TEST_CASE("times are written and read back to the microsecond", "[audit][format]")
{
    for (const Micros t : {Micros{0}, Micros{1'800'000'000'123'456}, Micros{951'782'400'000'001}}) {
        const std::string text = time_text(t);
        CHECK(text.size() == 27);
        CHECK(parse_time(text) == t);
    }
    CHECK_FALSE(parse_time("2026-11-28T13:36:11Z"));
    CHECK_FALSE(parse_time("2026-13-28T13:36:11.123456Z"));
    CHECK_FALSE(parse_time("2026-11-28 13:36:11.123456Z"));
}

TEST_CASE("known and signed ops", "[audit][format]")
{
    for (const char* op : {"init", "start", "checkpoint", "rotate", "shutdown"}) {
        CHECK(is_signed_op(op));
        CHECK(is_known_op(op));
    }
    for (const char* op : {"get", "commit", "lookup", "repeats", "policy_reset", "control"}) {
        CHECK(is_known_op(op));
        CHECK_FALSE(is_signed_op(op));
    }
    CHECK_FALSE(is_known_op("note"));
    CHECK_FALSE(is_known_op(""));
}

TEST_CASE("the anchor digest covers every field of the anchor", "[audit][format]")
{
    const AuditAnchor a{12, std::string(64, 'a'), true, 99, 3, {}};
    const auto d = anchor_digest(a);
    AuditAnchor b = a;
    b.seq = 13;
    CHECK(anchor_digest(b) != d);
    b = a;
    b.hash[3] = 'b';
    CHECK(anchor_digest(b) != d);
    b = a;
    b.clean_shutdown = false;
    CHECK(anchor_digest(b) != d);
    b = a;
    b.time = 100;
    CHECK(anchor_digest(b) != d);
    b = a;
    b.file_start = 4;
    CHECK(anchor_digest(b) != d);
    b = a;
    b.sig = {1, 2, 3};
    CHECK(anchor_digest(b) == d);
}

}  // namespace
}  // namespace vaultfs::vault::audit
