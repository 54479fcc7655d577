// Blind indexes: a keyed HMAC-SHA-256 over a normalised value, truncated,
// stored beside a randomized column so that equal values can be found with an
// ordinary index without making the column itself deterministic.
//
// Normalisation is fixed per blind-index key, so every caller computes the
// same index for the same value. It works on bytes and folds ASCII only, so it
// never depends on the database's locale or the C library's version:
//   none        the value as given
//   trim        without leading and trailing ASCII whitespace (space, \t, \n, \v, \f, \r)
//   lower       ASCII letters A-Z folded to a-z; other bytes unchanged
//   trim_lower  both
//   digits      only the ASCII digits 0-9 ("123-45-6789" and "123 45 6789" match)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "bytes.hpp"

typedef struct evp_mac_ctx_st EVP_MAC_CTX;

namespace pgphi {

enum class Normalization : uint8_t { None, Trim, Lower, TrimLower, Digits };

// The SQL names above; false for an unknown name.
bool normalization_from_name(std::string_view name, Normalization* out) noexcept;
const char* normalization_name(Normalization normalization) noexcept;

// Bounds on the truncated HMAC. Below 8 bytes, distinct values of a large
// table would collide; 32 is all of SHA-256.
inline constexpr size_t kMinBlindIndexBytes = 8;
inline constexpr size_t kMaxBlindIndexBytes = 32;

class BlindIndexer {
public:
    // `key`: the HMAC key (32 bytes, derived from the blind-index key's DEK).
    BlindIndexer(ByteView key, Normalization normalization, size_t index_bytes);
    ~BlindIndexer();
    BlindIndexer(const BlindIndexer&) = delete;
    BlindIndexer& operator=(const BlindIndexer&) = delete;

    Normalization normalization() const noexcept { return normalization_; }
    size_t index_bytes() const noexcept { return index_bytes_; }

    // Writes index_bytes() bytes: HMAC-SHA-256(key, normalize(value)),
    // truncated. The normalised value is fed to HMAC in pieces and never
    // held whole.
    void compute(ByteView value, uint8_t* out);

private:
    EVP_MAC_CTX* ctx_ = nullptr; // keyed once; each compute() restarts it
    Normalization normalization_;
    size_t index_bytes_;
};

// The normalised form of a value, as compute() hashes it (for tests).
std::string normalize(ByteView value, Normalization normalization);

} // namespace pgphi
