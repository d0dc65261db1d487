// Unit tests for vault/names: which secret and vault names are valid, and
// how strictly `S@N` is parsed (docs/design.md §1).
#include "vault/model/names.hpp"

#include <catch2/catch.hpp>

#include <string>

namespace vaultfs::vault {
namespace {

TEST_CASE("a plain name parses as the current version", "[names]")
{
    for (const std::string& component : {std::string("S"), std::string("db-password"), std::string("A1-b2"), std::string(127, 'x')}) {
        INFO(component);
        const auto p = parse_secret_path(component);
        REQUIRE(p);
        CHECK(p->name == component);
        CHECK_FALSE(p->version);
    }
}

TEST_CASE("S@N parses N as a positive decimal that fits in 63 bits", "[names]")
{
    struct Case {
        const char* component;
        const char* name;
        std::uint64_t version;
    };
    const Case cases[] = {
        {"S@1", "S", 1},
        {"S@9", "S", 9},
        {"S@10", "S", 10},
        {"db-password@42", "db-password", 42},
        {"S@9223372036854775807", "S", 9223372036854775807ull},  // INT64_MAX
    };
    for (const auto& c : cases) {
        INFO(c.component);
        const auto p = parse_secret_path(c.component);
        REQUIRE(p);
        CHECK(p->name == c.name);
        REQUIRE(p->version);
        CHECK(*p->version == c.version);
    }
}

TEST_CASE("S@N rejects anything but a strict version number", "[names]")
{
    const std::string rejected[] = {
        "S@0",                     // versions start at 1
        "S@01",                    // leading zero
        "S@00",
        "S@-1",                    // sign
        "S@+1",
        "S@ 1",                    // whitespace
        "S@1 ",
        "S@1@2",                   // two @
        "S@",                      // no number
        "S@@1",
        "@1",                      // no name
        "@",
        "S@99999999999999999999",  // does not fit in 64 bits
        "S@18446744073709551615",  // UINT64_MAX: above what SQLite stores
        "S@9223372036854775808",   // INT64_MAX + 1
        "S@0x1",
        "S@1e3",
        "S@1.0",
        "S@\xd9\xa1",              // ARABIC-INDIC DIGIT ONE
        "bad_name@1",              // the name part must be valid too
        std::string(128, 'x') + "@1",
    };
    for (const auto& component : rejected) {
        INFO(component);
        CHECK_FALSE(parse_secret_path(component));
    }
    // An embedded NUL is not a digit either.
    CHECK_FALSE(parse_secret_path(std::string("S@1\0", 4)));
    CHECK_FALSE(parse_secret_path(std::string("S\0@1", 4)));
}

TEST_CASE("secret names are 1-127 characters of [0-9A-Za-z-]", "[names]")
{
    const std::string valid[] = {"a", "Z", "0", "-", "db-password", "ABC-def-123", std::string(127, 'a'),
                                 "0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ"};
    for (const auto& name : valid) {
        INFO(name);
        CHECK(is_valid_secret_name(name));
    }
    const std::string invalid[] = {
        "",
        std::string(128, 'a'),
        "a_b",
        "a.b",
        ".policy",
        "a b",
        " a",
        "a@1",
        "a/b",
        "caf\xc3\xa9",  // UTF-8 é
        "\xe2\x80\x8b",  // zero-width space
        "tab\t",
        "new\nline",
        std::string("nul\0byte", 8),
    };
    for (const auto& name : invalid) {
        INFO(name);
        CHECK_FALSE(is_valid_secret_name(name));
    }
}

TEST_CASE("vault names are 3-24 characters, start with a letter, end alphanumeric, no double hyphen", "[names]")
{
    const std::string valid[] = {"abc", "payments", "Pay-Ments-2", "a-b-c", "a1b", std::string(24, 'v'), "AB9"};
    for (const auto& name : valid) {
        INFO(name);
        CHECK(is_valid_vault_name(name));
    }
    const std::string invalid[] = {
        "",
        "ab",                   // too short
        std::string(25, 'v'),   // too long
        "1abc",                 // starts with a digit
        "-abc",                 // starts with a hyphen
        "abc-",                 // ends with a hyphen
        "a--b",                 // double hyphen
        "ab_c",
        "ab.c",
        "ab c",
        "ab@1",
        "caf\xc3\xa9",
    };
    for (const auto& name : invalid) {
        INFO(name);
        CHECK_FALSE(is_valid_vault_name(name));
    }
}

}  // namespace
}  // namespace vaultfs::vault
