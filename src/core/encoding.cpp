#include "encoding.hpp"

#include <openssl/evp.h>

#include "error.hpp"

namespace pgphi {

std::string base64_encode(ByteView bytes)
{
    std::string out(4 * ((bytes.size + 2) / 3), '\0');
    int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), bytes.data, static_cast<int>(bytes.size));
    out.resize(static_cast<size_t>(n));
    return out;
}

SecureBytes base64_decode(const std::string& text)
{
    if (text.size() % 4 != 0)
        throw Error(ErrorCode::ProviderError, "key manager returned malformed base64");
    SecureBytes out(text.size() / 4 * 3);
    // EVP_DecodeBlock ignores nothing and reports padding as zero bytes, so the
    // padding is counted and trimmed here.
    int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()),
                            static_cast<int>(text.size()));
    if (n < 0)
        throw Error(ErrorCode::ProviderError, "key manager returned malformed base64");
    size_t padding = 0;
    if (!text.empty() && text.back() == '=')
        padding = (text.size() >= 2 && text[text.size() - 2] == '=') ? 2 : 1;
    SecureBytes trimmed(out.data(), static_cast<size_t>(n) - padding);
    return trimmed;
}

std::string hex_lower(ByteView bytes)
{
    static const char digits[] = "0123456789abcdef";
    std::string hex;
    hex.reserve(bytes.size * 2);
    for (size_t i = 0; i < bytes.size; ++i) {
        hex.push_back(digits[bytes.data[i] >> 4]);
        hex.push_back(digits[bytes.data[i] & 0xF]);
    }
    return hex;
}

} // namespace pgphi
