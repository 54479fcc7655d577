// HKDF-SHA-256 (RFC 5869) through OpenSSL's EVP_KDF. pgphi derives every key
// it uses besides the GCM key from a DEK this way, each under its own fixed
// label, so keys for different algorithms are independent of each other.
#pragma once

#include <cstddef>
#include <string_view>

#include "bytes.hpp"
#include "secure_bytes.hpp"

namespace pgphi {

// `length` bytes of output keying material from `key` (input keying
// material), with an optional salt and the context label `info`.
SecureBytes hkdf_sha256(ByteView key, ByteView salt, ByteView info, size_t length);

// The labels (HKDF info) of pgphi's derived keys. Changing one would make
// every value under it unreadable: they are part of the ciphertext format.
inline constexpr std::string_view kSivKeyLabel = "pgphi v1 AES-256-SIV key";
inline constexpr std::string_view kBlindIndexKeyLabel = "pgphi v1 blind index HMAC-SHA-256 key";
// The local provider's audit anchor key, derived from its KEK: changing it
// would make every anchor made before fail verification.
inline constexpr std::string_view kAuditAnchorKeyLabel = "pgphi v1 audit anchor HMAC-SHA-256 key";

} // namespace pgphi
