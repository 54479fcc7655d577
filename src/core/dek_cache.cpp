#include "dek_cache.hpp"

#include <algorithm>
#include <cstring>
#include <new>
#include <tuple>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "error.hpp"

namespace pgphi::cache {

namespace {

void add_field(EVP_MD_CTX* ctx, const void* data, size_t size)
{
    uint64_t length = size;
    if (EVP_DigestUpdate(ctx, &length, sizeof(length)) != 1 || EVP_DigestUpdate(ctx, data, size) != 1)
        throw Error(ErrorCode::Internal, "SHA-256 failed");
}

bool g_fail_next_digest = false;

} // namespace

void fail_next_digest_for_testing() { g_fail_next_digest = true; }

bool Digest::operator==(const Digest& o) const { return CRYPTO_memcmp(bytes, o.bytes, sizeof(bytes)) == 0; }

Digest digest_of(const UnwrapRequest& request)
{
    if (g_fail_next_digest) {
        g_fail_next_digest = false;
        throw std::bad_alloc();
    }
    Digest digest;
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    unsigned int size = 0;
    bool ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1;
    if (ok) {
        try {
            add_field(ctx, request.provider, strnlen(request.provider, sizeof(request.provider)));
            add_field(ctx, request.kek_ref, strnlen(request.kek_ref, sizeof(request.kek_ref)));
            add_field(ctx, request.key_name, strnlen(request.key_name, sizeof(request.key_name)));
            uint32_t identity[2] = {request.key_id, request.key_version};
            add_field(ctx, identity, sizeof(identity));
            add_field(ctx, request.wrapped, std::min<size_t>(request.wrapped_size, sizeof(request.wrapped)));
            ok = EVP_DigestFinal_ex(ctx, digest.bytes, &size) == 1;
        } catch (...) {
            ok = false;
        }
    }
    EVP_MD_CTX_free(ctx);
    if (!ok)
        throw Error(ErrorCode::Internal, "SHA-256 failed");
    return digest;
}

void Table::initialize()
{
    for (uint32_t b = 0; b < bucket_count_; ++b)
        buckets_[b] = kNone;
    for (uint32_t i = 0; i < capacity_; ++i) {
        Slot* slot = new (&slots_[i]) Slot;
        std::memset(slot->digest.bytes, 0, sizeof(slot->digest.bytes));
        slot->next_in_bucket = kNone;
        slot->state = SlotState::Free;
        slot->generation = 0;
        slot->last_used_ms.store(0, std::memory_order_relaxed);
        wipe(*slot);
    }
}

uint32_t Table::bucket_of(const Digest& digest) const
{
    uint64_t h;
    std::memcpy(&h, digest.bytes, sizeof(h)); // a SHA-256 prefix is already uniform
    return static_cast<uint32_t>(h % bucket_count_);
}

void Table::link(Slot& slot)
{
    uint32_t& head = buckets_[bucket_of(slot.digest)];
    slot.next_in_bucket = head;
    head = index_of(slot);
}

void Table::unlink(Slot& slot)
{
    uint32_t* link = &buckets_[bucket_of(slot.digest)];
    uint32_t me = index_of(slot);
    while (*link != kNone && *link != me)
        link = &slots_[*link].next_in_bucket;
    if (*link == me)
        *link = slot.next_in_bucket;
    slot.next_in_bucket = kNone;
}

Slot* Table::find(const Digest& digest)
{
    for (uint32_t i = buckets_[bucket_of(digest)]; i != kNone; i = slots_[i].next_in_bucket)
        if (slots_[i].digest == digest)
            return &slots_[i];
    return nullptr;
}

Slot* Table::claim(const Digest& digest, int64_t now_ms, bool* evicted)
{
    Slot* victim = nullptr;
    *evicted = false;
    for (uint32_t i = 0; i < capacity_; ++i) {
        Slot& slot = slots_[i];
        if (slot.state == SlotState::Free) {
            victim = &slot;
            break;
        }
        if (slot.in_flight || slot.state == SlotState::Pending)
            continue;
        if (!victim || slot.last_used_ms.load(std::memory_order_relaxed) <
                           victim->last_used_ms.load(std::memory_order_relaxed))
            victim = &slot;
    }
    if (!victim)
        return nullptr;
    *evicted = victim->state == SlotState::Ready;
    wipe(*victim);
    victim->digest = digest;
    link(*victim);
    victim->state = SlotState::Pending;
    victim->last_used_ms.store(now_ms, std::memory_order_relaxed);
    return victim;
}

void Table::make_ready(Slot& slot, const uint8_t* dek, int64_t now_ms, int64_t ttl_ms)
{
    std::memcpy(slot.dek, dek, kDekSize);
    slot.state = SlotState::Ready;
    slot.expires_at_ms = now_ms + ttl_ms;
    slot.serve_until_ms = slot.expires_at_ms;
    slot.next_attempt_ms = 0;
    slot.failure.clear();
    ++slot.generation;
}

void FailureRecord::set(int32_t c, const char* m, const char* d, const char* h)
{
    code = c;
    for (auto [dst, size, src] : {std::tuple{message, sizeof(message), m}, std::tuple{detail, sizeof(detail), d},
                                  std::tuple{hint, sizeof(hint), h}}) {
        std::strncpy(dst, src ? src : "", size - 1);
        dst[size - 1] = '\0';
    }
}

void Table::make_failed(Slot& slot, const FailureRecord& failure)
{
    OPENSSL_cleanse(slot.dek, sizeof(slot.dek));
    slot.state = SlotState::Failed;
    slot.failure = failure;
    ++slot.generation;
}

void Table::retry(Slot& slot)
{
    OPENSSL_cleanse(slot.dek, sizeof(slot.dek));
    slot.state = SlotState::Pending;
    slot.failure.clear();
    ++slot.generation;
}

void Table::ride_out_outage(Slot& slot, int64_t now_ms, int64_t grace_ms, int64_t retry_ms)
{
    int64_t limit = slot.expires_at_ms + grace_ms;
    if (slot.serve_until_ms < limit)
        slot.serve_until_ms = limit;
    slot.next_attempt_ms = now_ms + retry_ms;
}

void Table::wipe(Slot& slot)
{
    if (slot.state != SlotState::Free)
        unlink(slot);
    OPENSSL_cleanse(slot.dek, sizeof(slot.dek));
    OPENSSL_cleanse(&slot.request, sizeof(slot.request));
    slot.state = SlotState::Free;
    slot.in_flight = false;
    slot.expires_at_ms = slot.serve_until_ms = slot.next_attempt_ms = 0;
    slot.failure.clear();
    ++slot.generation;
}

bool Table::usable(const Slot& slot, int64_t now_ms) const
{
    return slot.state == SlotState::Ready && now_ms < slot.serve_until_ms;
}

bool Table::wants_refresh(const Slot& slot, int64_t now_ms, int64_t ttl_ms) const
{
    if (slot.state != SlotState::Ready || slot.in_flight || now_ms < slot.next_attempt_ms)
        return false;
    bool recently_used = now_ms - slot.last_used_ms.load(std::memory_order_relaxed) < ttl_ms;
    bool expiring_soon = slot.expires_at_ms - now_ms < ttl_ms / 4;
    return recently_used && expiring_soon;
}

bool Table::is_dead(const Slot& slot, int64_t now_ms, int64_t ttl_ms) const
{
    if (slot.state != SlotState::Ready || slot.in_flight)
        return false;
    if (now_ms >= slot.serve_until_ms)
        return true;
    // Unused keys are not refreshed; they leave at expiry rather than linger.
    bool idle = now_ms - slot.last_used_ms.load(std::memory_order_relaxed) >= ttl_ms;
    return idle && now_ms >= slot.expires_at_ms;
}

} // namespace pgphi::cache
