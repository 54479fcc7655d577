// libFuzzer target for the ciphertext parser and the decrypt path of both
// algorithms (1: AES-256-GCM, 2: AES-256-SIV): whatever the bytes, parsing and
// opening either refuse them with a pgphi::Error, leaving the output buffer
// wiped, or the value is authentic. Never a crash, never unauthenticated
// plaintext. The DEK is fixed (bytes 0..31) so that the seed corpus can hold
// real ciphertexts of both kinds (seed_corpus.py makes them).
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "ciphertext_format.hpp"
#include "data_key.hpp"
#include "error.hpp"
#include "secure_bytes.hpp"

using namespace pgphi;

namespace {

DataKey& fuzz_key()
{
    static uint8_t bytes[32];
    for (int i = 0; i < 32; ++i)
        bytes[i] = static_cast<uint8_t>(i);
    static SecureBytes dek(bytes, sizeof(bytes));
    static DataKey key(format::KeyRef{1, 1}, "fuzz", dek);
    return key;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    format::ParsedValue parsed;
    try {
        parsed = format::parse(ByteView(data, size));
    } catch (const Error&) {
        return 0; // refused cleanly
    }
    // The parser's lengths must describe exactly the input.
    size_t overhead = parsed.deterministic() ? format::kSivOverhead : format::kGcmOverhead;
    if (parsed.plaintext_size() != size - overhead)
        std::abort();
    if (parsed.deterministic() != (data[2] == static_cast<uint8_t>(format::Algorithm::Aes256Siv)))
        std::abort();
    std::vector<uint8_t> out(parsed.ciphertext.size, 0xAA);
    try {
        fuzz_key().open(parsed, ByteView(), out.data());
    } catch (const Error& e) {
        if (e.code() != ErrorCode::AuthenticationFailed)
            std::abort();
        for (uint8_t b : out)
            if (b != 0)
                std::abort(); // unauthenticated bytes left behind
    }
    return 0;
}
