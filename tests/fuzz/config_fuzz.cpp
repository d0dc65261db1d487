// libFuzzer target for vaultfs.conf parsing: no input crashes, and every
// accepted config renders to text that parses to the same settings.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "vault/state/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    auto config = vaultfs::vault::parse_config(text, "/state");
    if (!config) {
        if (config.error().message.empty())
            std::abort();
        return 0;
    }
    const std::string rendered = vaultfs::vault::render_config(*config);
    auto again = vaultfs::vault::parse_config(rendered, "/state");
    if (!again || vaultfs::vault::render_config(*again) != rendered)
        std::abort();
    return 0;
}
