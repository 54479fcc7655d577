// A data-encryption key (one version of one named pgphi key) made ready for
// use: it seals plaintext into the ciphertext format and opens it again. The
// plaintext DEK itself is not kept: only OpenSSL's key schedule, which is
// cleansed when the DataKey is destroyed.
#pragma once

#include <cstdint>
#include <string>

#include "aead.hpp"
#include "bytes.hpp"
#include "ciphertext_format.hpp"
#include "nonce.hpp"
#include "secure_bytes.hpp"

namespace pgphi {

class DataKey {
public:
    DataKey(format::KeyRef ref, std::string name, const SecureBytes& dek);

    const format::KeyRef& ref() const noexcept { return ref_; }
    const std::string& name() const noexcept { return name_; }

    // Until when this process may use the key without asking the shared
    // cache again (its TTL there); in PostgreSQL milliseconds.
    int64_t valid_until_ms() const noexcept { return valid_until_ms_; }
    void set_valid_until_ms(int64_t ms) noexcept { valid_until_ms_ = ms; }

    // Where this key sits in the shared cache, and when this process last
    // told it the key is in use (so the broker keeps it fresh).
    uint32_t cache_slot() const noexcept { return cache_slot_; }
    void set_cache_slot(uint32_t slot) noexcept { cache_slot_ = slot; }
    int64_t use_reported_ms() const noexcept { return use_reported_ms_; }
    void set_use_reported_ms(int64_t ms) noexcept { use_reported_ms_ = ms; }

    // Values sealed by this process under this key and not yet added to the
    // shared usage count (random nonces bound how many a DEK may seal).
    uint64_t unreported_seals() const noexcept { return unreported_seals_; }
    void take_unreported_seals() noexcept { unreported_seals_ = 0; }
    uint32_t usage_slot() const noexcept { return usage_slot_; }
    void set_usage_slot(uint32_t slot) noexcept { usage_slot_ = slot; }

    // Writes format::sealed_size(plaintext.size) bytes to `out`.
    void seal(NonceSource& nonces, ByteView plaintext, ByteView context, uint8_t* out);

    // Writes value.ciphertext.size plaintext bytes to `out`, or throws
    // AuthenticationFailed and leaves `out` wiped.
    void open(const format::ParsedValue& value, ByteView context, uint8_t* out);

private:
    format::KeyRef ref_;
    std::string name_;
    Aes256Gcm cipher_;
    int64_t valid_until_ms_ = INT64_MAX;
    uint32_t cache_slot_ = UINT32_MAX;
    int64_t use_reported_ms_ = 0;
    uint64_t unreported_seals_ = 0;
    uint32_t usage_slot_ = UINT32_MAX;
};

} // namespace pgphi
