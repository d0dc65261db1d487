// policy: parser, canonical printer and evaluator for the access-policy
// language described in policy.hpp. Pure: no I/O, no logging, no globals that
// change.
#include "policy/policy.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <limits>
#include <utility>

namespace vaultfs::policy {

namespace {

constexpr std::size_t max_rules = 1000;
constexpr std::size_t max_line_bytes = 4096;  // excluding the '\n'
constexpr std::size_t max_glob_chars = 127;   // the longest secret name
// (uid_t)-1 and (gid_t)-1 mean "no id" to the kernel (chown's "unchanged"),
// so a rule naming them could never describe a real caller.
constexpr std::uint32_t reserved_id = std::numeric_limits<std::uint32_t>::max();

struct Spelling {
    Permission permission;
    std::string_view name;
};

// Declaration order; the canonical printing follows it.
constexpr std::array<Spelling, 15> spellings{{
    {Permission::get, "get"},
    {Permission::list, "list"},
    {Permission::set, "set"},
    {Permission::remove, "delete"},
    {Permission::recover, "recover"},
    {Permission::purge, "purge"},
    {Permission::backup, "backup"},
    {Permission::restore, "restore"},
    {Permission::manage, "manage"},
    {Permission::create, "create"},
    {Permission::rotate, "rotate"},
    {Permission::sign, "sign"},
    {Permission::decrypt, "decrypt"},
    {Permission::unwrap, "unwrap"},
    {Permission::certificates, "certificates"},
}};

// Parse failures inside one line carry only the reason; parse() adds the line.
template <class T>
using Parsed = tl::expected<T, std::string>;

tl::unexpected<std::string> reject(std::string reason)
{
    return tl::unexpected<std::string>(std::move(reason));
}

// Quotes input for an error reason: printable ASCII as is, every other byte
// as \xHH, long text cut short, so a reason is always one readable line.
std::string quoted(std::string_view text)
{
    constexpr std::size_t max_shown = 64;
    constexpr std::string_view hex = "0123456789abcdef";
    std::string out = "'";
    for (std::size_t i = 0; i < text.size() && i < max_shown; ++i) {
        const auto byte = static_cast<unsigned char>(text[i]);
        if (byte >= 0x20 && byte < 0x7f && byte != '\\') {
            out += static_cast<char>(byte);
        } else {
            out += "\\x";
            out += hex[byte >> 4];
            out += hex[byte & 0xf];
        }
    }
    if (text.size() > max_shown)
        out += "...";
    out += '\'';
    return out;
}

bool is_separator(char c)
{
    return c == ' ' || c == '\t';
}

bool is_control(char c)
{
    const auto byte = static_cast<unsigned char>(c);
    return byte < 0x20 || byte == 0x7f;
}

// Strict decimal id: digits only, no sign, no leading zero except "0", fits
// in 32 bits and is not the reserved all-ones value.
Parsed<std::uint32_t> parse_id(std::string_view digits, std::string_view what)
{
    const auto invalid = [&] {
        return reject("invalid " + std::string(what) + " " + quoted(digits) + " (expected a decimal number from 0 to " +
                      std::to_string(reserved_id - 1) + ")");
    };
    if (digits.empty() || digits.size() > 10)
        return invalid();
    if (digits.size() > 1 && digits.front() == '0')
        return invalid();
    std::uint64_t value = 0;
    for (const char c : digits) {
        if (c < '0' || c > '9')
            return invalid();
        value = value * 10 + static_cast<std::uint64_t>(c - '0');
    }
    if (value >= reserved_id)
        return invalid();
    return static_cast<std::uint32_t>(value);
}

Parsed<std::uint32_t> resolved_id(std::optional<std::uint32_t> id, std::string_view what, std::string_view name)
{
    if (!id)
        return reject("unknown " + std::string(what) + " " + quoted(name));
    if (*id == reserved_id)
        return reject(std::string(what) + " " + quoted(name) + " resolves to the reserved id " + std::to_string(reserved_id));
    return *id;
}

Parsed<Principal> parse_principal(std::string_view token, const NameResolver& names)
{
    if (token == "any")
        return Principal{Principal::Kind::any, 0};

    const auto colon = token.find(':');
    const std::string_view kind = token.substr(0, colon);
    const std::string_view value = colon == std::string_view::npos ? std::string_view() : token.substr(colon + 1);
    const bool names_user = kind == "uid" || kind == "user";
    const bool names_group = kind == "gid" || kind == "group";
    if (colon == std::string_view::npos || (!names_user && !names_group))
        return reject("unknown principal " + quoted(token) + " (expected uid:N, user:NAME, gid:N, group:NAME or any)");
    const Principal::Kind principal_kind = names_user ? Principal::Kind::uid : Principal::Kind::gid;

    if (kind == "uid" || kind == "gid")
        return parse_id(value, kind).map([&](std::uint32_t id) { return Principal{principal_kind, id}; });
    if (value.empty())
        return reject("missing " + std::string(kind) + " name after '" + std::string(kind) + ":'");
    const std::optional<std::uint32_t> found = names_user ? names.user_id(value) : names.group_id(value);
    return resolved_id(found, kind, value).map([&](std::uint32_t id) { return Principal{principal_kind, id}; });
}

Parsed<PermissionSet> parse_permission(std::string_view item, std::string_view list)
{
    if (item.empty())
        return reject("empty permission in " + quoted(list));
    if (item == "*")
        return reject("'*' cannot be combined with other permissions in " + quoted(list));
    for (const Spelling& s : spellings) {
        if (s.name == item)
            return PermissionSet(s.permission);
    }
    return reject("unknown permission " + quoted(item));
}

Parsed<PermissionSet> parse_permissions(std::string_view list)
{
    if (list == "*")
        return PermissionSet::all();
    PermissionSet set;
    std::size_t start = 0;
    while (true) {
        const std::size_t comma = list.find(',', start);
        const std::size_t end = comma == std::string_view::npos ? list.size() : comma;
        auto one = parse_permission(list.substr(start, end - start), list);
        if (!one)
            return one;
        set = set | *one;
        if (comma == std::string_view::npos)
            return set;
        start = comma + 1;
    }
}

Parsed<Glob> parse_glob(std::string_view glob)
{
    if (glob.size() > max_glob_chars)
        return reject("glob longer than " + std::to_string(max_glob_chars) + " characters");
    for (const char c : glob) {
        const bool allowed = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '-' ||
                             c == '*' || c == '?';
        if (!allowed)
            return reject("invalid character " + quoted(std::string_view(&c, 1)) + " in glob " + quoted(glob) +
                          " (allowed: letters, digits, '-', '*', '?')");
    }
    return Glob(glob);
}

std::string canonical_text(const Rule& rule);

// Parses one line (without its '\n'). nullopt: blank or comment only.
Parsed<std::optional<Rule>> parse_line(std::string_view line, const NameResolver& names, bool strict)
{
    if (line.size() > max_line_bytes)
        return reject("line longer than " + std::to_string(max_line_bytes) + " bytes");
    if (line.find('\0') != std::string_view::npos)
        return reject("NUL byte in policy text");

    const std::string_view body = line.substr(0, line.find('#'));
    for (const char c : body) {
        if (is_control(c) && c != '\t') {
            const std::string_view hint = c == '\r' ? " (use \\n line endings)" : "";
            return reject("control character " + quoted(std::string_view(&c, 1)) + " in rule" + std::string(hint));
        }
    }

    // effect, principal, permissions, glob, and one more to detect extras.
    std::array<std::string_view, 5> tokens;
    std::size_t count = 0;
    std::size_t pos = 0;
    while (count < tokens.size()) {
        while (pos < body.size() && is_separator(body[pos]))
            ++pos;
        if (pos == body.size())
            break;
        const std::size_t start = pos;
        while (pos < body.size() && !is_separator(body[pos]))
            ++pos;
        tokens[count++] = body.substr(start, pos - start);
    }
    if (count == 0)
        return std::optional<Rule>();

    Rule rule;
    if (tokens[0] == "allow") {
        rule.allow = true;
    } else if (tokens[0] == "deny") {
        rule.allow = false;
    } else {
        return reject("unknown effect " + quoted(tokens[0]) + " (expected allow or deny)");
    }
    if (count < 2)
        return reject("missing principal after " + quoted(tokens[0]));
    auto principal = parse_principal(tokens[1], names);
    if (!principal)
        return tl::unexpected(std::move(principal.error()));
    rule.principal = *principal;

    if (count < 3)
        return reject("missing permissions after " + quoted(tokens[1]));
    auto permissions = parse_permissions(tokens[2]);
    if (!permissions)
        return tl::unexpected(std::move(permissions.error()));
    rule.permissions = *permissions;

    if (count >= 4) {
        auto glob = parse_glob(tokens[3]);
        if (!glob)
            return tl::unexpected(std::move(glob.error()));
        rule.glob = std::move(*glob);
    }
    if (count == 5)
        return reject("unexpected " + quoted(tokens[4]) + " after the glob (a rule has at most four fields)");
    // A rule that names a vault-wide permission and a glob could never give
    // or take it: those permissions are decided for the vault, not for a
    // named secret. (`*` with a glob means every permission a secret has.)
    if (strict && rule.glob && tokens[2] != "*") {
        for (const Permission p : {Permission::list, Permission::manage}) {
            if (rule.permissions.contains(p))
                return reject(quoted(canonical_text(rule)) + " can never take effect: " +
                              quoted(to_string(p)) + " applies to the whole vault, never to the secrets " +
                              quoted(rule.glob->text()) + " matches; give it in a rule of its own without a glob");
        }
    }
    return std::optional<Rule>(std::move(rule));
}

// A rule whose every permission a glob-less deny takes from everyone it
// names could never take effect (deny wins, wherever it stands).
std::optional<std::string> shadowed(const std::vector<Rule>& rules, std::size_t i)
{
    const Rule& allow = rules[i];
    if (!allow.allow)
        return std::nullopt;
    for (std::size_t j = 0; j < rules.size(); ++j) {
        const Rule& deny = rules[j];
        if (deny.allow || deny.glob || (deny.permissions & allow.permissions) != allow.permissions)
            continue;
        if (deny.principal.kind == Principal::Kind::any || deny.principal == allow.principal)
            return "line " + std::to_string(j + 1) + " (" + canonical_text(deny) + ") denies all of it";
    }
    return std::nullopt;
}

std::string canonical_text(const Rule& rule)
{
    std::string text = rule.allow ? "allow " : "deny ";
    switch (rule.principal.kind) {
    case Principal::Kind::uid:
        text += "uid:" + std::to_string(rule.principal.id);
        break;
    case Principal::Kind::gid:
        text += "gid:" + std::to_string(rule.principal.id);
        break;
    case Principal::Kind::any:
        text += "any";
        break;
    }
    text += ' ';
    text += to_string(rule.permissions);
    if (rule.glob) {
        text += ' ';
        text += rule.glob->text();
    }
    return text;
}

// Which supplementary groups a decision assumes: the caller's own, or --
// when they could not be read -- none of them, or every one.
enum class Membership { listed, none, every };

bool names(const Principal& p, const Subject& who, Membership m)
{
    if (p.kind != Principal::Kind::gid || m == Membership::listed)
        return p.matches(who);
    return m == Membership::every || who.gid == p.id;
}

// Whether `rule` speaks about this caller and this target at all.
bool applies(const Rule& rule, const Subject& who, std::optional<std::string_view> secret, Membership m)
{
    if (!names(rule.principal, who, m))
        return false;
    if (!rule.glob)
        return true;
    return secret && rule.glob->matches(*secret);
}

Decision decided_by(bool allowed, std::size_t index, const Rule& rule)
{
    return Decision{allowed, static_cast<int>(index + 1), canonical_text(rule)};
}

}  // namespace

std::string_view to_string(Permission p)
{
    for (const Spelling& s : spellings) {
        if (s.permission == p)
            return s.name;
    }
    return "unknown";
}

std::string to_string(PermissionSet s)
{
    if ((s & PermissionSet::all()) == PermissionSet::all())
        return "*";
    std::string out;
    for (const Spelling& one : spellings) {
        if (!s.contains(one.permission))
            continue;
        if (!out.empty())
            out += ',';
        out += one.name;
    }
    return out;
}

bool Subject::in_group(gid_t g) const
{
    return gid == g || std::find(groups.begin(), groups.end(), g) != groups.end();
}

bool Principal::matches(const Subject& s) const
{
    switch (kind) {
    case Kind::uid:
        return s.uid == id;
    case Kind::gid:
        return s.in_group(id);
    case Kind::any:
        return true;
    }
    return false;
}

std::string ParseError::message() const
{
    return "line " + std::to_string(line) + ": " + reason;
}

tl::expected<Policy, ParseError> Policy::parse(std::string_view text, const NameResolver& names, Origin origin)
{
    Policy policy;
    int line_number = 0;
    std::vector<int> lines;  // the input line of each rule
    std::size_t start = 0;
    while (start < text.size()) {
        ++line_number;
        const std::size_t newline = text.find('\n', start);
        const std::size_t end = newline == std::string_view::npos ? text.size() : newline;
        auto rule = parse_line(text.substr(start, end - start), names, origin == Origin::written);
        if (!rule)
            return tl::unexpected(ParseError{line_number, std::move(rule.error())});
        if (*rule) {
            if (policy.rules_.size() == max_rules)
                return tl::unexpected(ParseError{line_number, "more than " + std::to_string(max_rules) + " rules"});
            policy.rules_.push_back(std::move(**rule));
            lines.push_back(line_number);
        }
        start = end + 1;
    }
    for (std::size_t i = 0; origin == Origin::written && i < policy.rules_.size(); ++i)
        if (const auto why = shadowed(policy.rules_, i))
            return tl::unexpected(ParseError{lines[i], quoted(canonical_text(policy.rules_[i])) +
                                                           " can never take effect: " + *why});
    return policy;
}

tl::expected<void, ParseError> Policy::check_line(std::string_view line, int number, const NameResolver& names)
{
    auto rule = parse_line(line, names, true);
    if (!rule)
        return tl::unexpected(ParseError{number, std::move(rule.error())});
    return {};
}

Policy Policy::owner_only(uid_t owner)
{
    Policy policy;
    policy.rules_.push_back(Rule{true, Principal{Principal::Kind::uid, owner}, PermissionSet::all(), std::nullopt});
    return policy;
}

std::string Policy::print() const
{
    std::string text;
    for (const Rule& rule : rules_) {
        text += canonical_text(rule);
        text += '\n';
    }
    return text;
}

namespace {

Decision evaluate_as(const std::vector<Rule>& rules, const Subject& who, Permission wanted,
                     std::optional<std::string_view> secret, Membership m)
{
    std::optional<std::size_t> first_allow;
    for (std::size_t i = 0; i < rules.size(); ++i) {
        const Rule& rule = rules[i];
        if (!rule.permissions.contains(wanted) || !applies(rule, who, secret, m))
            continue;
        if (!rule.allow)
            return decided_by(false, i, rule);
        if (!first_allow)
            first_allow = i;
    }
    if (first_allow)
        return decided_by(true, *first_allow, rules[*first_allow]);
    return Decision{};
}

PermissionSet effective_as(const std::vector<Rule>& rules, const Subject& who, std::optional<std::string_view> secret,
                           Membership m)
{
    PermissionSet allowed;
    PermissionSet denied;
    for (const Rule& rule : rules) {
        if (!applies(rule, who, secret, m))
            continue;
        if (rule.allow)
            allowed = allowed | rule.permissions;
        else
            denied = denied | rule.permissions;
    }
    return allowed.without(denied);
}

bool holds_any_as(const std::vector<Rule>& rules, const Subject& who, Membership m)
{
    // A glob deny cannot take a permission away everywhere: some secret may
    // fall outside it. Only glob-less denies count against allows here.
    PermissionSet allowed;
    PermissionSet denied_everywhere;
    for (const Rule& rule : rules) {
        if (!names(rule.principal, who, m))
            continue;
        if (rule.allow)
            allowed = allowed | rule.permissions;
        else if (!rule.glob)
            denied_everywhere = denied_everywhere | rule.permissions;
    }
    return !allowed.without(denied_everywhere).empty();
}

}  // namespace

Decision Policy::evaluate(const Subject& who, Permission wanted, std::optional<std::string_view> secret) const
{
    if (who.groups_known)
        return evaluate_as(rules_, who, wanted, secret, Membership::listed);
    Decision none = evaluate_as(rules_, who, wanted, secret, Membership::none);
    Decision every = evaluate_as(rules_, who, wanted, secret, Membership::every);
    if (none.allowed == every.allowed)
        return none;  // no group rule changes it
    // A group rule decides, and the groups are unknown: deny, naming the rule
    // that would have denied (or the default deny).
    Decision d = none.allowed ? std::move(every) : std::move(none);
    d.groups_unknown = true;
    return d;
}

PermissionSet Policy::effective(const Subject& who, std::optional<std::string_view> secret) const
{
    if (who.groups_known)
        return effective_as(rules_, who, secret, Membership::listed);
    return effective_as(rules_, who, secret, Membership::none) & effective_as(rules_, who, secret, Membership::every);
}

bool Policy::holds_any(const Subject& who) const
{
    if (who.groups_known)
        return holds_any_as(rules_, who, Membership::listed);
    // Visibility shows names, never values: a caller that could hold
    // something sees the vault, and each decision in it is then made
    // conservatively (evaluate, effective).
    return holds_any_as(rules_, who, Membership::none) || holds_any_as(rules_, who, Membership::every);
}

bool Policy::someone_can_manage(const NameResolver& names) const
{
    return std::any_of(rules_.begin(), rules_.end(), [&](const Rule& r) {
        if (!r.allow || r.glob || !r.permissions.contains(Permission::manage))
            return false;
        // A caller this rule names, in no other group: does manage survive
        // the denies that name it too?
        Subject who{static_cast<uid_t>(-2), static_cast<gid_t>(-2), {}};
        switch (r.principal.kind) {
        case Principal::Kind::uid:
            if (!names.user_exists(r.principal.id))
                return false;
            who.uid = r.principal.id;
            break;
        case Principal::Kind::gid:
            if (!names.group_has_members(r.principal.id))
                return false;
            who.gid = r.principal.id;
            break;
        case Principal::Kind::any:
            break;
        }
        return evaluate(who, Permission::manage).allowed;
    });
}

// ---- globs ------------------------------------------------------------------------------
//
// The automaton's states are the positions of the pattern (runs of '*'
// collapsed to one): state i means "the name so far matches the pattern's
// first i characters". A '*' at i keeps state i on any character and also
// stands for state i + 1 at once (it may match nothing); a '?' or a literal
// at i moves to i + 1 on a character it accepts. All states advance together
// as bits of a few 64-bit words: time linear in the name, no backtracking.

Glob::Glob(std::string_view pattern) : text_(pattern), slot_(256, 0)
{
    std::string collapsed;
    for (const char c : pattern)
        if (c != '*' || collapsed.empty() || collapsed.back() != '*')
            collapsed += c;
    accept_ = collapsed.size();
    words_ = accept_ / 64 + 1;
    star_.assign(words_, 0);
    any_.assign(words_, 0);
    for (std::size_t i = 0; i < collapsed.size(); ++i) {
        const std::uint64_t bit = std::uint64_t{1} << (i % 64);
        const auto c = static_cast<unsigned char>(collapsed[i]);
        if (c == '*') {
            star_[i / 64] |= bit;
        } else if (c == '?') {
            any_[i / 64] |= bit;
        } else {
            if (slot_[c] == 0) {
                literal_.resize(literal_.size() + words_, 0);
                slot_[c] = static_cast<std::uint8_t>(literal_.size() / words_);
            }
            literal_[(slot_[c] - 1) * words_ + i / 64] |= bit;
        }
    }
    if (words_ <= 2) {
        const std::size_t slots = literal_.size() / words_ + 1;
        accepts_.assign(slots * 2, 0);
        for (std::size_t k = 0; k < slots; ++k)
            for (std::size_t w = 0; w < words_; ++w)
                accepts_[k * 2 + w] = any_[w] | (k == 0 ? 0 : literal_[(k - 1) * words_ + w]);
    }
}

bool Glob::matches(std::string_view name) const
{
    if (words_ <= 2) {
        // Every policy glob (127 characters at most): one 128-bit word.
        __extension__ using u128 = unsigned __int128;
        const auto wide = [](std::uint64_t low, std::uint64_t high) { return low | (static_cast<u128>(high) << 64); };
        const u128 star = wide(star_[0], words_ == 2 ? star_[1] : 0);
        const std::uint64_t* accepts = accepts_.data();
        u128 state = 1;
        state |= (state & star) << 1;
        for (const char ch : name) {
            const std::size_t k = slot_[static_cast<unsigned char>(ch)];
            state = ((state & wide(accepts[k * 2], accepts[k * 2 + 1])) << 1) | (state & star);
            if (state == 0)
                return false;
            state |= (state & star) << 1;
        }
        return ((state >> accept_) & 1) != 0;
    }
    // Longer patterns (only from callers of glob_match) take the heap.
    std::vector<std::uint64_t> both(words_ * 2, 0);
    std::uint64_t* state = both.data();
    std::uint64_t* next = both.data() + words_;
    const auto close = [&](std::uint64_t* s) {
        // Each '*' also stands for the state after it (runs are collapsed,
        // so one pass reaches every such state).
        std::uint64_t carry = 0;
        for (std::size_t w = 0; w < words_; ++w) {
            s[w] |= carry;
            const std::uint64_t at_star = s[w] & star_[w];
            s[w] |= at_star << 1;
            carry = at_star >> 63;
        }
    };
    for (std::size_t w = 0; w < words_; ++w)
        state[w] = 0;
    state[0] = 1;
    close(state);
    for (const char ch : name) {
        const auto c = static_cast<unsigned char>(ch);
        const std::uint64_t* lit = slot_[c] == 0 ? nullptr : &literal_[(slot_[c] - 1) * words_];
        std::uint64_t carry = 0;
        std::uint64_t alive = 0;
        for (std::size_t w = 0; w < words_; ++w) {
            const std::uint64_t step = state[w] & (any_[w] | (lit != nullptr ? lit[w] : 0));
            next[w] = (step << 1) | carry | (state[w] & star_[w]);
            carry = step >> 63;
            alive |= next[w];
        }
        if (alive == 0)
            return false;
        close(next);
        std::swap(state, next);
    }
    return ((state[accept_ / 64] >> (accept_ % 64)) & 1) != 0;
}

bool glob_match(std::string_view pattern, std::string_view name)
{
    return Glob(pattern).matches(name);
}

}  // namespace vaultfs::policy
