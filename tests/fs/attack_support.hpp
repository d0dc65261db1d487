// What the attack tests share (tests/fs/attack*_test.cpp): reading and
// rewriting the audit file, forging records, counting them, and SQL on a
// stopped daemon's database.
#pragma once

#include <catch2/catch.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include "fs_support.hpp"

namespace vaultfs::testing::attack {

using json = nlohmann::json;

inline std::vector<std::string> lines_of(const std::string& path)
{
    std::vector<std::string> lines;
    std::istringstream in(slurp(path));
    for (std::string line; std::getline(in, line);)
        lines.push_back(line);
    return lines;
}

inline void write_lines(const std::string& path, const std::vector<std::string>& lines)
{
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    for (const auto& l : lines)
        out << l << '\n';
}

// The original text written to a file of its own, for lines_of().
inline std::string original_path(const Mount& m, const std::string& text)
{
    const std::string path = m.root + "/original.jsonl";
    std::ofstream(path, std::ios::trunc) << text;
    return path;
}

inline std::size_t count(const std::vector<json>& records, const std::string& op,
                         std::optional<uid_t> uid = std::nullopt)
{
    std::size_t n = 0;
    for (auto r : records)
        n += r.value("op", "") == op && (!uid || r.value("uid", -1) == static_cast<std::int64_t>(*uid)) ? 1 : 0;
    return n;
}

// Runs one SQL statement on the state's database (the daemon stopped).
inline void sql(const Mount& m, const std::string& statement)
{
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(m.state_file("vault.db").c_str(), &db) == SQLITE_OK);
    char* err = nullptr;
    const int rc = sqlite3_exec(db, statement.c_str(), nullptr, nullptr, &err);
    INFO(statement << ": " << (err != nullptr ? err : ""));
    sqlite3_free(err);
    sqlite3_close(db);
    REQUIRE(rc == SQLITE_OK);
}

inline std::string sha256_hex(const std::string& data)
{
    unsigned char digest[32];
    unsigned int len = 0;
    EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr);
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (const unsigned char b : digest) {
        out += hex[b >> 4];
        out += hex[b & 15];
    }
    return out;
}

// What a forger without the token key writes: the record's fields as a
// JSON library prints them, linked to `prev`, with a hash over those bytes
// and no signature.
inline std::string forged(json r, const std::string& prev, std::string* hash)
{
    r.erase("hash");
    r.erase("sig");
    r["prev"] = prev;
    const std::string body = r.dump();
    *hash = sha256_hex(body);
    return body.substr(0, body.size() - 1) + ",\"hash\":\"" + *hash + "\"}";
}

}  // namespace vaultfs::testing::attack
