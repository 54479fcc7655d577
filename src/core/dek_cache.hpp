// The shared DEK cache's table and policy, independent of PostgreSQL: the
// glue (src/pg/shared_cache.cpp) places a Table in shared memory, guards it
// with an LWLock, and lets the key broker fill it.
//
// One slot per distinct wrapped DEK and key identity (so the same DEK
// restored into two databases, with its key ids, is one entry).
// A slot is Free, Pending (a backend asked; the broker will call the key
// manager), Ready (plaintext DEK present) or Failed (the key manager said no;
// waiters read the error). Plaintext is wiped whenever a slot is reused or
// evicted.
//
// Lifetimes: a Ready slot expires `ttl` after its last successful key-manager
// call. The broker re-validates slots that are in use before they expire
// (refresh-ahead). If the key manager is unreachable, a slot keeps serving
// until `grace` past its expiry; a denial evicts it at once.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "bytes.hpp"

namespace pgphi::cache {

inline constexpr size_t kDekSize = 32;
inline constexpr size_t kMaxWrapped = 1024;
inline constexpr size_t kMaxKekRef = 256;
inline constexpr size_t kMaxProvider = 16;
inline constexpr size_t kMaxKeyName = 64;
inline constexpr size_t kMaxError = 320;
inline constexpr size_t kMaxErrorDetail = 256;
inline constexpr size_t kMaxErrorHint = 192;

// A key manager's refusal, kept for the backends waiting on it.
struct FailureRecord {
    int32_t code;               // a pgphi::ErrorCode
    char message[kMaxError];
    char detail[kMaxErrorDetail];
    char hint[kMaxErrorHint];

    void set(int32_t code, const char* message, const char* detail, const char* hint);
    void clear() { code = 0; message[0] = detail[0] = hint[0] = '\0'; }
};

struct Digest {
    uint8_t bytes[32];
    bool operator==(const Digest& o) const;
};

struct UnwrapRequest;

// SHA-256 over the length-prefixed provider, KEK reference, key identity
// (id, version, name: what the key manager binds the DEK to) and wrapped DEK.
// A wrapped DEK copied to another key's catalog row is thus a different
// entry, and the key manager's binding check still runs for it.
// Throws (Internal, or std::bad_alloc) when OpenSSL fails, e.g. out of memory.
Digest digest_of(const UnwrapRequest& request);

// Test-only fault injection: the next digest_of() in this process throws
// std::bad_alloc, as it does when EVP_MD_CTX_new cannot allocate. Armed by
// the key broker when pgphi.test_fault = 'broker_digest'.
void fail_next_digest_for_testing();

enum class SlotState : uint8_t { Free, Pending, Ready, Failed };

// Everything the broker needs to call the key manager for a slot.
struct UnwrapRequest {
    char provider[kMaxProvider];
    char kek_ref[kMaxKekRef];
    char wrapped_by[kMaxKekRef];  // the catalog's kek_version of the DEK (KMS: the key ARN that wrapped it)
    char key_name[kMaxKeyName];
    uint32_t key_id;
    uint32_t key_version;
    uint16_t wrapped_size;
    uint8_t wrapped[kMaxWrapped];
};

struct Slot {
    Digest digest;
    uint32_t next_in_bucket;      // hash chain of slots whose digests share a bucket
    SlotState state;
    bool in_flight;               // the broker is calling the key manager for it
    uint64_t generation;          // changes whenever the slot's content changes
    int64_t expires_at_ms;        // Ready: end of the TTL
    int64_t serve_until_ms;       // Ready: expires_at_ms, or later during an outage
    int64_t next_attempt_ms;      // earliest next refresh after a failure
    std::atomic<int64_t> last_used_ms;
    uint8_t dek[kDekSize];
    FailureRecord failure;        // Failed: why
    UnwrapRequest request;
};

// Counters shown by pgphi.cache_stats; updated without the lock.
struct Stats {
    std::atomic<uint64_t> hits{0};               // found Ready in shared memory
    std::atomic<uint64_t> misses{0};             // had to ask the broker
    std::atomic<uint64_t> key_manager_calls{0};
    std::atomic<uint64_t> key_manager_errors{0};
    std::atomic<uint64_t> key_manager_micros{0}; // total time in key-manager calls
    std::atomic<uint64_t> refreshes{0};
    std::atomic<uint64_t> evictions{0};          // removed for space
    std::atomic<uint64_t> expirations{0};        // removed after TTL / grace / denial / flush
};

static_assert(std::atomic<int64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

// A view over `capacity` slots, followed by a hash index of bucket heads, in
// memory the caller owns (bytes_for(capacity) of it). Methods say which lock
// mode the caller must hold: shared (S) or exclusive (X).
class Table {
public:
    static constexpr uint32_t kNone = UINT32_MAX;

    Table(void* memory, uint32_t capacity)
        : slots_(static_cast<Slot*>(memory)), buckets_(reinterpret_cast<uint32_t*>(slots_ + capacity)),
          capacity_(capacity), bucket_count_(bucket_count_for(capacity))
    {
    }

    static uint32_t bucket_count_for(uint32_t capacity) { return capacity * 2; }
    static size_t bytes_for(uint32_t capacity)
    {
        return sizeof(Slot) * capacity + sizeof(uint32_t) * bucket_count_for(capacity);
    }

    void initialize();                                   // before anyone else sees it

    Slot* find(const Digest& digest);                    // S
    // A slot for `digest`: a free one, else the least recently used Ready or
    // Failed slot that is not in flight (wiped first). nullptr when every
    // slot is pending or in flight. Sets *evicted when it displaced a key.
    Slot* claim(const Digest& digest, int64_t now_ms, bool* evicted); // X

    void make_ready(Slot& slot, const uint8_t* dek, int64_t now_ms, int64_t ttl_ms);    // X
    void make_failed(Slot& slot, const FailureRecord& failure);                         // X
    // A Failed slot, or a Ready one past serving, asked for again: back to
    // Pending with the same request, so the broker tries once more.
    void retry(Slot& slot);                                                              // X
    // After a failed refresh of a Ready slot because the key manager could not
    // be reached: keep serving until grace past expiry, retry a little later.
    void ride_out_outage(Slot& slot, int64_t now_ms, int64_t grace_ms, int64_t retry_ms); // X
    void wipe(Slot& slot);                               // X: back to Free, plaintext zeroed

    bool usable(const Slot& slot, int64_t now_ms) const;              // Ready and within serve_until
    bool wants_refresh(const Slot& slot, int64_t now_ms, int64_t ttl_ms) const;
    bool is_dead(const Slot& slot, int64_t now_ms, int64_t ttl_ms) const; // Ready and past serving

    uint32_t capacity() const { return capacity_; }
    Slot& at(uint32_t i) { return slots_[i]; }
    uint32_t index_of(const Slot& slot) const { return static_cast<uint32_t>(&slot - slots_); }

private:
    uint32_t bucket_of(const Digest& digest) const;
    void link(Slot& slot);
    void unlink(Slot& slot);

    Slot* slots_;
    uint32_t* buckets_;
    uint32_t capacity_;
    uint32_t bucket_count_;
};

} // namespace pgphi::cache
