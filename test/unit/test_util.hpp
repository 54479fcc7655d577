// Small helpers shared by the unit tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pgphi::test {

inline std::vector<uint8_t> from_hex(const std::string& hex)
{
    std::vector<uint8_t> out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2)
        out.push_back(static_cast<uint8_t>(std::stoul(hex.substr(i, 2), nullptr, 16)));
    return out;
}

inline std::string to_hex(const uint8_t* data, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    std::string out;
    for (size_t i = 0; i < n; ++i) {
        out.push_back(digits[data[i] >> 4]);
        out.push_back(digits[data[i] & 0xF]);
    }
    return out;
}

inline std::string to_hex(const std::vector<uint8_t>& v) { return to_hex(v.data(), v.size()); }

} // namespace pgphi::test
