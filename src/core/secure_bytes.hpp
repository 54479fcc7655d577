// A byte buffer for secrets (plaintext DEKs, KEKs): its memory is wiped with
// OPENSSL_cleanse when it is destroyed or cleared, and it cannot be copied by
// accident, so a key lives in exactly one place at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace pgphi {

class SecureBytes {
public:
    SecureBytes() = default;
    explicit SecureBytes(size_t size);
    SecureBytes(const uint8_t* data, size_t size);
    ~SecureBytes();

    SecureBytes(const SecureBytes&) = delete;
    SecureBytes& operator=(const SecureBytes&) = delete;
    SecureBytes(SecureBytes&& other) noexcept;
    SecureBytes& operator=(SecureBytes&& other) noexcept;

    uint8_t* data() noexcept { return data_.get(); }
    const uint8_t* data() const noexcept { return data_.get(); }
    size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }

    // Wipes and releases the buffer.
    void clear() noexcept;

    // Fills a new buffer from OpenSSL's private DRBG (the one meant for keys).
    static SecureBytes random(size_t size);

private:
    std::unique_ptr<uint8_t[]> data_;
    size_t size_ = 0;
};

// Wipes a string that holds a secret (a token, a DEK's base64 text) when it
// goes out of scope, also when an exception passes through.
class WipeOnExit {
public:
    explicit WipeOnExit(std::string& text) : text_(text) {}
    ~WipeOnExit();
    WipeOnExit(const WipeOnExit&) = delete;
    WipeOnExit& operator=(const WipeOnExit&) = delete;

private:
    std::string& text_;
};

} // namespace pgphi
