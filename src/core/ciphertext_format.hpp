// The pgphi ciphertext format, version 1. Every encrypted value describes
// itself:
//
//   offset  size  field
//   0       1     magic 0xA7 (no text or common binary format starts with it)
//   1       1     format version (1)
//   2       1     algorithm (1 = AES-256-GCM, randomized)
//   3       4     key id, big-endian      } stable across pg_dump/restore
//   7       4     key version, big-endian } and on standbys
//   11      12    nonce                         (AES-256-GCM)
//   23      n     ciphertext, as long as the plaintext
//   23+n    16    GCM tag
//
// Bytes 0..10 (the prefix) are the associated data together with the caller's
// context, so a header cannot be swapped onto another value. A future version
// changes byte 1 and keeps the prefix layout, so v1 data stays readable.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bytes.hpp"

namespace pgphi::format {

inline constexpr uint8_t kMagic = 0xA7;
inline constexpr uint8_t kVersion1 = 1;
inline constexpr size_t kPrefixSize = 11;

enum class Algorithm : uint8_t {
    Aes256Gcm = 1,
};

struct KeyRef {
    uint32_t key_id = 0;
    uint32_t version = 0;

    bool operator==(const KeyRef& o) const { return key_id == o.key_id && version == o.version; }
    uint64_t packed() const { return (static_cast<uint64_t>(key_id) << 32) | version; }
};

inline constexpr size_t kGcmNonceSize = 12;
inline constexpr size_t kGcmTagSize = 16;
inline constexpr size_t kGcmOverhead = kPrefixSize + kGcmNonceSize + kGcmTagSize;

// A value split into its parts; all pointers point into the parsed buffer.
struct ParsedValue {
    uint8_t format_version = 0;
    Algorithm algorithm = Algorithm::Aes256Gcm;
    KeyRef key;
    ByteView prefix;        // authenticated header bytes
    const uint8_t* nonce = nullptr;
    ByteView ciphertext;
    const uint8_t* tag = nullptr;
};

// Splits a value, trusting none of it. Throws pgphi::Error with NotCiphertext,
// Truncated, UnsupportedVersion or UnknownAlgorithm; the tag is not checked.
ParsedValue parse(ByteView value);

// Size of a sealed value for a plaintext of `plaintext_size` bytes.
constexpr size_t sealed_size(size_t plaintext_size) { return kGcmOverhead + plaintext_size; }

// Writes the 11-byte prefix for a v1 AES-256-GCM value.
void write_prefix(uint8_t* out, KeyRef key);

} // namespace pgphi::format
