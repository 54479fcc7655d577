// Google Benchmark of the core hot paths: sealing and opening values of
// 8 B to 64 KiB (randomized and deterministic), blind indexes, key setup,
// header parsing and the backend-local key lookup.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include <cstring>
#include <memory>

#include "ciphertext_format.hpp"
#include "dek_cache.hpp"
#include "data_key.hpp"
#include "key_ring.hpp"

using namespace pgphi;

namespace {

struct Fixture {
    SecureBytes dek = SecureBytes::random(32);
    DataKey key{format::KeyRef{1, 1}, "ssn_key", dek};
    NonceSource nonces;
};

void BM_Seal(benchmark::State& state)
{
    Fixture f;
    std::string plaintext(static_cast<size_t>(state.range(0)), 'p');
    std::vector<uint8_t> out(format::sealed_size(plaintext.size()));
    for (auto _ : state) {
        f.key.seal(f.nonces, ByteView(plaintext), ByteView(), out.data());
        benchmark::DoNotOptimize(out.data());
    }
    state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_Seal)->RangeMultiplier(8)->Range(8, 64 << 10);

void BM_ParseAndOpen(benchmark::State& state)
{
    Fixture f;
    std::string plaintext(static_cast<size_t>(state.range(0)), 'p');
    std::vector<uint8_t> value(format::sealed_size(plaintext.size()));
    f.key.seal(f.nonces, ByteView(plaintext), ByteView(), value.data());
    std::vector<uint8_t> out(plaintext.size());
    for (auto _ : state) {
        format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
        f.key.open(parsed, ByteView(), out.data());
        benchmark::DoNotOptimize(out.data());
    }
    state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_ParseAndOpen)->RangeMultiplier(8)->Range(8, 64 << 10);

// Deterministic values (AES-256-SIV): two passes over the data (S2V, then
// CTR) and a context copy per value, against GCM's one pass.
void BM_SealDeterministic(benchmark::State& state)
{
    Fixture f;
    std::string plaintext(static_cast<size_t>(state.range(0)), 'p');
    std::vector<uint8_t> out(format::deterministic_sealed_size(plaintext.size()));
    for (auto _ : state) {
        f.key.seal_deterministic(ByteView(plaintext), ByteView(), out.data());
        benchmark::DoNotOptimize(out.data());
    }
    state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_SealDeterministic)->RangeMultiplier(8)->Range(8, 64 << 10);

void BM_ParseAndOpenDeterministic(benchmark::State& state)
{
    Fixture f;
    std::string plaintext(static_cast<size_t>(state.range(0)), 'p');
    std::vector<uint8_t> value(format::deterministic_sealed_size(plaintext.size()));
    f.key.seal_deterministic(ByteView(plaintext), ByteView(), value.data());
    std::vector<uint8_t> out(value.size());
    for (auto _ : state) {
        format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
        f.key.open(parsed, ByteView(), out.data());
        benchmark::DoNotOptimize(out.data());
    }
    state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_ParseAndOpenDeterministic)->RangeMultiplier(8)->Range(8, 64 << 10);

void BM_BlindIndex(benchmark::State& state)
{
    SecureBytes dek = SecureBytes::random(32);
    DataKey key{format::KeyRef{2, 1}, "ssn_index", dek, KeySpec{KeyPurpose::BlindIndex, Normalization::TrimLower, 16}};
    std::string value = " Jane.Doe@Example.org ";
    std::vector<uint8_t> out(key.blind_index_size());
    for (auto _ : state) {
        key.blind_index(ByteView(value), out.data());
        benchmark::DoNotOptimize(out.data());
    }
}
BENCHMARK(BM_BlindIndex);

// Building a key (done once per key version and session): GCM and SIV
// contexts and the HKDF derivation.
void BM_DataKeySetup(benchmark::State& state)
{
    SecureBytes dek = SecureBytes::random(32);
    for (auto _ : state) {
        DataKey key{format::KeyRef{1, 1}, "ssn_key", dek};
        benchmark::DoNotOptimize(&key);
    }
}
BENCHMARK(BM_DataKeySetup);

void BM_ParseHeader(benchmark::State& state)
{
    Fixture f;
    std::vector<uint8_t> value(format::sealed_size(9));
    f.key.seal(f.nonces, ByteView("123456789"), ByteView(), value.data());
    for (auto _ : state)
        benchmark::DoNotOptimize(format::parse(ByteView(value.data(), value.size())));
}
BENCHMARK(BM_ParseHeader);

void BM_KeyRingHit(benchmark::State& state)
{
    KeyRing ring;
    for (uint32_t id = 1; id <= 16; ++id)
        ring.install(format::KeyRef{id, 1}, "key" + std::to_string(id), true, SecureBytes::random(32));
    uint32_t id = 0;
    for (auto _ : state) {
        // Alternate keys so the one-entry memo does not answer every lookup.
        benchmark::DoNotOptimize(ring.find(format::KeyRef{(id++ & 15) + 1, 1}));
    }
}
BENCHMARK(BM_KeyRingHit);

// The shared cache's hit path as a backend runs it on a miss in its own
// cache: digest the request, find the slot, copy the DEK out. A full table of
// 1024 entries, as with the default pgphi.cache_size.
struct SharedTableFixture {
    static constexpr uint32_t kCapacity = 1024;
    std::unique_ptr<unsigned char[]> memory{new unsigned char[cache::Table::bytes_for(kCapacity)]};
    cache::Table table{memory.get(), kCapacity};
    std::vector<cache::UnwrapRequest> requests;

    SharedTableFixture()
    {
        table.initialize();
        uint8_t dek[cache::kDekSize] = {1};
        for (uint32_t i = 0; i < kCapacity; ++i) {
            cache::UnwrapRequest r{};
            std::strcpy(r.provider, "aws_kms");
            std::strcpy(r.kek_ref, "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab");
            std::snprintf(r.key_name, sizeof(r.key_name), "key_%u", i);
            r.key_id = i + 1;
            r.key_version = 1;
            r.wrapped_size = 184; // an AWS KMS ciphertext blob for a 32-byte key
            std::memset(r.wrapped, static_cast<int>(i), r.wrapped_size);
            requests.push_back(r);
            bool evicted = false;
            cache::Slot* slot = table.claim(cache::digest_of(r), 0, &evicted);
            table.make_ready(*slot, dek, 0, 300'000);
        }
    }
};

void BM_SharedCacheFind(benchmark::State& state)
{
    SharedTableFixture f;
    std::vector<cache::Digest> digests;
    for (const auto& r : f.requests)
        digests.push_back(cache::digest_of(r));
    uint8_t dek[cache::kDekSize];
    uint32_t i = 0;
    for (auto _ : state) {
        cache::Slot* slot = f.table.find(digests[i++ & 1023]);
        std::memcpy(dek, slot->dek, sizeof(dek));
        benchmark::DoNotOptimize(dek);
    }
}
BENCHMARK(BM_SharedCacheFind);

void BM_SharedCacheDigestAndFind(benchmark::State& state)
{
    SharedTableFixture f;
    uint8_t dek[cache::kDekSize];
    uint32_t i = 0;
    for (auto _ : state) {
        cache::Slot* slot = f.table.find(cache::digest_of(f.requests[i++ & 1023]));
        std::memcpy(dek, slot->dek, sizeof(dek));
        benchmark::DoNotOptimize(dek);
    }
}
BENCHMARK(BM_SharedCacheDigestAndFind);

} // namespace
