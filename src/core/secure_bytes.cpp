#include "secure_bytes.hpp"

#include <cstring>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "error.hpp"

namespace pgphi {

SecureBytes::SecureBytes(size_t size) : data_(new uint8_t[size]()), size_(size) {}

SecureBytes::SecureBytes(const uint8_t* data, size_t size) : SecureBytes(size)
{
    if (size > 0)
        std::memcpy(data_.get(), data, size);
}

SecureBytes::~SecureBytes() { clear(); }

SecureBytes::SecureBytes(SecureBytes&& other) noexcept
    : data_(std::move(other.data_)), size_(other.size_)
{
    other.size_ = 0;
}

SecureBytes& SecureBytes::operator=(SecureBytes&& other) noexcept
{
    if (this != &other) {
        clear();
        data_ = std::move(other.data_);
        size_ = other.size_;
        other.size_ = 0;
    }
    return *this;
}

void SecureBytes::clear() noexcept
{
    if (data_)
        OPENSSL_cleanse(data_.get(), size_);
    data_.reset();
    size_ = 0;
}

SecureBytes SecureBytes::random(size_t size)
{
    SecureBytes bytes(size);
    if (RAND_priv_bytes(bytes.data(), static_cast<int>(size)) != 1)
        throw Error(ErrorCode::Internal, "could not generate random key material");
    return bytes;
}

WipeOnExit::~WipeOnExit() { OPENSSL_cleanse(text_.data(), text_.size()); }

} // namespace pgphi
