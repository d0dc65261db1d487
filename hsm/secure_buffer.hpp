// SecureBuffer: the only type that holds secret bytes (plaintext values and
// unsealed DEKs). Its memory comes from OpenSSL's secure heap: mlocked (never
// swapped), excluded from core dumps, with guard pages, and cleansed when
// freed. An allocation that would not be locked fails instead of falling back
// to ordinary memory.
//
// Thread-safety: distinct buffers may be used from different threads; one
// buffer is not synchronised. The heap itself is thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "hsm/error.hpp"

namespace vaultfs::hsm {

// Sets up the locked heap once per process. `bytes` is rounded up to a power
// of two. Fails (with a message that says what to do) when the memory cannot
// be mapped or locked, for example under a low RLIMIT_MEMLOCK. Calling it
// again after success does nothing and succeeds.
Result<void> init_secure_heap(std::size_t bytes);

// Bytes of the locked heap in use, and its size (0 before init).
std::size_t secure_heap_used();
std::size_t secure_heap_size();

class SecureBuffer {
public:
    SecureBuffer() = default;
    ~SecureBuffer();
    SecureBuffer(SecureBuffer&& other) noexcept;
    SecureBuffer& operator=(SecureBuffer&& other) noexcept;
    SecureBuffer(const SecureBuffer&) = delete;
    SecureBuffer& operator=(const SecureBuffer&) = delete;

    // A zero-filled buffer of `size` bytes with room for `capacity` (>= size).
    static Result<SecureBuffer> allocate(std::size_t size, std::size_t capacity = 0);
    // A copy of `bytes` in locked memory.
    static Result<SecureBuffer> copy_of(std::span<const std::uint8_t> bytes);

    std::uint8_t* data() { return data_; }
    const std::uint8_t* data() const { return data_; }
    std::size_t size() const { return size_; }
    std::size_t capacity() const { return capacity_; }
    bool empty() const { return size_ == 0; }
    std::span<const std::uint8_t> bytes() const { return {data_, size_}; }
    std::span<std::uint8_t> bytes() { return {data_, size_}; }

    // Changes the size. Growing beyond capacity moves the bytes to a larger
    // locked block and wipes the old one; new bytes are zero. Shrinking wipes
    // the bytes cut off.
    Result<void> resize(std::size_t size);
    // Wipes and releases the memory; the buffer becomes empty.
    void clear();

    // Constant-time comparison (for tests and integrity checks).
    bool equals(std::span<const std::uint8_t> other) const;

    // Never prints the content: "<secret: N bytes>".
    std::string redacted() const;

private:
    std::uint8_t* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
};

}  // namespace vaultfs::hsm
