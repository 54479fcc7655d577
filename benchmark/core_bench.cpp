// Google Benchmark of the core hot paths: sealing and opening values of
// 8 B to 64 KiB, header parsing and the backend-local key lookup.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "ciphertext_format.hpp"
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

} // namespace
