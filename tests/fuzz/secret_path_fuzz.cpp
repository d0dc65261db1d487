// libFuzzer target for secret and vault names and `S@N` parsing: no input
// crashes, and every accepted path re-renders to the same text.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "vault/model/names.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    (void)vaultfs::vault::is_valid_vault_name(text);
    const auto path = vaultfs::vault::parse_secret_path(text);
    if (!path)
        return 0;
    if (!vaultfs::vault::is_valid_secret_name(path->name))
        std::abort();
    const std::string rendered =
        std::string(path->name) + (path->version ? "@" + std::to_string(*path->version) : std::string());
    if (rendered != text) {
        std::fprintf(stderr, "accepted '%.*s' but it renders as '%s'\n", static_cast<int>(size), text.data(),
                     rendered.c_str());
        std::abort();
    }
    if (path->version && *path->version == 0)
        std::abort();
    return 0;
}
