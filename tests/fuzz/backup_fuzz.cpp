// libFuzzer target for the backup format: any input either fails with a
// message or parses to secrets with valid names and version numbers.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "vault/backup/format.hpp"
#include "vault/model/names.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    auto doc = vaultfs::vault::parse_backup(std::string_view(reinterpret_cast<const char*>(data), size));
    if (!doc) {
        if (doc.error().message.empty())
            std::abort();
        return 0;
    }
    for (const auto& s : doc->secrets) {
        if (!vaultfs::vault::is_valid_secret_name(s.name))
            std::abort();
        for (const auto& v : s.versions)
            if (v.meta.number == 0 || v.meta.number >= s.next_version)
                std::abort();
    }
    return 0;
}
