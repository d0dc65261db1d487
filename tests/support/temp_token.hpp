// Test support: a temporary directory, and a real SoftHSM2 token in one.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "hsm/pkcs11/key_service.hpp"

namespace vaultfs::testing {

// A fresh directory under $TMPDIR, removed with everything in it.
class TempDir {
public:
    TempDir();
    ~TempDir();
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    const std::string& path() const { return path_; }
    std::string operator/(const std::string& name) const { return path_ + "/" + name; }

private:
    std::string path_;
};

// An initialised SoftHSM2 token labelled "vaultfs-test" in its own directory.
class TempToken {
public:
    TempToken();
    static constexpr const char* label = "vaultfs-test";
    static constexpr const char* pin = "test-user-pin-1234";
    static constexpr const char* so_pin = "test-so-pin-5678";

    const std::vector<std::pair<std::string, std::string>>& environment() const { return env_; }
    // Logs in with `pin_text` (the right PIN by default), with the given
    // constructions (mechanisms.hpp) or, by default, the ones SoftHSM2
    // negotiates (AES-GCM, ECDSA P-256).
    hsm::Result<std::unique_ptr<hsm::Pkcs11KeyService>> open(const std::string& pin_text = pin,
                                                             std::optional<hsm::Schemes> schemes = std::nullopt) const;
    const TempDir& dir() const { return dir_; }

private:
    TempDir dir_;
    std::vector<std::pair<std::string, std::string>> env_;
};

hsm::SecureBuffer secure(const std::string& text);

}  // namespace vaultfs::testing
