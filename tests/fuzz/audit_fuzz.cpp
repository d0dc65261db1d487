// libFuzzer target for the audit format and verifier: whatever bytes an
// audit file holds, parsing a line either fails with a reason or yields a
// record whose hash is over its body, and verifying never crashes and
// never calls a file of unsigned lines intact beyond the coverage bound.
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "vault/audit/format.hpp"
#include "vault/audit/verify.hpp"
#include "vault/crypto/signing.hpp"

namespace {

// A fixed P-256 public key: no input can carry a valid signature for it.
const char* const key_pem =
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE7XmkyCmFebtFGQAkVMVKc7qQWIdP\n"
    "fPBHwWzaD6cLiKO+yAI5CDrWVctuAd7e+MrMEv0NJ7WYUYnoFcNC08Whuw==\n"
    "-----END PUBLIC KEY-----\n";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    using namespace vaultfs::vault;
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    std::vector<std::string> lines;
    std::size_t pos = 0;
    while (pos <= input.size()) {
        const auto nl = input.find('\n', pos);
        lines.emplace_back(input.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos));
        if (nl == std::string_view::npos)
            break;
        pos = nl + 1;
    }
    for (const auto& line : lines) {
        auto r = audit::parse(line);
        if (!r) {
            if (r.error().empty())
                std::abort();
            continue;
        }
        if (sha256_hex(r->body) != r->hash || (r->is_signed() && r->sig.size() != 64 && r->sig.size() != 384))
            std::abort();
    }
    static const SignatureVerifier key(key_pem);
    if (!key.usable())
        std::abort();
    const auto rep = audit::verify_tail("fuzz", lines, 1, key_pem, audit::VerifyOptions{});
    // The first record must be signed, and nothing here is: never intact.
    if (rep.ok)
        std::abort();
    return 0;
}
