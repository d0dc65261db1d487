// policy: the access-policy language of a vault — parser, canonical printer
// and a pure evaluator. No I/O, no FUSE, no knowledge of storage or keys.
//
// Grammar (one rule per line; `#` starts a comment; blank lines are allowed):
//
//   rule        := effect WS principal WS permissions [WS glob]
//   effect      := "allow" | "deny"
//   principal   := "uid:" N | "user:" NAME | "gid:" N | "group:" NAME | "any"
//   permissions := "*" | perm ("," perm)*
//   perm        := get | list | set | delete | recover | purge | backup
//                  | restore | manage
//                  | create | rotate | sign | decrypt | unwrap | certificates
//
// The same names serve the three object kinds (docs/keys-and-certificates.md "Certificates and
// keys"): `get` reads a secret's value, a key's public half, or anything
// of a certificate (its private key and bundles included); `certificates`
// reads a certificate's public files only (cert.pem, chain.pem, ca.pem,
// status). `create` makes (and imports, merges) keys and certificates,
// `rotate` gives them a new version (a key rotation, a certificate
// renewal); `sign`, `decrypt` and `unwrap` use a key's private half.
//   glob        := secret-name pattern with `*` (any run) and `?` (one char)
//
// Evaluation: deny wins over allow; nothing is allowed unless a rule allows
// it. A rule with a glob applies only to operations on a named secret whose
// name the glob matches; a rule without one covers the whole vault.
//
// Names are resolved to ids when a policy is parsed (that is, when it is
// written), through a NameResolver the caller supplies, so this module stays
// pure. The canonical form prints ids: `user:alice` reads back as
// `uid:1001`. print(parse(x)) parses to an equal policy.
//
// Thread-safety: a Policy is immutable after parsing; share it freely.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <tl/expected.hpp>

namespace vaultfs::policy {

enum class Permission : std::uint16_t {
    get = 1 << 0,
    list = 1 << 1,
    set = 1 << 2,
    remove = 1 << 3,  // spelled `delete` in the language
    recover = 1 << 4,
    purge = 1 << 5,
    backup = 1 << 6,
    restore = 1 << 7,
    manage = 1 << 8,
    create = 1 << 9,
    rotate = 1 << 10,
    sign = 1 << 11,
    decrypt = 1 << 12,
    unwrap = 1 << 13,
    certificates = 1 << 14,
};

// A set of permissions as a bit mask of Permission values.
class PermissionSet {
public:
    constexpr PermissionSet() = default;
    constexpr explicit PermissionSet(std::uint16_t bits) : bits_(bits) {}
    constexpr PermissionSet(Permission p) : bits_(static_cast<std::uint16_t>(p)) {}  // NOLINT

    static constexpr PermissionSet all() { return PermissionSet(0x7fff); }

    constexpr bool contains(Permission p) const { return (bits_ & static_cast<std::uint16_t>(p)) != 0; }
    constexpr bool empty() const { return bits_ == 0; }
    constexpr std::uint16_t bits() const { return bits_; }
    constexpr PermissionSet operator|(PermissionSet o) const { return PermissionSet(bits_ | o.bits_); }
    constexpr PermissionSet operator&(PermissionSet o) const { return PermissionSet(bits_ & o.bits_); }
    constexpr PermissionSet without(PermissionSet o) const { return PermissionSet(bits_ & ~o.bits_ & 0x7fff); }
    constexpr bool operator==(const PermissionSet&) const = default;

private:
    std::uint16_t bits_ = 0;
};

// The language's spelling of one permission ("get", "delete", ...).
std::string_view to_string(Permission p);
// "*" for all of them, otherwise comma-separated in declaration order.
std::string to_string(PermissionSet s);

// Who is asking, as the kernel reported it. The pid is deliberately absent:
// it is never a basis for an allow decision.
struct Subject {
    uid_t uid = 0;
    gid_t gid = 0;
    std::vector<gid_t> groups;  // supplementary groups
    // False when the supplementary groups could not be read (the caller has
    // no pid in the daemon's pid namespace, or /proc did not answer). Then
    // any decision a gid rule naming another group could change is a deny:
    // see Policy::evaluate.
    bool groups_known = true;

    bool in_group(gid_t g) const;
};

struct Principal {
    enum class Kind : std::uint8_t { uid, gid, any };
    Kind kind = Kind::any;
    std::uint32_t id = 0;  // uid or gid; unused for `any`

    bool matches(const Subject& s) const;
    bool operator==(const Principal&) const = default;
};

// A secret-name pattern: `*` matches any run of characters (including
// none), `?` exactly one. Compiled once into a bit-parallel automaton, so a
// match takes time linear in the name whatever the pattern (a policy's
// globs are at most 127 characters: two 64-bit words per name character).
class Glob {
public:
    explicit Glob(std::string_view pattern);
    const std::string& text() const { return text_; }
    bool matches(std::string_view name) const;
    bool operator==(const Glob& other) const { return text_ == other.text_; }

private:
    std::string text_;
    std::size_t accept_ = 0;  // the final state: the pattern's length with runs of '*' collapsed
    std::size_t words_ = 0;
    std::vector<std::uint64_t> star_;  // states at a '*'
    std::vector<std::uint64_t> any_;   // states at a '?'
    std::vector<std::uint64_t> literal_;  // words_ per distinct byte of the pattern
    std::vector<std::uint8_t> slot_;      // byte -> 1 + its index in literal_, 0: not in the pattern
    // For patterns of at most 127 states (every policy glob): per slot, the
    // states that accept such a byte, as two words (low, high).
    std::vector<std::uint64_t> accepts_;
};

struct Rule {
    bool allow = true;
    Principal principal;
    PermissionSet permissions;
    std::optional<Glob> glob;  // absent: the whole vault

    bool operator==(const Rule&) const = default;
};

struct ParseError {
    int line = 0;        // 1-based line of the offending input
    std::string reason;  // e.g. "unknown permission 'red'"

    // "line 3: unknown permission 'red'"
    std::string message() const;
};

// Resolves user and group names at parse time. Returns nullopt when the name
// does not exist, which rejects the whole policy.
class NameResolver {
public:
    virtual ~NameResolver() = default;
    virtual std::optional<uid_t> user_id(std::string_view name) const = 0;
    virtual std::optional<gid_t> group_id(std::string_view name) const = 0;
    // Whether the uid is a user the system knows, and whether the group has
    // members (listed, or users whose primary group it is). For the check
    // that someone can manage a vault.
    virtual bool user_exists(uid_t uid) const = 0;
    virtual bool group_has_members(gid_t gid) const = 0;
};

// The outcome of one evaluation. `rule_line` is the 1-based line of the
// canonical text that decided (the deny that won, or the first allow that
// granted); 0 means nothing matched and the default deny applied.
struct Decision {
    bool allowed = false;
    int rule_line = 0;
    std::string rule_text;  // canonical text of that line, empty for default deny
    // Denied because the caller's groups are unknown and a gid rule could
    // have changed the answer (Subject::groups_known).
    bool groups_unknown = false;
};

class Policy {
public:
    Policy() = default;  // the empty policy: denies everything

    // Parses policy text. Any error rejects the whole text.
    // Limits: at most 1000 rules, lines at most 4096 bytes, globs at most
    // 127 characters (a secret name's length).
    // Rules that could never take effect are errors too in text being
    // written: a glob with a vault-wide permission (list, manage), an allow
    // whose every permission a glob-less deny takes from everyone it names.
    // Text read back from storage was accepted when written (perhaps under
    // older rules) and is not held to them again.
    enum class Origin { written, stored };
    static tl::expected<Policy, ParseError> parse(std::string_view text, const NameResolver& names,
                                                  Origin origin = Origin::written);

    // Checks one line (without its '\n'; `number` is its line number) the
    // way parse() would, for text that arrives a line at a time: what only
    // the whole text can show (the rule count, shadowed rules, who may
    // manage) is left to parse().
    static tl::expected<void, ParseError> check_line(std::string_view line, int number, const NameResolver& names);

    // A policy granting `*` on the whole vault to one uid (a new vault's).
    static Policy owner_only(uid_t owner);

    // Canonical text: one rule per line, each line ending in '\n', ids not
    // names, permissions in declaration order, single spaces.
    std::string print() const;

    const std::vector<Rule>& rules() const { return rules_; }

    // Decides `wanted` for `who`. `secret` names the secret the operation
    // touches; nullopt for vault-level operations (list, manage, ...), which
    // only glob-less rules can grant or deny. When who.groups_known is
    // false, the answer is decided twice -- as if the caller were in no
    // supplementary group and as if in every one -- and is an allow only if
    // both allow (otherwise groups_unknown tells why it is a deny).
    Decision evaluate(const Subject& who, Permission wanted, std::optional<std::string_view> secret = std::nullopt) const;

    // Every permission `who` holds on `secret` (or vault-wide when nullopt),
    // after denies. Used to show a caller's access in file modes. With
    // unknown groups, only what holds either way.
    PermissionSet effective(const Subject& who, std::optional<std::string_view> secret = std::nullopt) const;

    // True when some allow rule grants `who` at least one permission that no
    // glob-less deny for `who` takes away — "holds any permission in the
    // vault", which decides whether the vault is visible at all. With
    // unknown groups, if it holds either way (visibility shows names, not
    // values; the decisions inside are conservative).
    bool holds_any(const Subject& who) const;

    // Whether someone could manage the vault under this policy: a glob-less
    // allow of `manage` whose principal has members (`any`, a user that
    // exists, a group with members) and still holds manage after the denies.
    // A policy without one would leave the vault unmanageable for ever.
    bool someone_can_manage(const NameResolver& names) const;

    bool operator==(const Policy&) const = default;

private:
    std::vector<Rule> rules_;
};

// `*` matches any run of characters (including none), `?` exactly one.
bool glob_match(std::string_view pattern, std::string_view name);

}  // namespace vaultfs::policy
