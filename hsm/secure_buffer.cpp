#include "hsm/secure_buffer.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <mutex>

namespace vaultfs::hsm {

namespace {
std::mutex heap_mutex;
std::size_t heap_size = 0;
}  // namespace

Result<void> init_secure_heap(std::size_t bytes)
{
    std::lock_guard lock(heap_mutex);
    if (heap_size != 0)
        return {};
    const std::size_t size = std::bit_ceil(std::max<std::size_t>(bytes, 64 * 1024));
    // 16-byte minimum blocks: DEKs are 32 bytes, so little is wasted.
    const int rc = CRYPTO_secure_malloc_init(size, 16);
    if (rc == 0)
        return fail(Errc::out_of_secure_memory,
                    "cannot map a " + std::to_string(size >> 10) + " KiB locked heap for secrets");
    if (rc == 2) {
        CRYPTO_secure_malloc_done();
        return fail(Errc::out_of_secure_memory,
                    "cannot lock " + std::to_string(size >> 10) +
                        " KiB of memory for secrets (mlock failed): raise RLIMIT_MEMLOCK "
                        "(ulimit -l, LimitMEMLOCK= in the unit) or run with CAP_IPC_LOCK");
    }
    heap_size = size;
    return {};
}

std::size_t secure_heap_used() { return CRYPTO_secure_used(); }

std::size_t secure_heap_size()
{
    std::lock_guard lock(heap_mutex);
    return heap_size;
}

namespace {

// Returns locked memory or nullptr. OpenSSL falls back to the ordinary heap
// when the secure heap is full or absent; such a block is wiped and refused.
std::uint8_t* locked_alloc(std::size_t n)
{
    void* p = CRYPTO_secure_zalloc(std::max<std::size_t>(n, 1), OPENSSL_FILE, OPENSSL_LINE);
    if (p == nullptr)
        return nullptr;
    if (CRYPTO_secure_allocated(p) == 0) {
        CRYPTO_secure_clear_free(p, n, OPENSSL_FILE, OPENSSL_LINE);
        return nullptr;
    }
    return static_cast<std::uint8_t*>(p);
}

void locked_free(std::uint8_t* p, std::size_t n)
{
    if (p != nullptr)
        CRYPTO_secure_clear_free(p, std::max<std::size_t>(n, 1), OPENSSL_FILE, OPENSSL_LINE);
}

Error heap_exhausted(std::size_t n)
{
    return Error{Errc::out_of_secure_memory,
                 "locked memory for secrets exhausted (" + std::to_string(n) + " bytes requested, " +
                     std::to_string(CRYPTO_secure_used()) + " in use)"};
}

}  // namespace

SecureBuffer::~SecureBuffer() { clear(); }

SecureBuffer::SecureBuffer(SecureBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0))
{
}

SecureBuffer& SecureBuffer::operator=(SecureBuffer&& other) noexcept
{
    if (this != &other) {
        clear();
        data_ = std::exchange(other.data_, nullptr);
        size_ = std::exchange(other.size_, 0);
        capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
}

Result<SecureBuffer> SecureBuffer::allocate(std::size_t size, std::size_t capacity)
{
    capacity = std::max(size, capacity);
    SecureBuffer b;
    b.data_ = locked_alloc(capacity);
    if (b.data_ == nullptr)
        return tl::unexpected(heap_exhausted(capacity));
    b.size_ = size;
    b.capacity_ = capacity;
    return b;
}

Result<SecureBuffer> SecureBuffer::copy_of(std::span<const std::uint8_t> bytes)
{
    auto b = allocate(bytes.size());
    if (b && !bytes.empty())
        std::memcpy(b->data(), bytes.data(), bytes.size());
    return b;
}

Result<void> SecureBuffer::resize(std::size_t size)
{
    if (size <= capacity_) {
        if (size < size_)
            OPENSSL_cleanse(data_ + size, size_ - size);
        else if (size > size_)
            std::memset(data_ + size_, 0, size - size_);
        size_ = size;
        return {};
    }
    const std::size_t grown = std::max(size, capacity_ * 2);
    std::uint8_t* bigger = locked_alloc(grown);
    if (bigger == nullptr)
        return tl::unexpected(heap_exhausted(grown));
    if (size_ != 0)
        std::memcpy(bigger, data_, size_);
    locked_free(data_, capacity_);
    data_ = bigger;
    size_ = size;
    capacity_ = grown;
    return {};
}

void SecureBuffer::clear()
{
    locked_free(data_, capacity_);
    data_ = nullptr;
    size_ = 0;
    capacity_ = 0;
}

bool SecureBuffer::equals(std::span<const std::uint8_t> other) const
{
    if (other.size() != size_)
        return false;
    return size_ == 0 || CRYPTO_memcmp(data_, other.data(), size_) == 0;
}

std::string SecureBuffer::redacted() const { return "<secret: " + std::to_string(size_) + " bytes>"; }

}  // namespace vaultfs::hsm
