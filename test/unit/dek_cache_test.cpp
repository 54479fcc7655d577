// The shared DEK cache's table and policy (locking is the caller's).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>

#include "dek_cache.hpp"

using namespace pgphi;
using namespace pgphi::cache;

namespace {

class DekCacheTest : public ::testing::Test {
protected:
    static constexpr uint32_t kCapacity = 4;
    static constexpr int64_t kTtl = 60'000;

    void SetUp() override
    {
        memory.reset(new unsigned char[Table::bytes_for(kCapacity)]);
        table = std::make_unique<Table>(memory.get(), kCapacity);
        table->initialize();
        std::memset(dek, 0x5A, sizeof(dek));
    }

    static UnwrapRequest request(const char* provider, const char* kek, uint32_t key_id, const std::string& wrapped)
    {
        UnwrapRequest r{};
        std::strcpy(r.provider, provider);
        std::strcpy(r.kek_ref, kek);
        std::strcpy(r.key_name, "k");
        r.key_id = key_id;
        r.key_version = 1;
        std::memcpy(r.wrapped, wrapped.data(), wrapped.size());
        r.wrapped_size = static_cast<uint16_t>(wrapped.size());
        return r;
    }

    static Digest digest(int n) { return digest_of(request("local", "default", 1, "wrapped-" + std::to_string(n))); }

    Slot* ready(int n, int64_t now)
    {
        bool evicted = false;
        Slot* slot = table->claim(digest(n), now, &evicted);
        table->make_ready(*slot, dek, now, kTtl);
        return slot;
    }

    std::unique_ptr<unsigned char[]> memory;
    std::unique_ptr<Table> table;
    uint8_t dek[kDekSize];
};

bool all_zero(const uint8_t* p, size_t n)
{
    for (size_t i = 0; i < n; ++i)
        if (p[i])
            return false;
    return true;
}

} // namespace

TEST_F(DekCacheTest, DigestSeparatesProviderKekKeyAndWrappedBytes)
{
    Digest base = digest_of(request("vault", "k", 1, "ab"));
    EXPECT_EQ(base, digest_of(request("vault", "k", 1, "ab")));
    EXPECT_FALSE(base == digest_of(request("vault", "ka", 1, "ab")));
    EXPECT_FALSE(base == digest_of(request("aws_kms", "k", 1, "ab")));
    EXPECT_FALSE(base == digest_of(request("vault", "k", 2, "ab")));  // same DEK moved to another key
    EXPECT_FALSE(base == digest_of(request("vault", "k", 1, "abc")));
}

TEST_F(DekCacheTest, ClaimedSlotIsPendingUntilReady)
{
    bool evicted = true;
    Slot* slot = table->claim(digest(1), 1000, &evicted);
    ASSERT_NE(slot, nullptr);
    EXPECT_FALSE(evicted);
    EXPECT_EQ(slot->state, SlotState::Pending);
    EXPECT_EQ(table->find(digest(1)), slot);
    EXPECT_FALSE(table->usable(*slot, 1000));
    uint64_t generation = slot->generation;
    table->make_ready(*slot, dek, 1000, kTtl);
    EXPECT_TRUE(table->usable(*slot, 1000));
    EXPECT_FALSE(table->usable(*slot, 1000 + kTtl));
    EXPECT_NE(slot->generation, generation);
    EXPECT_EQ(table->find(digest(2)), nullptr);
}

TEST_F(DekCacheTest, FullTableEvictsTheLeastRecentlyUsedAndWipesIt)
{
    Slot* slots[kCapacity];
    for (int i = 0; i < static_cast<int>(kCapacity); ++i)
        slots[i] = ready(i, 1000 + i);
    slots[0]->last_used_ms.store(5000);  // slot 1 is now the least recently used
    bool evicted = false;
    Slot* reused = table->claim(digest(99), 6000, &evicted);
    EXPECT_EQ(reused, slots[1]);
    EXPECT_TRUE(evicted);
    EXPECT_TRUE(all_zero(reused->dek, kDekSize));
    EXPECT_EQ(table->find(digest(1)), nullptr);
    EXPECT_NE(table->find(digest(0)), nullptr);
}

TEST_F(DekCacheTest, PendingAndInFlightSlotsAreNeverEvicted)
{
    bool evicted = false;
    for (int i = 0; i < static_cast<int>(kCapacity); ++i)
        table->claim(digest(i), 1000, &evicted);
    EXPECT_EQ(table->claim(digest(99), 2000, &evicted), nullptr);
}

TEST_F(DekCacheTest, FailedSlotCarriesTheError)
{
    bool evicted = false;
    Slot* slot = table->claim(digest(1), 1000, &evicted);
    FailureRecord failure;
    failure.set(7, "permission denied by AWS KMS", "detail", nullptr);
    table->make_failed(*slot, failure);
    EXPECT_EQ(slot->state, SlotState::Failed);
    EXPECT_STREQ(slot->failure.message, "permission denied by AWS KMS");
    EXPECT_STREQ(slot->failure.hint, "");
    EXPECT_FALSE(table->usable(*slot, 1000));
    table->retry(*slot);
    EXPECT_EQ(slot->state, SlotState::Pending);
    EXPECT_STREQ(slot->failure.message, "");
}

TEST_F(DekCacheTest, RefreshAheadOnlyForKeysInUseNearExpiry)
{
    Slot* slot = ready(1, 0);
    slot->last_used_ms.store(10'000);
    EXPECT_FALSE(table->wants_refresh(*slot, 10'000, kTtl));         // plenty of TTL left
    EXPECT_TRUE(table->wants_refresh(*slot, kTtl - kTtl / 8, kTtl));  // last quarter, used
    slot->in_flight = true;
    EXPECT_FALSE(table->wants_refresh(*slot, kTtl - kTtl / 8, kTtl));
    slot->in_flight = false;
    slot->last_used_ms.store(-kTtl);                                  // idle for a whole TTL
    EXPECT_FALSE(table->wants_refresh(*slot, kTtl - kTtl / 8, kTtl));
}

TEST_F(DekCacheTest, OutageIsRiddenOutForTheGracePeriodOnly)
{
    const int64_t grace = 30'000;
    Slot* slot = ready(1, 0);
    slot->last_used_ms.store(kTtl - 1000);
    table->ride_out_outage(*slot, kTtl - 1000, grace, 5000);
    EXPECT_TRUE(table->usable(*slot, kTtl + grace - 1));
    EXPECT_FALSE(table->is_dead(*slot, kTtl + grace - 1, kTtl));
    EXPECT_FALSE(table->wants_refresh(*slot, kTtl + 1000, kTtl));  // waits for next_attempt
    EXPECT_TRUE(table->wants_refresh(*slot, kTtl + 5000, kTtl));
    EXPECT_FALSE(table->usable(*slot, kTtl + grace));
    EXPECT_TRUE(table->is_dead(*slot, kTtl + grace, kTtl));
    // A successful refresh ends the outage.
    table->make_ready(*slot, dek, kTtl + 6000, kTtl);
    EXPECT_EQ(slot->serve_until_ms, kTtl + 6000 + kTtl);
}

TEST_F(DekCacheTest, IdleKeysLeaveAtExpiry)
{
    Slot* slot = ready(1, 0);
    slot->last_used_ms.store(0);
    EXPECT_FALSE(table->is_dead(*slot, kTtl - 1, kTtl));
    EXPECT_TRUE(table->is_dead(*slot, kTtl, kTtl));
}

TEST_F(DekCacheTest, IndexFollowsEveryClaimEvictionAndWipe)
{
    // Fill, evict, wipe and refill many times; find() must always agree with
    // a plain scan of the slots.
    for (int round = 0; round < 200; ++round) {
        bool evicted = false;
        Slot* slot = table->claim(digest(round), round, &evicted);
        ASSERT_NE(slot, nullptr);
        table->make_ready(*slot, dek, round, kTtl);
        if (round % 7 == 3)
            table->wipe(*slot);
        for (int probe = 0; probe <= round; ++probe) {
            Slot* scanned = nullptr;
            for (uint32_t i = 0; i < kCapacity; ++i)
                if (table->at(i).state != SlotState::Free && table->at(i).digest == digest(probe))
                    scanned = &table->at(i);
            ASSERT_EQ(table->find(digest(probe)), scanned) << "round " << round << " probe " << probe;
        }
    }
}

TEST_F(DekCacheTest, WipeZeroesPlaintextAndRequest)
{
    Slot* slot = ready(1, 0);
    std::memset(slot->request.wrapped, 0x77, 16);
    table->wipe(*slot);
    EXPECT_EQ(slot->state, SlotState::Free);
    EXPECT_TRUE(all_zero(slot->dek, kDekSize));
    EXPECT_TRUE(all_zero(slot->request.wrapped, 16));
}
