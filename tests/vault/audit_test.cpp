// Unit tests for the audit log (vault/audit): what the writer puts in the
// file, and what verify_audit says about copies of it that were edited,
// cut, reordered, forged or rotated; the database anchor that catches a
// cut-off tail; signed checkpoints; and failing closed when the disk is full
// (a real tmpfs of 64 KiB mounted for the test).
//
// Signatures come from a real SoftHSM2 token (one at a time per process).
#include "vault/audit.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/support/temp_token.hpp"
#include "tests/support/small_tmpfs.hpp"
#include "vault/audit_format.hpp"
#include "vault/store.hpp"

namespace vaultfs::vault {
namespace {

using testing::TempDir;
using testing::TempToken;
using json = nlohmann::json;
using Lines = std::vector<std::string>;

const Caller root{policy::Subject{0, 0, {}}, 1};
const Caller user{policy::Subject{1000, 1000, {}}, 1};

// The token and its audit signing key, with the public half as PEM.
struct Signing {
    Signing()
    {
        auto k = token.open();
        if (!k)
            FAIL("cannot log in to the test token: " << k.error().message);
        keys = std::move(*k);
        auto id = keys->create_signing_key("vaultfs-audit");
        REQUIRE(id);
        key = *id;
        auto point = keys->public_point(key);
        REQUIRE(point);
        auto p = p256_public_key_pem(*point);
        REQUIRE(p);
        pem = *p;
    }
    AuditSigner signer() { return AuditSigner{keys.get(), key}; }

    TempToken token;
    std::unique_ptr<hsm::Pkcs11KeyService> keys;
    hsm::KeyId key;
    std::string pem;
};

AuditLog::Options options_for(const std::string& path, std::uint64_t checkpoint_records = 1000)
{
    AuditLog::Options o;
    o.path = path;
    o.checkpoint_records = checkpoint_records;
    return o;
}

std::unique_ptr<AuditLog> create_and_open(Signing& signing, const std::string& path, Store* anchor = nullptr,
                                          std::uint64_t checkpoint_records = 1000)
{
    auto created = AuditLog::create(path, signing.signer());
    if (!created)
        FAIL("AuditLog::create failed: " << created.error().message);
    auto log = AuditLog::open(options_for(path, checkpoint_records), signing.signer(), anchor);
    if (!log)
        FAIL("AuditLog::open failed: " << log.error().message);
    return std::move(*log);
}

AuditEvent get_event(const Caller& who = root, std::string_view secret = "db-password")
{
    return AuditEvent{.op = "get",
                      .caller = &who,
                      .vault = "payments",
                      .secret = secret,
                      .version = 1,
                      .allowed = true,
                      .rule = "1: allow uid:0 *",
                      .result = "ok",
                      .bytes = 7};
}

void append_n(AuditLog& log, int n, const Caller& who = root)
{
    for (int i = 0; i < n; ++i) {
        auto r = log.append(get_event(who));
        if (!r)
            FAIL("append " << i << " failed: " << r.error().message);
    }
}

Lines read_lines(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    Lines lines;
    std::string line;
    while (std::getline(in, line))
        lines.push_back(line);
    return lines;
}

void write_lines(const std::string& path, const Lines& lines)
{
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    for (const auto& l : lines)
        out << l << '\n';
}

std::string read_all(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// A copy of `lines` at `path`, changed by `edit`.
template <class Edit>
std::string tampered_copy(const std::string& path, Lines lines, Edit&& edit)
{
    edit(lines);
    write_lines(path, lines);
    return path;
}

VerifyReport verify(const std::vector<std::string>& files, const std::string& pem,
                    const std::optional<AuditAnchor>& anchor = std::nullopt)
{
    return verify_audit(files, pem, anchor);
}

std::string joined(const std::vector<std::string>& v)
{
    std::string s;
    for (const auto& w : v)
        s += w + "\n";
    return s;
}

std::size_t count_signed(const Lines& lines)
{
    std::size_t n = 0;
    for (const auto& l : lines)
        n += json::parse(l).contains("sig") ? 1 : 0;
    return n;
}

// ECDSA P-256 by a key that is not the token's, as r | s.
class ForeignKey {
public:
    ForeignKey() : key_(EVP_EC_gen("P-256")) { REQUIRE(key_ != nullptr); }
    ~ForeignKey() { EVP_PKEY_free(key_); }
    ForeignKey(const ForeignKey&) = delete;
    ForeignKey& operator=(const ForeignKey&) = delete;

    hsm::Result<std::vector<std::uint8_t>> sign(std::span<const std::uint8_t, 32> digest) const
    {
        EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key_, nullptr);
        std::vector<std::uint8_t> der(128);
        std::size_t len = der.size();
        const bool ok = ctx != nullptr && EVP_PKEY_sign_init(ctx) == 1 &&
                        EVP_PKEY_sign(ctx, der.data(), &len, digest.data(), digest.size()) == 1;
        EVP_PKEY_CTX_free(ctx);
        if (!ok)
            return hsm::fail(hsm::Errc::device_error, "OpenSSL signing failed");
        const unsigned char* p = der.data();
        ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(len));
        if (sig == nullptr)
            return hsm::fail(hsm::Errc::device_error, "bad DER signature");
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

// Re-seals one line: optionally edits the record, then signs it with
// `sign` (or leaves it unsigned) and recomputes its hash.
std::string resealed(const std::string& line, const SignDigest& sign, void (*edit)(json&) = nullptr)
{
    json r = json::parse(line);
    if (edit != nullptr)
        edit(r);
    auto sealed = seal_record(r, sign);
    REQUIRE(sealed);
    return sealed->line;
}

// ---- what the writer writes -------------------------------------------------------

TEST_CASE("create writes a signed init record; open adds a signed start record", "[audit]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    REQUIRE(AuditLog::create(path, signing.signer()));
    struct stat st{};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);

    const Lines one = read_lines(path);
    REQUIRE(one.size() == 1);
    const json init = json::parse(one[0]);
    CHECK(init["op"] == "init");
    CHECK(init["seq"] == 1);
    CHECK(init["prev"] == genesis_hash());
    REQUIRE(init.contains("sig"));

    // The signature is the token's, over the record without hash and sig.
    {
        json unsigned_part = init;
        unsigned_part.erase("hash");
        unsigned_part.erase("sig");
        const auto sig = from_hex(init["sig"].get<std::string>());
        REQUIRE(sig);
        const P256Verifier verifier(signing.pem);
        REQUIRE(verifier.usable());
        CHECK(verifier.verify(sha256(canonical(unsigned_part)), *sig));
        json without_hash = init;
        without_hash.erase("hash");
        CHECK(init["hash"] == sha256_hex(canonical(without_hash)));
    }

    // create never overwrites.
    auto again = AuditLog::create(path, signing.signer());
    REQUIRE_FALSE(again);
    CHECK(again.error().code == Errc::audit_unavailable);
    CHECK_THAT(again.error().message, Catch::Contains(path));
    CHECK(read_lines(path) == one);

    {
        auto log = AuditLog::open(options_for(path), signing.signer(), nullptr);
        REQUIRE(log);
        CHECK((*log)->healthy());
        CHECK((*log)->last_seq() == 2);
    }
    const Lines two = read_lines(path);
    REQUIRE(two.size() == 2);
    const json start = json::parse(two[1]);
    CHECK(start["op"] == "start");
    CHECK(start["seq"] == 2);
    CHECK(start["prev"] == init["hash"]);
    CHECK(start.contains("sig"));
    CHECK(start["clean"] == false);  // no anchor says the last stop was clean

    auto missing = AuditLog::open(options_for(dir / "absent.jsonl"), signing.signer(), nullptr);
    REQUIRE_FALSE(missing);
    CHECK(missing.error().code == Errc::audit_unavailable);
    CHECK_THAT(missing.error().message, Catch::Contains("absent.jsonl"));
}

TEST_CASE("the token's signing key verifies through p256_public_key_pem", "[audit]")
{
    Signing signing;
    const P256Verifier verifier(signing.pem);
    REQUIRE(verifier.usable());
    CHECK_THAT(signing.pem, Catch::StartsWith("-----BEGIN PUBLIC KEY-----"));
    const auto digest = sha256("the chain head");
    auto sig = signing.keys->sign_digest(signing.key, digest);
    REQUIRE(sig);
    REQUIRE(sig->size() == 64);
    CHECK(verifier.verify(digest, *sig));
    CHECK_FALSE(verifier.verify(sha256("another chain head"), *sig));
    auto bent = *sig;
    bent[40] ^= 0x04;
    CHECK_FALSE(verifier.verify(digest, bent));

    ForeignKey other;
    auto foreign = other.sign(digest);
    REQUIRE(foreign);
    CHECK_FALSE(verifier.verify(digest, *foreign));

    auto bad_point = p256_public_key_pem(std::vector<std::uint8_t>(65, 0x04));
    CHECK_FALSE(bad_point);
}

TEST_CASE("appended records form a chain that verifies", "[audit]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto log = create_and_open(signing, path);
    append_n(*log, 10);
    // A record the fast renderer does not handle (quotes, a non-ASCII name)
    // goes through the JSON path and still verifies.
    REQUIRE(log->append(AuditEvent{.op = "set",
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
        const json r = json::parse(lines[i]);
        CHECK(r["seq"] == i + 1);
        if (i > 0)
            CHECK(r["prev"] == json::parse(lines[i - 1])["hash"]);
        for (const char* field : {"time", "op", "vault", "secret", "version", "uid", "gid", "pid", "exe", "decision",
                                  "rule", "result", "bytes", "prev", "hash"})
            CHECK(r.contains(field));
    }
    const json get = json::parse(lines[2]);
    CHECK(get["op"] == "get");
    CHECK(get["vault"] == "payments");
    CHECK(get["secret"] == "db-password");
    CHECK(get["version"] == 1);
    CHECK(get["uid"] == 0);
    CHECK(get["decision"] == "allow");
    CHECK(get["bytes"] == 7);
    CHECK(get["time"].get<std::string>().back() == 'Z');
    const json set = json::parse(lines[12]);
    CHECK(set["decision"] == "deny");
    CHECK(set["uid"] == 1000);
    CHECK(set["reason"] == "the \"policy\" says no \xc3\xa9");

    const VerifyReport rep = verify({path}, signing.pem);
    INFO(rep.problem);
    CHECK(rep.ok);
    CHECK(rep.records == 13);
    CHECK(rep.checkpoints == count_signed(lines));
    CHECK(rep.checkpoints == 2);  // init and start
    // Without the database the verifier cannot tell a running log from a cut one.
    CHECK_THAT(joined(rep.warnings), Catch::Contains("shutdown"));

    // Another key's public half: the first signed record is called forged.
    ForeignKey other;
    const VerifyReport wrong_key = verify({path}, other.pem());
    CHECK_FALSE(wrong_key.ok);
    CHECK(wrong_key.line == 1);
    CHECK_THAT(wrong_key.problem, Catch::Contains("forged init record"));
    // Something that is not a key at all.
    const VerifyReport no_key = verify({path}, "not a key");
    CHECK_FALSE(no_key.ok);
    CHECK_THAT(no_key.problem, Catch::Contains("public key"));
}

// ---- what verify finds in tampered copies ------------------------------------------------

TEST_CASE("verify names the first bad line of an edited, cut, reordered or forged copy", "[audit][tamper]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    {
        auto log = create_and_open(signing, path);
        append_n(*log, 8);
        REQUIRE(log->close());
    }
    const Lines lines = read_lines(path);
    REQUIRE(lines.size() == 11);  // init, start, 8 records, shutdown
    REQUIRE(json::parse(lines[10])["op"] == "shutdown");
    REQUIRE(verify({path}, signing.pem).ok);

    const auto check_bad = [&](const std::string& copy, std::uint64_t line, const std::string& word) {
        const VerifyReport rep = verify({copy}, signing.pem);
        INFO("problem: " << rep.problem);
        CHECK_FALSE(rep.ok);
        CHECK(rep.file == copy);
        CHECK(rep.line == line);
        CHECK_THAT(rep.problem, Catch::Contains(word));
    };

    SECTION("a field edited in one line")
    {
        const auto copy = tampered_copy(dir / "edited.jsonl", lines, [](Lines& l) {
            const auto at = l[4].find("\"uid\":0");
            REQUIRE(at != std::string::npos);
            l[4].replace(at, 7, "\"uid\":1");
        });
        check_bad(copy, 5, "edited");
    }
    SECTION("a field edited and the line's hash recomputed")
    {
        const auto copy = tampered_copy(dir / "rehashed.jsonl", lines, [](Lines& l) {
            l[4] = resealed(l[4], SignDigest{}, [](json& r) { r["secret"] = "other-secret"; });
        });
        // The line itself is consistent; the next one no longer links to it.
        check_bad(copy, 6, "chain broken");
        check_bad(copy, 6, "edited");
    }
    SECTION("a line deleted")
    {
        const auto copy = tampered_copy(dir / "deleted.jsonl", lines, [](Lines& l) { l.erase(l.begin() + 5); });
        check_bad(copy, 6, "deleted");
    }
    SECTION("the first line deleted")
    {
        const auto copy = tampered_copy(dir / "headless.jsonl", lines, [](Lines& l) { l.erase(l.begin()); });
        check_bad(copy, 1, "missing");
    }
    SECTION("two adjacent lines swapped")
    {
        const auto copy = tampered_copy(dir / "swapped.jsonl", lines, [](Lines& l) { std::swap(l[4], l[5]); });
        check_bad(copy, 5, "reordered");
    }
    SECTION("a line duplicated")
    {
        const auto copy = tampered_copy(dir / "dup.jsonl", lines, [](Lines& l) { l.insert(l.begin() + 5, l[4]); });
        check_bad(copy, 6, "reordered");
    }
    SECTION("a line that is not a record")
    {
        const auto copy = tampered_copy(dir / "junk.jsonl", lines, [](Lines& l) { l[3] = "{\"hello\": 1"; });
        check_bad(copy, 4, "edited");
    }
    SECTION("a signed record re-signed with another EC key")
    {
        ForeignKey other;
        const SignDigest foreign = [&](std::span<const std::uint8_t, 32> d) { return other.sign(d); };
        const auto last = tampered_copy(dir / "forged-last.jsonl", lines,
                                        [&](Lines& l) { l[10] = resealed(l[10], foreign); });
        check_bad(last, 11, "forged");
        // In the middle: the forged record is named, not the one after it.
        const auto middle = tampered_copy(dir / "forged-start.jsonl", lines,
                                          [&](Lines& l) { l[1] = resealed(l[1], foreign); });
        check_bad(middle, 2, "forged");
        // The same re-sealing with the token's own key is accepted: the
        // failure above is the key's, not the procedure's.
        const SignDigest genuine = [&](std::span<const std::uint8_t, 32> d) {
            return signing.keys->sign_digest(signing.key, d);
        };
        const auto resigned =
            tampered_copy(dir / "resigned.jsonl", lines, [&](Lines& l) { l[10] = resealed(l[10], genuine); });
        const VerifyReport rep = verify({resigned}, signing.pem);
        INFO(rep.problem);
        CHECK(rep.ok);
    }
    SECTION("a signed record with its signature removed")
    {
        const auto copy = tampered_copy(dir / "unsigned.jsonl", lines,
                                        [&](Lines& l) { l[10] = resealed(l[10], SignDigest{}); });
        check_bad(copy, 11, "no signature");
    }
    SECTION("a torn last line is a warning, not tampering")
    {
        const std::string copy = dir / "torn.jsonl";
        write_lines(copy, lines);
        {
            std::ofstream out(copy, std::ios::binary | std::ios::app);
            out << lines[5].substr(0, lines[5].size() / 2);
        }
        const VerifyReport rep = verify({copy}, signing.pem);
        INFO(rep.problem);
        CHECK(rep.ok);
        CHECK(rep.records == 11);
        CHECK_THAT(joined(rep.warnings), Catch::Contains("torn"));
    }
    SECTION("a torn line inside the log is tampering")
    {
        const std::string first = dir / "first.jsonl";
        {
            std::ofstream out(first, std::ios::binary);
            for (std::size_t i = 0; i < 5; ++i)
                out << lines[i] << '\n';
            out << lines[5].substr(0, 40);
        }
        const std::string second = dir / "second.jsonl";
        write_lines(second, Lines(lines.begin() + 6, lines.end()));
        const VerifyReport rep = verify({first, second}, signing.pem);
        CHECK_FALSE(rep.ok);
        CHECK(rep.file == first);
        CHECK(rep.line == 6);
    }
}

TEST_CASE("a cut-off tail is caught with the anchor in the database", "[audit][tamper]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    auto store = Store::open(dir / "vault.db", Store::Mode::create);
    REQUIRE(store);
    {
        auto log = create_and_open(signing, path, store->get());
        append_n(*log, 8);
        REQUIRE(log->close());  // the shutdown record is anchored
    }
    const Lines lines = read_lines(path);
    REQUIRE(lines.size() == 11);
    auto anchor = (*store)->audit_anchor();
    REQUIRE(anchor);
    REQUIRE(*anchor);
    const json last = json::parse(lines.back());
    CHECK(last["op"] == "shutdown");
    CHECK((*anchor)->seq == last["seq"].get<std::uint64_t>());
    CHECK((*anchor)->hash == last["hash"].get<std::string>());
    CHECK((*anchor)->clean_shutdown);

    const VerifyReport whole = verify({path}, signing.pem, **anchor);
    INFO(whole.problem);
    CHECK(whole.ok);
    CHECK(whole.warnings.empty());

    const auto cut = tampered_copy(dir / "cut.jsonl", lines, [](Lines& l) { l.resize(l.size() - 3); });
    const VerifyReport with_anchor = verify({cut}, signing.pem, **anchor);
    CHECK_FALSE(with_anchor.ok);
    CHECK(with_anchor.file == cut);
    CHECK_THAT(with_anchor.problem, Catch::Contains("truncated"));
    CHECK_THAT(with_anchor.problem, Catch::Contains(std::to_string((*anchor)->seq)));

    // Without the anchor the cut copy looks like a log still being written.
    const VerifyReport without = verify({cut}, signing.pem);
    CHECK(without.ok);
    CHECK_FALSE(without.warnings.empty());

    // An anchor whose hash differs from the record at its seq.
    AuditAnchor other = **anchor;
    other.hash = std::string(64, 'a');
    const VerifyReport mismatch = verify({path}, signing.pem, other);
    CHECK_FALSE(mismatch.ok);
    CHECK(mismatch.line == lines.size());
    CHECK_THAT(mismatch.problem, Catch::Contains("anchored"));

    // The next start says the previous stop was clean.
    {
        auto log = AuditLog::open(options_for(path), signing.signer(), store->get());
        REQUIRE(log);
    }
    const json start = json::parse(read_lines(path).back());
    CHECK(start["op"] == "start");
    CHECK(start["clean"] == true);
}

// ---- rotation ---------------------------------------------------------------------------

TEST_CASE("rotated files verify together and a missing one is named", "[audit]")
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
    REQUIRE(std::filesystem::exists(path));
    {
        const Lines fresh = read_lines(path);
        REQUIRE(fresh.size() == 4);
        const json rotate = json::parse(fresh[0]);
        CHECK(rotate["op"] == "rotate");
        CHECK(rotate.contains("sig"));
        CHECK(rotate["prev"] == json::parse(read_lines(one).back())["hash"]);
        const VerifyReport rep = verify({one, path}, signing.pem);
        INFO(rep.problem);
        CHECK(rep.ok);
        CHECK(rep.records == 5 + 4);
    }

    // A second rotation.
    REQUIRE(::rename(one.c_str(), two.c_str()) == 0);
    REQUIRE(::rename(path.c_str(), one.c_str()) == 0);
    log->request_reopen();
    append_n(*log, 2);
    REQUIRE(log->close());

    const VerifyReport all = verify({two, one, path}, signing.pem);
    INFO(all.problem);
    CHECK(all.ok);
    CHECK(all.records == read_lines(two).size() + read_lines(one).size() + read_lines(path).size());

    const VerifyReport gap = verify({two, path}, signing.pem);
    CHECK_FALSE(gap.ok);
    CHECK(gap.file == path);
    CHECK(gap.line == 1);
    CHECK_THAT(gap.problem, Catch::Contains("missing from the rotation"));

    const VerifyReport order = verify({one, two, path}, signing.pem);
    CHECK_FALSE(order.ok);

    // The newest file alone verifies, with a warning that earlier ones were not given.
    const VerifyReport newest = verify({path}, signing.pem);
    CHECK(newest.ok);
    CHECK_THAT(joined(newest.warnings), Catch::Contains("rotation"));
}

// ---- crashes ------------------------------------------------------------------------------

TEST_CASE("a record torn by a crash is dropped at the next start and recorded", "[audit]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    {
        auto log = create_and_open(signing, path);
        append_n(*log, 3);
    }  // no close(): a crash
    const Lines before = read_lines(path);
    const std::string torn = before[2].substr(0, 57);
    {
        std::ofstream out(path, std::ios::binary | std::ios::app);
        out << torn;
    }
    CHECK(verify({path}, signing.pem).ok);  // torn, not tampered

    {
        auto log = AuditLog::open(options_for(path), signing.signer(), nullptr);
        REQUIRE(log);
        CHECK((*log)->last_seq() == before.size() + 1);
    }
    const std::string text = read_all(path);
    CHECK(text.back() == '\n');
    CHECK(text.find(torn + "{") == std::string::npos);
    const Lines after = read_lines(path);
    REQUIRE(after.size() == before.size() + 1);
    const json start = json::parse(after.back());
    CHECK(start["op"] == "start");
    CHECK(start["torn_bytes"] == torn.size());
    const VerifyReport rep = verify({path}, signing.pem);
    INFO(rep.problem);
    CHECK(rep.ok);
    CHECK_THAT(joined(rep.warnings), !Catch::Contains("torn"));
}

// ---- checkpoints ----------------------------------------------------------------------------

TEST_CASE("every N records a signed checkpoint is written", "[audit]")
{
    Signing signing;
    TempDir dir;
    const std::string path = dir / "audit.jsonl";
    {
        auto log = create_and_open(signing, path, nullptr, 5);
        append_n(*log, 12);
    }
    const Lines lines = read_lines(path);
    // init, start, 5 gets, checkpoint, 5 gets, checkpoint, 2 gets
    REQUIRE(lines.size() == 2 + 12 + 2);
    std::vector<std::size_t> at;
    for (std::size_t i = 0; i < lines.size(); ++i) {
        const json r = json::parse(lines[i]);
        if (r["op"] == "checkpoint") {
            at.push_back(i + 1);
            CHECK(r["records"] == 5);
            CHECK(r.contains("sig"));
        }
    }
    CHECK(at == std::vector<std::size_t>{8, 14});

    const VerifyReport rep = verify({path}, signing.pem);
    INFO(rep.problem);
    CHECK(rep.ok);
    CHECK(rep.records == lines.size());
    CHECK(rep.checkpoints == count_signed(lines));
    CHECK(rep.checkpoints == 4);  // init, start and two checkpoints
}

// ---- disk full --------------------------------------------------------------------------------

TEST_CASE("a full disk makes append fail closed until space returns", "[audit]")
{
    Signing signing;
    TempDir dir;
    testing::SmallTmpfs small(dir / "small", "size=64k,mode=0700");
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
    // No half record was left behind.
    CHECK(std::filesystem::file_size(path) == size_before_failure);
    const std::uint64_t seq_at_failure = log->last_seq();

    // Still full: still refused, sequence unchanged.
    auto again = log->append(get_event());
    REQUIRE_FALSE(again);
    CHECK(again.error().code == Errc::audit_unavailable);
    CHECK(log->last_seq() == seq_at_failure);

    // Space comes back: records are written again.
    REQUIRE(::unlink((small / "filler").c_str()) == 0);
    auto back = log->append(get_event());
    REQUIRE(back);
    CHECK(log->healthy());
    CHECK(log->last_seq() == seq_at_failure + 1);
    append_n(*log, 2);
    REQUIRE(log->close());
    log.reset();

    const VerifyReport rep = verify({path}, signing.pem);
    INFO(rep.problem);
    CHECK(rep.ok);
    CHECK(rep.warnings.empty());
    CHECK(rep.records == read_lines(path).size());
}

}  // namespace
}  // namespace vaultfs::vault
