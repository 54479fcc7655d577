#include "blind_index.hpp"

#include <algorithm>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "error.hpp"

namespace pgphi {

namespace {

struct NamedNormalization {
    Normalization value;
    const char* name;
};

constexpr NamedNormalization kNormalizations[] = {
    {Normalization::None, "none"},         {Normalization::Trim, "trim"},
    {Normalization::Lower, "lower"},       {Normalization::TrimLower, "trim_lower"},
    {Normalization::Digits, "digits"},
};

bool is_ascii_space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

ByteView trimmed(ByteView v)
{
    size_t begin = 0, end = v.size;
    while (begin < end && is_ascii_space(v.data[begin]))
        ++begin;
    while (end > begin && is_ascii_space(v.data[end - 1]))
        --end;
    return ByteView(v.data + begin, end - begin);
}

// Visits the normalised bytes in chunks (at most `kChunk` at a time), so that
// a long value needs no second copy. The chunk buffer is wiped afterwards.
template <typename Sink>
void for_each_normalized_chunk(ByteView value, Normalization normalization, Sink&& sink)
{
    if (normalization == Normalization::Trim || normalization == Normalization::TrimLower)
        value = trimmed(value);
    if (normalization == Normalization::None || normalization == Normalization::Trim) {
        sink(value);
        return;
    }
    constexpr size_t kChunk = 256;
    uint8_t chunk[kChunk];
    size_t n = 0;
    try {
        for (size_t i = 0; i < value.size; ++i) {
            uint8_t c = value.data[i];
            if (normalization == Normalization::Digits) {
                if (c < '0' || c > '9')
                    continue;
            } else if (c >= 'A' && c <= 'Z') {
                c = static_cast<uint8_t>(c - 'A' + 'a');
            }
            chunk[n++] = c;
            if (n == kChunk) {
                sink(ByteView(chunk, n));
                n = 0;
            }
        }
        sink(ByteView(chunk, n));
    } catch (...) {
        OPENSSL_cleanse(chunk, sizeof(chunk));
        throw;
    }
    OPENSSL_cleanse(chunk, sizeof(chunk));
}

[[noreturn]] void hmac_failure(const char* what)
{
    throw Error(ErrorCode::Internal, std::string("OpenSSL HMAC-SHA-256 failure in ") + what);
}

} // namespace

bool normalization_from_name(std::string_view name, Normalization* out) noexcept
{
    for (const auto& n : kNormalizations)
        if (name == n.name) {
            *out = n.value;
            return true;
        }
    return false;
}

const char* normalization_name(Normalization normalization) noexcept
{
    for (const auto& n : kNormalizations)
        if (n.value == normalization)
            return n.name;
    return "unknown";
}

BlindIndexer::BlindIndexer(ByteView key, Normalization normalization, size_t index_bytes)
    : normalization_(normalization), index_bytes_(index_bytes)
{
    if (index_bytes < kMinBlindIndexBytes || index_bytes > kMaxBlindIndexBytes)
        throw Error(ErrorCode::InvalidArgument, "a blind index has 8 to 32 bytes");
    if (key.size == 0)
        throw Error(ErrorCode::InvalidArgument, "a blind index needs a key");
    EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
    ctx_ = mac ? EVP_MAC_CTX_new(mac) : nullptr;
    EVP_MAC_free(mac); // the context holds its own reference
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    if (!ctx_ || EVP_MAC_init(ctx_, key.data, key.size, params) != 1) {
        EVP_MAC_CTX_free(ctx_);
        hmac_failure("key setup");
    }
}

BlindIndexer::~BlindIndexer()
{
    // Frees the inner and outer hash states derived from the key, cleansed.
    EVP_MAC_CTX_free(ctx_);
}

void BlindIndexer::compute(ByteView value, uint8_t* out)
{
    // Without a key, EVP_MAC_init restarts HMAC from the keyed state.
    if (EVP_MAC_init(ctx_, nullptr, 0, nullptr) != 1)
        hmac_failure("restart");
    for_each_normalized_chunk(value, normalization_, [this](ByteView chunk) {
        if (chunk.size > 0 && EVP_MAC_update(ctx_, chunk.data, chunk.size) != 1)
            hmac_failure("update");
    });
    uint8_t mac[32];
    size_t length = 0;
    if (EVP_MAC_final(ctx_, mac, &length, sizeof(mac)) != 1 || length != sizeof(mac)) {
        OPENSSL_cleanse(mac, sizeof(mac));
        hmac_failure("final");
    }
    std::copy(mac, mac + index_bytes_, out);
    OPENSSL_cleanse(mac, sizeof(mac));
}

std::string normalize(ByteView value, Normalization normalization)
{
    std::string out;
    for_each_normalized_chunk(value, normalization,
                              [&out](ByteView chunk) { out.append(reinterpret_cast<const char*>(chunk.data), chunk.size); });
    return out;
}

} // namespace pgphi
