#include "ciphertext_format.hpp"

#include <string>

#include "error.hpp"

namespace pgphi::format {

uint32_t read_be32(const uint8_t* p)
{
    return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) |
           (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
}

void write_be32(uint8_t* p, uint32_t v)
{
    p[0] = static_cast<uint8_t>(v >> 24);
    p[1] = static_cast<uint8_t>(v >> 16);
    p[2] = static_cast<uint8_t>(v >> 8);
    p[3] = static_cast<uint8_t>(v);
}

namespace {

[[noreturn]] void truncated(size_t have, size_t need)
{
    throw Error(ErrorCode::Truncated, "pgphi ciphertext is truncated",
                "The value has " + std::to_string(have) + " bytes; at least " + std::to_string(need) +
                    " are needed.");
}

} // namespace

ParsedValue parse(ByteView value)
{
    ParsedValue parsed;
    parse(value, parsed);
    return parsed;
}

void parse(ByteView value, ParsedValue& parsed)
{
    // Checked one field at a time so that each kind of damage has its own error.
    if (value.size == 0 || value.data[0] != kMagic)
        throw Error(ErrorCode::NotCiphertext, "value is not a pgphi ciphertext",
                    "pgphi ciphertexts start with byte 0xA7.",
                    "Encrypt values with encrypt_phi(); plaintext cannot be stored in an encrypted column.");
    if (value.size < 2)
        truncated(value.size, kMinOverhead);

    parsed = ParsedValue();
    parsed.format_version = value.data[1];
    if (parsed.format_version != kVersion1)
        throw Error(ErrorCode::UnsupportedVersion,
                    "unsupported pgphi ciphertext format version " + std::to_string(parsed.format_version),
                    "This build of pgphi reads format version 1.",
                    "The value may come from a newer pgphi release, or be damaged.");
    if (value.size < 3)
        truncated(value.size, kMinOverhead);
    uint8_t algorithm = value.data[2];
    if (algorithm != static_cast<uint8_t>(Algorithm::Aes256Gcm) &&
        algorithm != static_cast<uint8_t>(Algorithm::Aes256Siv))
        throw Error(ErrorCode::UnknownAlgorithm, "unknown pgphi encryption algorithm id " + std::to_string(algorithm),
                    "This build of pgphi knows algorithms 1 (AES-256-GCM) and 2 (AES-256-SIV).");
    parsed.algorithm = static_cast<Algorithm>(algorithm);
    size_t overhead = parsed.deterministic() ? kSivOverhead : kGcmOverhead;
    if (value.size < overhead)
        truncated(value.size, overhead);

    parsed.key.key_id = read_be32(value.data + 3);
    parsed.key.version = read_be32(value.data + 7);
    if (parsed.key.key_id == 0 || parsed.key.version == 0)
        throw Error(ErrorCode::NotCiphertext, "value is not a pgphi ciphertext",
                    "Its key reference is zero, which pgphi never writes.");

    parsed.prefix = ByteView(value.data, kPrefixSize);
    if (parsed.deterministic()) {
        parsed.tag = value.data + kPrefixSize;
        parsed.ciphertext = ByteView(parsed.tag + kSivTagSize, value.size - kPrefixSize - kSivTagSize);
    } else {
        parsed.nonce = value.data + kPrefixSize;
        parsed.ciphertext = ByteView(parsed.nonce + kGcmNonceSize, value.size - kGcmOverhead);
        parsed.tag = value.data + value.size - kGcmTagSize;
    }
}

bool is_deterministic_prefix(ByteView head, uint32_t* key_id) noexcept
{
    if (head.size < kPrefixSize || head.data[0] != kMagic || head.data[1] != kVersion1 ||
        head.data[2] != static_cast<uint8_t>(Algorithm::Aes256Siv))
        return false;
    *key_id = read_be32(head.data + 3);
    return true;
}

void write_prefix(uint8_t* out, KeyRef key, Algorithm algorithm)
{
    out[0] = kMagic;
    out[1] = kVersion1;
    out[2] = static_cast<uint8_t>(algorithm);
    write_be32(out + 3, key.key_id);
    write_be32(out + 7, key.version);
}

} // namespace pgphi::format
