#include "nonce.hpp"

#include <atomic>
#include <cstring>
#include <mutex>

#include <pthread.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "error.hpp"

namespace pgphi {

namespace {

// Bumped in every child after fork(); a pool filled under another generation
// belongs to the parent and must not be reused.
std::atomic<unsigned> g_fork_generation{0};

void on_fork_child() { g_fork_generation.fetch_add(1, std::memory_order_relaxed); }

void register_fork_handler()
{
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, on_fork_child); });
}

} // namespace

NonceSource::NonceSource() : next_offset_(sizeof(pool_)), fork_generation_(0)
{
    register_fork_handler();
}

void NonceSource::refill()
{
    if (RAND_bytes(pool_, sizeof(pool_)) != 1)
        throw Error(ErrorCode::Internal, "could not draw random nonces from OpenSSL");
    next_offset_ = 0;
    fork_generation_ = g_fork_generation.load(std::memory_order_relaxed);
}

void NonceSource::next(uint8_t* out)
{
    if (next_offset_ + kNonceSize > sizeof(pool_) ||
        fork_generation_ != g_fork_generation.load(std::memory_order_relaxed))
        refill();
    std::memcpy(out, pool_ + next_offset_, kNonceSize);
    // A handed-out nonce is wiped from the pool so no later read can repeat it.
    OPENSSL_cleanse(pool_ + next_offset_, kNonceSize);
    next_offset_ += kNonceSize;
}

} // namespace pgphi
