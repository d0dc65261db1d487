#include "vault/audit/verify.hpp"

#include <algorithm>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>

namespace vaultfs::vault::audit {

namespace {

struct FileLine {
    std::string text;
    bool terminated = true;
};

bool read_lines(const std::string& path, std::vector<FileLine>& lines)
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
            lines.push_back(FileLine{all.substr(pos), false});
            break;
        }
        lines.push_back(FileLine{all.substr(pos, nl - pos), true});
        pos = nl + 1;
    }
    return true;
}

std::string seq_text(std::uint64_t seq) { return std::to_string(seq); }

// The checks of verify.hpp, fed one line at a time.
class Verifier {
public:
    // `trusted_pem`: the audit public key the caller trusts, the one in
    // force at the end of the log.
    Verifier(const std::string& trusted_pem, const VerifyOptions& options) : opt_(options)
    {
        keys_.push_back(std::make_unique<SignatureVerifier>(trusted_pem));
        pems_.push_back(trusted_pem);
    }

    bool usable() const { return keys_.back()->usable(); }

    // Learns the keys in force before the trusted one from the hand-over
    // records among `lines` (mechanisms.hpp; `vaultfs token migrate`): the
    // hand-over to the trusted key names the key before it, and so on back.
    // Each hand-over is then checked in place: signed by the key it hands
    // over from, and confirmed by a signature of the key it hands to.
    void learn_keys(const std::vector<std::string_view>& lines)
    {
        // Only signed hand-overs count (an unsigned line naming keys is no
        // hand-over), each key once, and a bounded chain: what the lines
        // hold cannot make this loop long.
        constexpr std::size_t max_chain = 16;
        std::vector<std::pair<std::string, std::string>> handovers;  // old, new
        for (const auto line : lines) {
            if (handovers.size() >= 4 * max_chain)
                break;
            if (line.find("\"op\":\"handover\"") == std::string_view::npos)
                continue;
            auto r = parse(line);
            if (r && r->op == "handover" && r->is_signed() && r->fields.value("old_key", json_null()).is_string() &&
                r->fields.value("new_key", json_null()).is_string())
                handovers.emplace_back(r->fields["old_key"].get<std::string>(), r->fields["new_key"].get<std::string>());
        }
        while (pems_.size() < max_chain) {
            const auto it = std::find_if(handovers.begin(), handovers.end(),
                                         [&](const auto& h) { return same_public_key(h.second, pems_.front()); });
            if (it == handovers.end())
                break;
            const bool seen = std::any_of(pems_.begin(), pems_.end(),
                                          [&](const std::string& p) { return same_public_key(p, it->first); });
            if (seen)
                break;
            pems_.insert(pems_.begin(), it->first);
            keys_.insert(keys_.begin(), std::make_unique<SignatureVerifier>(it->first));
        }
    }

    // verify_tail: the first record is where trust starts.
    void trust_first_record() { trust_first_ = true; }

    void begin_file(const std::string& file)
    {
        prev_file_ = file_;
        file_ = file;
    }

    // `next` is the line after this one in the same file, if any (to tell a
    // reordering from a deletion).
    void line(std::uint64_t line_no, std::string_view text, bool first_in_file, const std::string* next)
    {
        auto parsed = parse(text);
        if (parsed)
            ++rep_.records;
        if (parsed && (first_in_file || rep_.records == 1))
            file_first_seq_ = parsed->seq;
        if (resync_) {
            if (parsed && is_break(*parsed) && signature_ok(*parsed)) {
                note_break(*parsed, line_no);
                resume(*parsed, line_no);
            }
            return;
        }
        if (!parsed)
            return problem(line_no, parsed.error());
        const Record& r = *parsed;

        if (trust_first_ && !have_prev_) {
            if (!r.is_signed())
                return problem(line_no, "no signed record within the last " + std::to_string(max_bound.records) +
                                            " records");
            if (!signature_ok(r))
                return problem(line_no, "forged " + r.op + " record: its signature does not verify with the audit "
                                                           "public key");
            return resume(r, line_no);
        }
        if (is_break(r)) {
            // A segment the daemon started after finding the chain broken:
            // it does not continue what comes before it.
            if (!signature_ok(r))
                return problem(line_no, "forged " + r.op + " record: its signature does not verify with the audit "
                                                           "public key");
            note_break(r, line_no);
            return resume(r, line_no);
        }
        if (have_prev_ && last_op_ == "shutdown" && !((r.op == "start" || r.op == "rotate") && r.is_signed()))
            return problem(line_no, "a " + r.op.substr(0, 40) + " record follows the shutdown at seq " +
                                        seq_text(prev_seq_) + ": records were added while the daemon was down");

        if (!have_prev_) {
            if (r.op == "init") {
                if (r.seq != 1 || r.prev != genesis_hash())
                    return problem(line_no, "the init record does not start a chain");
            } else if (r.op == "rotate") {
                rep_.warnings.push_back(file_ + " starts at a rotation (seq " + seq_text(r.seq) +
                                        "); earlier files were not given, so the link to them is not checked");
            } else {
                return problem(line_no, "the log starts in the middle of the chain (seq " + seq_text(r.seq) +
                                            "): earlier records or files are missing");
            }
        } else if (first_in_file) {
            if (r.op != "rotate" || r.prev != prev_hash_ || r.seq != prev_seq_ + 1)
                return problem(line_no, "file missing from the rotation: " + file_ + " does not continue " +
                                            prev_file_ + " (which ends at seq " + seq_text(prev_seq_) + ")");
        } else if (r.seq != prev_seq_ + 1) {
            if (r.seq == prev_seq_ + 2 && next != nullptr) {
                auto after = parse(*next);
                if (after && after->seq == prev_seq_ + 1)
                    return problem(line_no, "records reordered: seq " + seq_text(r.seq) + " comes before seq " +
                                                seq_text(after->seq));
            }
            if (r.seq > prev_seq_ + 1)
                return problem(line_no, "record(s) deleted: seq jumps from " + seq_text(prev_seq_) + " to " +
                                            seq_text(r.seq));
            return problem(line_no, "records reordered: seq " + seq_text(r.seq) + " follows seq " +
                                        seq_text(prev_seq_));
        } else if (r.prev != prev_hash_) {
            return problem(line_no, "chain broken: prev does not match the hash of the record before (a record was "
                                    "edited, deleted or replaced)");
        }

        if (!is_known_op(r.op))
            return problem(line_no, "unknown op '" + r.op.substr(0, 40) + "' (edited)");
        // The writer never goes back in time (it holds the last time it
        // wrote when the clock steps back), so a record that does was not
        // written by it.
        if (have_prev_ && r.time < last_time_)
            return problem(line_no, "time goes backwards: seq " + seq_text(r.seq) + " at " +
                                        r.fields.value("time", std::string()) + " is older than seq " +
                                        seq_text(prev_seq_) + " (forged, or records moved)");
        if (is_signed_op(r.op) && !r.is_signed())
            return problem(line_no, "forged " + r.op + " record: it carries no signature");
        if (!is_signed_op(r.op) && r.is_signed())
            return problem(line_no, "a " + r.op + " record cannot carry a signature (edited)");
        if (r.is_signed()) {
            if (!signature_ok(r))
                return problem(line_no, "forged " + r.op + " record: its signature does not verify with the audit "
                                                           "public key");
            if (have_prev_ && r.count("records") != stretch_)
                return problem(line_no, "the " + r.op + " record counts " +
                                            std::to_string(r.count("records").value_or(0)) +
                                            " records since the signature before it, the log holds " +
                                            std::to_string(stretch_));
            close_stretch();
            if (!take_bound(r, line_no))
                return;
            ++rep_.signed_records;
            rep_.last_signed_seq = r.seq;
            note_unproven(r, line_no);
            if (r.op == "handover") {
                if (!hand_over(r, line_no))
                    return;
            } else {
                unconfirmed_handover_.reset();
            }
        } else {
            if (stretch_ == 0) {
                stretch_first_ = r.time;
                stretch_first_line_ = line_no;
            }
            ++stretch_;
            const bool too_many = stretch_ > bound_.records;
            const bool too_long = r.time - stretch_first_ >= static_cast<Micros>(bound_.seconds) * 1000000;
            if (!over_ && (too_many || too_long)) {
                over_ = true;
                over_file_ = file_;
                over_line_ = line_no;
                over_why_ = too_many ? "more than " + std::to_string(bound_.records) + " unsigned records"
                                     : "unsigned records spanning " + std::to_string(bound_.seconds) +
                                           " s or more";
                over_why_ += " since the signature at seq " + seq_text(rep_.last_signed_seq) +
                             ": a signature is missing where one was due (removed, or never written)";
            }
        }
        advance(r, line_no);
    }

    void torn_last_line(std::uint64_t line_no, std::size_t bytes)
    {
        rep_.warnings.push_back(file_ + " line " + std::to_string(line_no) + ": the last record is torn (" +
                                std::to_string(bytes) +
                                " bytes, no newline): a crash during a write, not tampering; the next start of the "
                                "daemon removes it");
    }

    void fail_file(std::uint64_t line_no, const std::string& why) { problem(line_no, why); }

    // The records after the last signature and the anchor when the daemon
    // is not running and its last stop was not clean: what it wrote last
    // (or what was added since) that no signature vouches for.
    void stopped_uncleanly()
    {
        if (!opt_.anchor || opt_.anchor->clean_shutdown || !have_prev_)
            return;
        const std::uint64_t proven = std::max(rep_.last_signed_seq, anchor_seen_ ? opt_.anchor->seq : 0);
        if (prev_seq_ > proven)
            unproven_.push_back(Unproven{proven + 1, prev_seq_, file_, 0, true});
    }

    VerifyReport finish(const std::string& last_file)
    {
        if (opt_.stopped)
            stopped_uncleanly();
        for (const auto& u : unproven_) {
            const std::string range = "records " + seq_text(u.from) + "–" + seq_text(u.through);
            if (u.through <= acknowledged_through_) {
                rep_.warnings.push_back(range + " were written after the last signature before an unclean stop; "
                                        "an admin acknowledged them (seq " + seq_text(acknowledged_at_) + ")");
                continue;
            }
            rep_.unproven.emplace_back(u.from, u.through);
            add_problem(u.file, u.line,
                        range + (u.tail ? " follow the last signature, and the daemon stopped without a clean "
                                          "shutdown (kill -9, a crash, power loss)"
                                        : " were written after the last signature before an unclean stop (kill -9, "
                                          "a crash, power loss)") +
                            ": no signature vouches for them, so they may be forged. Examine them, then run "
                            "`vaultfs audit acknowledge --through " + seq_text(u.through) + "`");
        }
        if (!resync_ && over_)
            add_problem(over_file_, over_line_, "unsigned tail: " + over_why_);
        if (unconfirmed_handover_)
            add_problem(unconfirmed_file_, unconfirmed_line_,
                        "the handover at seq " + seq_text(*unconfirmed_handover_) +
                            " is not confirmed by any record signed with the key it hands over to");
        else if (!resync_ && have_prev_ && in_force_ + 1 != keys_.size())
            add_problem(last_file, 0, "the log ends before it hands over to the audit public key");
        rep_.unsigned_tail = stretch_;
        rep_.tail_seconds = stretch_ > 0 ? static_cast<std::uint64_t>((last_time_ - stretch_first_) / 1000000) : 0;
        if (opt_.anchor) {
            const AuditAnchor& a = *opt_.anchor;
            if (a.sig.empty())
                add_problem("", 0, "the database anchor is not signed (edited, or left by an older vaultfs)");
            else if (!keys_.back()->verify(anchor_digest(a), a.sig))
                add_problem("", 0, "the database anchor's signature does not verify: it was edited");
            if (anchor_seen_ && !trust_first_ && anchor_file_first_ != a.file_start)
                add_problem(anchor_file_, 0, "the audit file begins at seq " + seq_text(anchor_file_first_) +
                                                 ", the database anchor's file at seq " + seq_text(a.file_start) +
                                                 ": it was replaced or cut from the front");
            if (!anchor_seen_) {
                if (prev_seq_ < a.seq)
                    add_problem(last_file, 0, "tail truncated: the database anchors record " + seq_text(a.seq) +
                                                  " but the log ends at record " + seq_text(prev_seq_));
                else
                    rep_.warnings.push_back("the database anchor (record " + seq_text(a.seq) +
                                            ") lies in an earlier file that was not given");
            }
        } else if (opt_.anchor_expected) {
            add_problem("", 0, "the database holds no audit anchor: it was deleted");
        } else if (last_op_ != "shutdown") {
            rep_.warnings.push_back("the log does not end with a shutdown record: the daemon is running or "
                                    "crashed, or the tail was cut; `vaultfs audit verify --state DIR` checks it "
                                    "against the database");
        }
        rep_.anchor_reached = anchor_seen_;
        rep_.ok = rep_.problems.empty();
        return rep_;
    }

private:
    static bool is_break(const Record& r)
    {
        return (r.op == "start" || r.op == "rotate") && r.fields.contains("break");
    }

    bool signature_ok(const Record& r) const
    {
        return r.is_signed() && keys_[in_force_]->verify(std::span<const std::uint8_t, 32>(body_digest(r.body)), r.sig);
    }

    static const nlohmann::json& json_null()
    {
        static const nlohmann::json null;
        return null;
    }

    // A signed hand-over record: from here on the next key signs.
    bool hand_over(const Record& r, std::uint64_t line_no)
    {
        const auto& f = r.fields;
        const bool named = f.value("old_key", json_null()).is_string() && f.value("new_key", json_null()).is_string();
        if (!named || !same_public_key(f["old_key"].get<std::string>(), pems_[in_force_])) {
            problem(line_no, "the handover record does not hand over from the key that signs before it (edited)");
            return false;
        }
        if (in_force_ + 1 >= pems_.size() || !same_public_key(f["new_key"].get<std::string>(), pems_[in_force_ + 1])) {
            problem(line_no, "the handover record hands over to a key that does not lead to the audit public key");
            return false;
        }
        ++in_force_;
        unconfirmed_handover_ = r.seq;
        unconfirmed_file_ = file_;
        unconfirmed_line_ = line_no;
        return true;
    }

    bool take_bound(const Record& r, std::uint64_t line_no)
    {
        const auto records = r.count("bound_records");
        const auto seconds = r.count("bound_seconds");
        if (!records || !seconds || *records == 0 || *seconds == 0 || *records > max_bound.records ||
            *seconds > max_bound.seconds) {
            problem(line_no, "the " + r.op + " record declares no valid coverage bound");
            return false;
        }
        bound_ = Bound{*records, *seconds};
        return true;
    }

    void close_stretch()
    {
        if (over_)
            add_problem(over_file_, over_line_, over_why_);
        over_ = false;
        stretch_ = 0;
    }

    void note_break(const Record& r, std::uint64_t line_no)
    {
        const auto& f = r.fields;
        const std::string reason = f["break"].is_string() ? f["break"].get<std::string>() : "unknown";
        const auto at = r.count("break_line");
        const auto trusted = r.count("trusted_seq");
        rep_.breaks.push_back(file_ + " line " + std::to_string(line_no) + ": when the daemon started at " +
                              f.value("time", std::string()) + " it found the chain broken" +
                              (at ? " at line " + std::to_string(*at) : std::string()) + ": " + reason +
                              (trusted ? "; records after seq " + seq_text(*trusted) + " before this line are not "
                                                                                        "covered by a signature"
                                       : std::string()));
        add_problem(file_, line_no, "the daemon recorded a break in the chain when it started: " + reason);
    }

    // A signed `start` names the records it found after the last signature
    // of an unclean stop; a signed `acknowledge` is an admin's word on them.
    void note_unproven(const Record& r, std::uint64_t line_no)
    {
        if (r.op == "start") {
            const auto from = r.count("unproven_from");
            const auto through = r.count("unproven_through");
            if (from && through && *from <= *through)
                unproven_.push_back(Unproven{*from, *through, file_, line_no, false});
        } else if (r.op == "acknowledge") {
            if (const auto through = r.count("through"); through && *through > acknowledged_through_) {
                acknowledged_through_ = *through;
                acknowledged_at_ = r.seq;
            }
        }
    }

    void resume(const Record& r, std::uint64_t line_no)
    {
        resync_ = false;
        over_ = false;
        stretch_ = 0;
        if (!take_bound(r, line_no))
            bound_ = max_bound;
        ++rep_.signed_records;
        rep_.last_signed_seq = r.seq;
        advance(r, line_no);
    }

    void advance(const Record& r, std::uint64_t line_no)
    {
        if (opt_.anchor && r.seq == opt_.anchor->seq) {
            if (r.hash != opt_.anchor->hash)
                add_problem(file_, line_no, "record " + seq_text(r.seq) +
                                                " differs from the one anchored in the database");
            anchor_seen_ = true;
            anchor_file_ = file_;
            anchor_file_first_ = file_first_seq_;
        }
        have_prev_ = true;
        prev_seq_ = r.seq;
        prev_hash_ = r.hash;
        last_op_ = r.op;
        last_time_ = r.time;
    }

    // A problem ends the stretch it is in: a bound that stretch had already
    // broken is reported first, as it came first.
    void problem(std::uint64_t line_no, const std::string& why)
    {
        if (over_ && !resync_)
            add_problem(over_file_, over_line_, over_why_);
        over_ = false;
        add_problem(file_, line_no, why);
        resync_ = true;
    }

    void add_problem(const std::string& file, std::uint64_t line_no, const std::string& why)
    {
        if (rep_.problems.empty()) {
            rep_.file = file;
            rep_.line = line_no;
            rep_.problem = why;
        }
        std::string where = file;
        if (line_no != 0)
            where += " line " + std::to_string(line_no);
        rep_.problems.push_back(where.empty() ? why : where + ": " + why);
    }

    std::vector<std::unique_ptr<SignatureVerifier>> keys_;  // oldest first; the last is trusted
    std::vector<std::string> pems_;
    std::size_t in_force_ = 0;
    std::optional<std::uint64_t> unconfirmed_handover_;
    std::string unconfirmed_file_;
    std::uint64_t unconfirmed_line_ = 0;
    const VerifyOptions& opt_;
    VerifyReport rep_;
    bool trust_first_ = false;
    std::string file_;
    std::string prev_file_;
    bool have_prev_ = false;
    std::uint64_t prev_seq_ = 0;
    std::string prev_hash_;
    std::string last_op_;
    Micros last_time_ = 0;
    bool resync_ = false;

    Bound bound_ = max_bound;
    std::uint64_t stretch_ = 0;
    Micros stretch_first_ = 0;
    std::uint64_t stretch_first_line_ = 0;
    bool over_ = false;
    std::string over_file_;
    std::uint64_t over_line_ = 0;
    std::string over_why_;

    struct Unproven {
        std::uint64_t from, through;
        std::string file;
        std::uint64_t line;
        bool tail;  // after the last record of a daemon that is not running
    };
    std::vector<Unproven> unproven_;
    std::uint64_t acknowledged_through_ = 0;
    std::uint64_t acknowledged_at_ = 0;

    bool anchor_seen_ = false;
    std::string anchor_file_;
    std::uint64_t anchor_file_first_ = 0;
    std::uint64_t file_first_seq_ = 0;  // of the file being read
};

}  // namespace

VerifyReport verify_files(const std::vector<std::string>& files, const std::string& public_key_pem,
                          const VerifyOptions& options)
{
    Verifier v(public_key_pem, options);
    if (!v.usable()) {
        v.fail_file(0, "the audit public key cannot be read (not a PEM public key)");
        return v.finish("");
    }
    if (options.slice)
        v.trust_first_record();
    if (files.empty()) {
        v.fail_file(0, "no audit files given");
        return v.finish("");
    }
    std::vector<std::vector<FileLine>> all(files.size());
    std::vector<std::string_view> texts;
    for (std::size_t fi = 0; fi < files.size(); ++fi) {
        if (!read_lines(files[fi], all[fi])) {
            v.begin_file(files[fi]);
            v.fail_file(0, "cannot read the file");
            return v.finish(files[fi]);
        }
        for (const auto& l : all[fi])
            texts.push_back(l.text);
    }
    v.learn_keys(texts);
    for (std::size_t fi = 0; fi < files.size(); ++fi) {
        const std::string& file = files[fi];
        v.begin_file(file);
        const std::vector<FileLine>& lines = all[fi];
        if (lines.empty()) {
            v.fail_file(0, "the file is empty");
            return v.finish(file);
        }
        for (std::size_t li = 0; li < lines.size(); ++li) {
            const std::uint64_t line_no = li + 1;
            if (!lines[li].terminated) {
                if (fi + 1 == files.size() && li + 1 == lines.size()) {
                    v.torn_last_line(line_no, lines[li].text.size());
                    break;
                }
                v.fail_file(line_no, "incomplete record inside the log (edited)");
                continue;
            }
            const std::string* next = li + 1 < lines.size() ? &lines[li + 1].text : nullptr;
            v.line(line_no, lines[li].text, li == 0, next);
        }
    }
    VerifyReport report = v.finish(files.back());
    if (options.slice && report.unsigned_tail > 0) {
        const std::string why = "the slice ends with " + std::to_string(report.unsigned_tail) +
                                " record(s) no signature covers (cut after seq " +
                                std::to_string(report.last_signed_seq) + ")";
        if (report.ok) {
            report.ok = false;
            report.file = files.back();
            report.problem = why;
        }
        report.problems.push_back(why);
    }
    return report;
}

VerifyReport verify_tail(const std::string& file, const std::vector<std::string>& lines, std::uint64_t first_line,
                         const std::string& public_key_pem, const VerifyOptions& options)
{
    Verifier v(public_key_pem, options);
    v.learn_keys(std::vector<std::string_view>(lines.begin(), lines.end()));
    v.trust_first_record();
    v.begin_file(file);
    for (std::size_t i = 0; i < lines.size(); ++i) {
        const std::uint64_t line_no = first_line == 0 ? 0 : first_line + i;
        v.line(line_no, lines[i], false, i + 1 < lines.size() ? &lines[i + 1] : nullptr);
    }
    return v.finish(file);
}

}  // namespace vaultfs::vault::audit
