// Source of 96-bit GCM nonces. Each nonce is 12 fresh bytes from OpenSSL's
// CSPRNG; they are fetched a pool at a time so the DRBG's per-call cost is paid
// once per ~340 values. A pool is never used by two processes: a fork (as the
// postmaster does for every backend) discards it, so nonces never repeat
// across processes that share an ancestor.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pgphi {

class NonceSource {
public:
    static constexpr size_t kNonceSize = 12;

    NonceSource();
    NonceSource(const NonceSource&) = delete;
    NonceSource& operator=(const NonceSource&) = delete;

    void next(uint8_t* out);

private:
    void refill();

    static constexpr size_t kPoolNonces = 341; // 4092 bytes
    uint8_t pool_[kPoolNonces * kNonceSize];
    size_t next_offset_;
    unsigned fork_generation_;
};

} // namespace pgphi
