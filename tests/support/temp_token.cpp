#include "temp_token.hpp"

#include <stdexcept>
#include <filesystem>
#include <fstream>

#include <unistd.h>

namespace vaultfs::testing {

TempDir::TempDir()
{
    std::string tmpl = (std::filesystem::temp_directory_path() / "vaultfs-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr)
        throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
}

TempDir::~TempDir()
{
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
}

hsm::SecureBuffer secure(const std::string& text)
{
    return hsm::SecureBuffer::copy_of({reinterpret_cast<const std::uint8_t*>(text.data()), text.size()}).value();
}

TempToken::TempToken()
{
    std::filesystem::create_directory(dir_ / "tokens");
    std::ofstream(dir_ / "softhsm2.conf") << "directories.tokendir = " << (dir_ / "tokens") << "\n"
                                          << "objectstore.backend = file\nlog.level = ERROR\n";
    env_.emplace_back("SOFTHSM2_CONF", dir_ / "softhsm2.conf");
    auto r = hsm::initialise_token(VAULTFS_SOFTHSM_MODULE, env_, label, secure(so_pin), secure(pin));
    if (!r)
        throw std::runtime_error("cannot initialise the test token: " + r.error().message);
}

hsm::Result<std::unique_ptr<hsm::Pkcs11KeyService>> TempToken::open(const std::string& pin_text,
                                                                    std::optional<hsm::Schemes> schemes) const
{
    return hsm::Pkcs11KeyService::open(
        hsm::Pkcs11Config{VAULTFS_SOFTHSM_MODULE, label, secure(pin_text), env_, schemes});
}

}  // namespace vaultfs::testing
