// Base64 and hex through OpenSSL, for the key managers' JSON APIs.
#pragma once

#include <cstdint>
#include <string>

#include "bytes.hpp"
#include "secure_bytes.hpp"

namespace pgphi {

std::string base64_encode(ByteView bytes);

// Strict decoding (RFC 4648 alphabet, padded). Throws pgphi::Error with the
// given code when the input is not valid base64.
SecureBytes base64_decode(const std::string& text);

std::string hex_lower(ByteView bytes);

} // namespace pgphi
