// The pgphi ciphertext format, version 1. Every encrypted value describes
// itself:
//
//   offset  size  field
//   0       1     magic 0xA7 (no text or common binary format starts with it)
//   1       1     format version (1)
//   2       1     algorithm: 1 = AES-256-GCM (randomized), 2 = AES-256-SIV (deterministic)
//   3       4     key id, big-endian      } stable across pg_dump/restore
//   7       4     key version, big-endian } and on standbys
//
// then, for AES-256-GCM:
//   11      12    nonce
//   23      n     ciphertext, as long as the plaintext
//   23+n    16    GCM tag
//
// and for AES-256-SIV (RFC 5297; no nonce, so equal plaintexts under the same
// key version and context give equal values):
//   11      16    synthetic IV (the SIV tag)
//   27      1+n   ciphertext of a zero byte followed by the plaintext. The
//                 byte is there because OpenSSL 3's AES-SIV cannot encrypt
//                 an empty plaintext; it is checked after decryption.
//
// Bytes 0..10 (the prefix) are associated data together with the caller's
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
    Aes256Gcm = 1, // randomized
    Aes256Siv = 2, // deterministic
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

inline constexpr size_t kSivTagSize = 16;
inline constexpr size_t kSivFramingSize = 1; // the leading zero byte
inline constexpr size_t kSivOverhead = kPrefixSize + kSivTagSize + kSivFramingSize;

// The shortest value of any algorithm (for errors before the algorithm is known).
inline constexpr size_t kMinOverhead = kSivOverhead < kGcmOverhead ? kSivOverhead : kGcmOverhead;

// A value split into its parts; all pointers point into the parsed buffer.
struct ParsedValue {
    uint8_t format_version = 0;
    Algorithm algorithm = Algorithm::Aes256Gcm;
    KeyRef key;
    ByteView prefix;        // authenticated header bytes
    const uint8_t* nonce = nullptr; // AES-256-GCM only
    ByteView ciphertext;    // AES-256-SIV: includes the encrypted framing byte
    const uint8_t* tag = nullptr;

    bool deterministic() const { return algorithm == Algorithm::Aes256Siv; }
    // How many plaintext bytes the value holds.
    size_t plaintext_size() const { return deterministic() ? ciphertext.size - kSivFramingSize : ciphertext.size; }
};

// Splits a value, trusting none of it. Throws pgphi::Error with NotCiphertext,
// Truncated, UnsupportedVersion or UnknownAlgorithm; the tag is not checked.
ParsedValue parse(ByteView value);
// The same into `out`, for the per-value paths: a returned struct, copied
// field by field right after parse stored it, stalls on store forwarding.
void parse(ByteView value, ParsedValue& out);

// Size of a sealed value for a plaintext of `plaintext_size` bytes.
constexpr size_t sealed_size(size_t plaintext_size) { return kGcmOverhead + plaintext_size; }
constexpr size_t deterministic_sealed_size(size_t plaintext_size) { return kSivOverhead + plaintext_size; }

// Writes the 11-byte prefix of a v1 value.
void write_prefix(uint8_t* out, KeyRef key, Algorithm algorithm = Algorithm::Aes256Gcm);

// For ANALYZE, which must not throw or read whole values: whether `head` (a
// value's first kPrefixSize bytes or more) starts a v1 deterministic value,
// and under which key id.
bool is_deterministic_prefix(ByteView head, uint32_t* key_id) noexcept;

// Big-endian helpers shared with the blind index layout.
uint32_t read_be32(const uint8_t* p);
void write_be32(uint8_t* p, uint32_t v);

} // namespace pgphi::format
