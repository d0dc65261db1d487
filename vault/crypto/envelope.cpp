#include "vault/crypto/envelope.hpp"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <memory>

namespace vaultfs::vault {

namespace {

struct CipherCtxFree {
    void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree>;

void put_u64(std::vector<std::uint8_t>& out, std::uint64_t v)
{
    for (int i = 7; i >= 0; --i)
        out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

void put_string(std::vector<std::uint8_t>& out, std::string_view s)
{
    put_u64(out, s.size());
    out.insert(out.end(), s.begin(), s.end());
}

std::vector<std::uint8_t> aad_with_label(std::string_view label, const Binding& b)
{
    std::vector<std::uint8_t> out;
    out.reserve(64 + b.secret.size() + b.kek_id.size());
    put_string(out, label);
    put_u64(out, static_cast<std::uint64_t>(b.vault.value));
    put_string(out, b.secret);
    put_u64(out, b.version);
    put_string(out, b.kek_id);
    return out;
}

Error crypto_failure(const char* what) { return Error{Errc::storage, std::string("OpenSSL ") + what + " failed"}; }

// Fetched once: an implicit fetch by EVP_aes_256_gcm() costs a provider
// lookup on every init.
const EVP_CIPHER* aes_256_gcm()
{
    static EVP_CIPHER* const cipher = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
    return cipher;
}

}  // namespace

std::vector<std::uint8_t> value_aad(const Binding& b) { return aad_with_label("vaultfs/value/v1", b); }
std::vector<std::uint8_t> dek_aad(const Binding& b) { return aad_with_label("vaultfs/dek/v1", b); }

Result<hsm::SecureBuffer> new_dek()
{
    auto dek = hsm::SecureBuffer::allocate(hsm::dek_size);
    if (!dek)
        return fail(Errc::out_of_memory, dek.error().message);
    if (RAND_priv_bytes(dek->data(), static_cast<int>(dek->size())) != 1)
        return tl::unexpected(crypto_failure("RAND_priv_bytes"));
    return std::move(*dek);
}

Result<SealedValue> seal_value(const hsm::SecureBuffer& dek, std::span<const std::uint8_t> plaintext,
                               std::span<const std::uint8_t> aad)
{
    if (dek.size() != hsm::dek_size)
        return fail(Errc::invalid_argument, "DEK must be 32 bytes");
    SealedValue out;
    out.nonce.resize(value_nonce_size);
    if (RAND_bytes(out.nonce.data(), value_nonce_size) != 1)
        return tl::unexpected(crypto_failure("RAND_bytes"));
    out.ciphertext.resize(plaintext.size() + value_tag_size);

    CipherCtx ctx(EVP_CIPHER_CTX_new());
    int len = 0;
    if (!ctx || EVP_EncryptInit_ex2(ctx.get(), aes_256_gcm(), dek.data(), out.nonce.data(), nullptr) != 1 ||
        EVP_EncryptUpdate(ctx.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1 ||
        EVP_EncryptUpdate(ctx.get(), out.ciphertext.data(), &len, plaintext.data(),
                          static_cast<int>(plaintext.size())) != 1 ||
        EVP_EncryptFinal_ex(ctx.get(), out.ciphertext.data() + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, value_tag_size,
                            out.ciphertext.data() + plaintext.size()) != 1)
        return tl::unexpected(crypto_failure("AES-256-GCM encryption"));
    return out;
}

Result<hsm::SecureBuffer> open_value(const hsm::SecureBuffer& dek, std::span<const std::uint8_t> nonce,
                                     std::span<const std::uint8_t> ciphertext, std::span<const std::uint8_t> aad)
{
    if (dek.size() != hsm::dek_size || nonce.size() != value_nonce_size || ciphertext.size() < value_tag_size)
        return fail(Errc::integrity, "stored value has a malformed nonce or ciphertext");
    const std::size_t size = ciphertext.size() - value_tag_size;
    auto plain = hsm::SecureBuffer::allocate(size);
    if (!plain)
        return fail(Errc::out_of_memory, plain.error().message);

    CipherCtx ctx(EVP_CIPHER_CTX_new());
    int len = 0;
    if (!ctx || EVP_DecryptInit_ex2(ctx.get(), aes_256_gcm(), dek.data(), nonce.data(), nullptr) != 1 ||
        EVP_DecryptUpdate(ctx.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1 ||
        EVP_DecryptUpdate(ctx.get(), plain->data(), &len, ciphertext.data(), static_cast<int>(size)) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, value_tag_size,
                            const_cast<std::uint8_t*>(ciphertext.data() + size)) != 1)
        return tl::unexpected(crypto_failure("AES-256-GCM decryption"));
    if (EVP_DecryptFinal_ex(ctx.get(), plain->data() + len, &len) != 1)
        return fail(Errc::integrity, "stored value failed authentication");
    return std::move(*plain);
}

}  // namespace vaultfs::vault
