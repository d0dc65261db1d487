// populate: fills an existing vault with COUNT secrets x VERSIONS versions,
// encrypted exactly as the daemon does (a fresh DEK per version, sealed by
// the token), in one transaction. For the listing and footprint
// benchmarks; run while the daemon is stopped.
//
//   populate STATE VAULT COUNT VERSIONS
#include <cstdio>
#include <cstdlib>
#include <string>

#include "hsm/secure_buffer.hpp"
#include "vault/crypto/envelope.hpp"
#include "vault/state/state.hpp"

using namespace vaultfs;

int main(int argc, char** argv)
{
    if (argc != 5) {
        std::fprintf(stderr, "usage: populate STATE VAULT COUNT VERSIONS\n");
        return 2;
    }
    if (auto heap = hsm::init_secure_heap(1 << 20); !heap)
        return std::fprintf(stderr, "%s\n", heap.error().message.c_str()), 1;
    auto state = vault::State::open(argv[1], vault::State::Purpose::inspect);
    if (!state)
        return std::fprintf(stderr, "%s\n", state.error().message.c_str()), 1;
    auto& store = *(*state)->store;
    auto& keys = *(*state)->keys;
    auto row = store.vault_by_name(argv[2]);
    if (!row || !*row)
        return std::fprintf(stderr, "no vault %s\n", argv[2]), 1;
    const vault::VaultRow v = **row;
    const long count = std::atol(argv[3]);
    const long versions = std::atol(argv[4]);
    const std::string value(64, 'p');
    auto plain = hsm::SecureBuffer::copy_of({reinterpret_cast<const std::uint8_t*>(value.data()), value.size()});

    auto r = store.write([&](vault::Store::Transaction& tx) -> vault::Result<void> {
        const vault::Micros now = vault::now_micros();
        for (long i = 0; i < count; ++i) {
            const std::string name = "secret-" + std::to_string(i);
            auto s = tx.ensure_secret(v.id, name, now, 0);
            if (!s)
                return tl::unexpected(s.error());
            for (long n = 0; n < versions; ++n) {
                auto number = tx.allocate_version(s->id);
                if (!number)
                    return tl::unexpected(number.error());
                const vault::Binding b{v.id, name, *number, v.kek_id};
                auto dek = vault::new_dek();
                auto sealed_dek = keys.seal(hsm::KeyId{v.kek_id}, *dek, vault::dek_aad(b));
                auto sealed = vault::seal_value(*dek, plain->bytes(), vault::value_aad(b));
                if (!sealed_dek || !sealed)
                    return vault::fail(vault::Errc::storage, "sealing failed");
                vault::SealedVersion row{
                    vault::VersionRow{{}, s->id, *number, value.size(), now, now, 0, true, {}, {}, {}},
                    v.kek_id, std::move(sealed->nonce), std::move(sealed->ciphertext), std::move(*sealed_dek)};
                if (auto ins = tx.insert_version(row); !ins)
                    return tl::unexpected(ins.error());
            }
        }
        return {};
    });
    if (!r)
        return std::fprintf(stderr, "%s\n", r.error().message.c_str()), 1;
    return 0;
}
