// libFuzzer target for policy/: any text either fails to parse or yields a
// policy whose canonical printing parses back to the same policy, and whose
// evaluator answers consistently. glob_match is also checked against a
// straightforward reference on short inputs.
#include "policy/policy.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using namespace vaultfs::policy;

class KnownNames : public NameResolver {
public:
    std::optional<uid_t> user_id(std::string_view name) const override
    {
        if (name == "alice")
            return 1001;
        if (name == "root")
            return 0;
        return std::nullopt;
    }
    std::optional<gid_t> group_id(std::string_view name) const override
    {
        if (name == "ops")
            return 2000;
        return std::nullopt;
    }
    bool user_exists(uid_t uid) const override { return uid == 0 || uid == 1001; }
    bool group_has_members(gid_t gid) const override { return gid == 2000; }
};

[[noreturn]] void fail(const char* what)
{
    std::fprintf(stderr, "policy_fuzz: invariant broken: %s\n", what);
    std::abort();
}

void require(bool ok, const char* what)
{
    if (!ok)
        fail(what);
}

const Permission every_permission[] = {
    Permission::get,    Permission::list,    Permission::set,     Permission::remove, Permission::recover,
    Permission::purge,  Permission::backup,  Permission::restore, Permission::manage,
};

// Quadratic dynamic-programming matcher: obviously right, too slow for
// production, fine for inputs of a few dozen bytes.
bool reference_glob_match(std::string_view pattern, std::string_view name)
{
    // row[j]: pattern[0..i) matches name[0..j)
    std::vector<bool> row(name.size() + 1, false);
    row[0] = true;
    for (const char p : pattern) {
        std::vector<bool> next(name.size() + 1, false);
        if (p == '*')
            next[0] = row[0];
        for (std::size_t j = 1; j <= name.size(); ++j) {
            if (p == '*')
                next[j] = row[j] || next[j - 1];
            else
                next[j] = row[j - 1] && (p == '?' || p == name[j - 1]);
        }
        row = std::move(next);
    }
    return row[name.size()];
}

// The nth line of the canonical text, without its '\n'.
std::string_view canonical_line(std::string_view canonical, int n)
{
    std::size_t start = 0;
    for (int i = 1; i < n; ++i)
        start = canonical.find('\n', start) + 1;
    return canonical.substr(start, canonical.find('\n', start) - start);
}

void check_evaluation(const Policy& policy, const std::string& canonical, const Subject& who,
                      std::optional<std::string_view> secret)
{
    const PermissionSet effective = policy.effective(who, secret);
    for (const Permission p : every_permission) {
        const Decision d = policy.evaluate(who, p, secret);
        require(effective.contains(p) == d.allowed, "effective() disagrees with evaluate()");
        require(d.rule_line >= 0 && static_cast<std::size_t>(d.rule_line) <= policy.rules().size(),
                "rule_line out of range");
        if (d.rule_line == 0) {
            require(!d.allowed && d.rule_text.empty(), "default decision is not an empty deny");
            continue;
        }
        const Rule& rule = policy.rules()[static_cast<std::size_t>(d.rule_line - 1)];
        require(rule.allow == d.allowed, "deciding rule has the other effect");
        require(rule.permissions.contains(p), "deciding rule does not cover the permission");
        require(rule.principal.matches(who), "deciding rule does not name the subject");
        require(d.rule_text == canonical_line(canonical, d.rule_line), "rule_text is not the canonical line");
    }
    // Only glob-less denies take a permission away from every secret, so a
    // subject without holds_any() can have nothing anywhere.
    if (!effective.empty())
        require(policy.holds_any(who), "a permission without holds_any()");
}

void check_policy(const Policy& policy, const NameResolver& names, std::string_view input)
{
    const std::string canonical = policy.print();
    const auto again = Policy::parse(canonical, names);
    if (!again) {
        std::fprintf(stderr, "canonical text rejected: %s\n%s", again.error().message().c_str(), canonical.c_str());
        fail("parse(print(p)) failed");
    }
    require(*again == policy, "parse(print(p)) != p");
    require(again->print() == canonical, "print() is not a fixed point");

    // A secret name taken from the input lets globs in the policy match.
    const std::string_view from_input = input.substr(0, std::min<std::size_t>(input.size(), 127));
    const std::optional<std::string_view> secrets[] = {std::nullopt, "db-prod", "a", from_input};
    const Subject subjects[] = {
        Subject{0, 0, {}},
        Subject{1001, 1001, {}},
        Subject{1001, 1001, {2000, 7}},
        Subject{42, 2000, {}},
        Subject{4294967294u, 4294967294u, {0}},
    };
    for (const Subject& who : subjects) {
        for (const auto& secret : secrets)
            check_evaluation(policy, canonical, who, secret);
    }
}

void check_glob(std::string_view input)
{
    const std::size_t split = input.find('\n');
    if (split == std::string_view::npos)
        return;
    const std::string_view pattern = input.substr(0, split);
    const std::string_view name = input.substr(split + 1);
    const bool fast = glob_match(pattern, name);
    if (pattern.size() <= 64 && name.size() <= 256)
        require(fast == reference_glob_match(pattern, name), "glob_match disagrees with the reference");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    static const KnownNames names;

    check_glob(input);
    const auto policy = Policy::parse(input, names);
    if (!policy) {
        require(policy.error().line >= 1, "error line is not 1-based");
        require(!policy.error().reason.empty(), "error without a reason");
        return 0;
    }
    check_policy(*policy, names, input);
    return 0;
}
