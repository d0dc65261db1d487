// libFuzzer target for the xattr value parsers: times, booleans, content
// types and tags. No input crashes; an accepted time formats back to a time
// that parses to the same instant.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "vault/model/attributes.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    if (const auto t = vaultfs::vault::parse_rfc3339(text)) {
        const auto again = vaultfs::vault::parse_rfc3339(vaultfs::vault::format_rfc3339(*t));
        if (!again || *again != *t)
            std::abort();
    }
    if (const auto b = vaultfs::vault::parse_bool(text); b && vaultfs::vault::format_bool(*b) != text)
        std::abort();
    (void)vaultfs::vault::is_valid_content_type(text);
    (void)vaultfs::vault::is_valid_tag_name(text);
    (void)vaultfs::vault::is_valid_tag_value(text);
    return 0;
}
