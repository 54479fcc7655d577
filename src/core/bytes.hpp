// Non-owning views of byte ranges (C++17 has no std::span).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace pgphi {

struct ByteView {
    const uint8_t* data = nullptr;
    size_t size = 0;

    ByteView() = default;
    ByteView(const uint8_t* d, size_t n) : data(d), size(n) {}
    ByteView(std::string_view s) : data(reinterpret_cast<const uint8_t*>(s.data())), size(s.size()) {}
};

} // namespace pgphi
