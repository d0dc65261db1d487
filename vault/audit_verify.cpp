// Verification of audit files: sequence, chain, signatures, rotation links,
// and (given the database anchor) a cut-off tail.

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>

#include <fstream>
#include <memory>
#include <set>
#include <sstream>

#include "vault/audit.hpp"
#include "vault/audit_format.hpp"
#include "vault/store.hpp"

namespace vaultfs::vault {

namespace {

using json = nlohmann::json;

struct PkeyFree {
    void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

const std::set<std::string> signed_ops{"init", "start", "checkpoint", "rotate", "shutdown"};

struct Line {
    std::string text;
    bool terminated = true;
};

bool read_lines(const std::string& path, std::vector<Line>& lines)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
        return false;
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string all = ss.str();
    std::size_t pos = 0;
    while (pos < all.size()) {
        const auto nl = all.find('\n', pos);
        if (nl == std::string::npos) {
            lines.push_back(Line{all.substr(pos), false});
            break;
        }
        lines.push_back(Line{all.substr(pos, nl - pos), true});
        pos = nl + 1;
    }
    return true;
}

struct Parsed {
    json record;
    std::uint64_t seq = 0;
    std::string prev;
    std::string hash;
    std::string op;
};

std::optional<Parsed> parse_record(const std::string& text)
{
    Parsed p;
    p.record = json::parse(text, nullptr, false);
    if (p.record.is_discarded() || !p.record.is_object())
        return std::nullopt;
    const auto& r = p.record;
    if (!r.contains("seq") || !r["seq"].is_number_unsigned() || !r.contains("prev") || !r["prev"].is_string() ||
        !r.contains("hash") || !r["hash"].is_string() || !r.contains("op") || !r["op"].is_string())
        return std::nullopt;
    p.seq = r["seq"].get<std::uint64_t>();
    p.prev = r["prev"].get<std::string>();
    p.hash = r["hash"].get<std::string>();
    p.op = r["op"].get<std::string>();
    return p;
}

}  // namespace

Result<std::string> p256_public_key_pem(const std::vector<std::uint8_t>& point)
{
    std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(OSSL_PARAM_BLD_new(), OSSL_PARAM_BLD_free);
    if (!bld || OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()) != 1)
        return fail(Errc::invalid_argument, "cannot build the public key parameters");
    std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(OSSL_PARAM_BLD_to_param(bld.get()), OSSL_PARAM_free);
    std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr),
                                                                   EVP_PKEY_CTX_free);
    EVP_PKEY* raw = nullptr;
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1)
        return fail(Errc::invalid_argument, "the token's public point is not a valid P-256 key");
    Pkey key(raw);
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    if (!bio || PEM_write_bio_PUBKEY(bio.get(), key.get()) != 1)
        return fail(Errc::invalid_argument, "cannot encode the public key");
    char* data = nullptr;
    const long len = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(len));
}

VerifyReport verify_audit(const std::vector<std::string>& files, const std::string& public_key_pem,
                          const std::optional<AuditAnchor>& anchor)
{
    VerifyReport rep;
    const auto bad = [&](const std::string& file, std::uint64_t line, std::string problem) {
        rep.ok = false;
        rep.file = file;
        rep.line = line;
        rep.problem = std::move(problem);
        return rep;
    };
    const P256Verifier key(public_key_pem);
    if (!key.usable())
        return bad("", 0, "the audit public key cannot be read (not a PEM public key)");
    if (files.empty())
        return bad("", 0, "no audit files given");

    bool have_prev = false;
    std::uint64_t prev_seq = 0;
    std::string prev_hash;
    std::string prev_file;
    std::string last_op;
    bool anchor_seen = false;

    for (std::size_t fi = 0; fi < files.size(); ++fi) {
        const std::string& file = files[fi];
        std::vector<Line> lines;
        if (!read_lines(file, lines))
            return bad(file, 0, "cannot read the file");
        if (lines.empty())
            return bad(file, 0, "the file is empty");
        for (std::size_t li = 0; li < lines.size(); ++li) {
            const std::uint64_t line_no = li + 1;
            const bool last_of_all = fi + 1 == files.size() && li + 1 == lines.size();
            if (!lines[li].terminated) {
                if (last_of_all) {
                    rep.warnings.push_back(file + " line " + std::to_string(line_no) + ": the last record is torn (" +
                                           std::to_string(lines[li].text.size()) +
                                           " bytes, no newline): a crash during a write, not tampering; the next "
                                           "start of the daemon removes it");
                    break;
                }
                return bad(file, line_no, "incomplete record inside the log (edited)");
            }
            auto p = parse_record(lines[li].text);
            if (!p)
                return bad(file, line_no, "not a valid audit record (edited)");

            json without_hash = p->record;
            without_hash.erase("hash");
            if (sha256_hex(canonical(without_hash)) != p->hash)
                return bad(file, line_no, "record edited: its hash does not match its content");

            if (!have_prev) {
                if (p->op == "init") {
                    if (p->seq != 1 || p->prev != genesis_hash())
                        return bad(file, line_no, "the init record does not start a chain");
                } else if (p->op == "rotate") {
                    rep.warnings.push_back(file + " starts at a rotation (seq " + std::to_string(p->seq) +
                                           "); earlier files were not given, so the link to them is not checked");
                } else {
                    return bad(file, line_no, "the log starts in the middle of the chain (seq " +
                                                  std::to_string(p->seq) + "): earlier records or files are missing");
                }
            } else if (li == 0) {
                if (p->op != "rotate" || p->prev != prev_hash || p->seq != prev_seq + 1)
                    return bad(file, line_no, "file missing from the rotation: " + file +
                                                  " does not continue " + prev_file + " (which ends at seq " +
                                                  std::to_string(prev_seq) + ")");
            } else if (p->seq != prev_seq + 1) {
                if (p->seq == prev_seq + 2 && li + 1 < lines.size()) {
                    auto next = parse_record(lines[li + 1].text);
                    if (next && next->seq == prev_seq + 1)
                        return bad(file, line_no, "records reordered: seq " + std::to_string(p->seq) +
                                                      " comes before seq " + std::to_string(next->seq));
                }
                if (p->seq > prev_seq + 1)
                    return bad(file, line_no, "record(s) deleted: seq jumps from " + std::to_string(prev_seq) +
                                                  " to " + std::to_string(p->seq));
                return bad(file, line_no, "records reordered: seq " + std::to_string(p->seq) + " follows seq " +
                                              std::to_string(prev_seq));
            } else if (p->prev != prev_hash) {
                return bad(file, line_no, "chain broken: prev does not match the hash of the record before "
                                          "(a record was edited, deleted or replaced)");
            }

            if (signed_ops.count(p->op) != 0) {
                if (!p->record.contains("sig") || !p->record["sig"].is_string())
                    return bad(file, line_no, "forged " + p->op + " record: it carries no signature");
                const auto sig = from_hex(p->record["sig"].get<std::string>());
                json unsigned_part = without_hash;
                unsigned_part.erase("sig");
                if (!sig || !key.verify(sha256(canonical(unsigned_part)), *sig))
                    return bad(file, line_no, "forged " + p->op +
                                                  " record: its signature does not verify with the audit public key");
                ++rep.checkpoints;
            }
            if (anchor && p->seq == anchor->seq) {
                if (p->hash != anchor->hash)
                    return bad(file, line_no, "record " + std::to_string(p->seq) +
                                                  " differs from the one anchored in the database");
                anchor_seen = true;
            }
            have_prev = true;
            prev_seq = p->seq;
            prev_hash = p->hash;
            last_op = p->op;
            ++rep.records;
        }
        prev_file = file;
    }

    if (anchor && !anchor_seen) {
        if (prev_seq < anchor->seq)
            return bad(files.back(), 0, "tail truncated: the database anchors record " + std::to_string(anchor->seq) +
                                            " but the log ends at record " + std::to_string(prev_seq));
        rep.warnings.push_back("the database anchor (record " + std::to_string(anchor->seq) +
                               ") lies in an earlier file that was not given");
    }
    if (!anchor && last_op != "shutdown")
        rep.warnings.push_back("the log does not end with a shutdown record: the daemon is running or crashed, or "
                               "the tail was cut; `vaultfs audit verify --state DIR` checks it against the database");
    rep.ok = true;
    return rep;
}

}  // namespace vaultfs::vault
