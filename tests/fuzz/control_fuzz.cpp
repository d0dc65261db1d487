// libFuzzer target for the control socket protocol: any request either
// fails with a reason or parses to one that renders and parses back the same.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "fs/control/protocol.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    using vaultfs::fs::parse_request;
    using vaultfs::fs::render_request;
    auto r = parse_request(std::string_view(reinterpret_cast<const char*>(data), size));
    if (!r) {
        if (r.error().empty())
            std::abort();
        return 0;
    }
    const auto again = parse_request(render_request(*r));
    if (!again || render_request(*again) != render_request(*r))
        std::abort();
    return 0;
}
