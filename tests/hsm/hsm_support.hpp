// Test support for the hsm tests: byte strings and fresh DEKs.
#pragma once

#include <catch2/catch.hpp>

#include <openssl/rand.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"

namespace vaultfs::hsm {

inline std::vector<std::uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

// A random data key, as the vault layer makes one.
inline SecureBuffer random_dek()
{
    auto dek = SecureBuffer::allocate(dek_size);
    REQUIRE(dek);
    REQUIRE(RAND_bytes(dek->data(), static_cast<int>(dek->size())) == 1);
    return std::move(*dek);
}

}  // namespace vaultfs::hsm
