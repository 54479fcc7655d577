// A data-encryption key (one version of one named pgphi key) made ready for
// use. The plaintext DEK itself is not kept: only what OpenSSL derived from
// it, which is cleansed when the DataKey is destroyed.
//
// A key has one purpose, fixed when it was created:
//  * encryption: it seals plaintext into the ciphertext format and opens it
//    again. Randomized values use AES-256-GCM with the DEK itself;
//    deterministic values use AES-256-SIV with a 64-byte key derived from the
//    DEK by HKDF-SHA-256 (label kSivKeyLabel), so the two never share a key.
//  * blind indexing: it computes blind indexes (HMAC-SHA-256 with a key
//    derived under kBlindIndexKeyLabel) and nothing else.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "aead.hpp"
#include "blind_index.hpp"
#include "bytes.hpp"
#include "ciphertext_format.hpp"
#include "nonce.hpp"
#include "secure_bytes.hpp"

namespace pgphi {

enum class KeyPurpose : uint8_t { Encryption, BlindIndex };

// How a key was created: its purpose and, for blind-index keys, their
// normalisation and length.
struct KeySpec {
    KeyPurpose purpose = KeyPurpose::Encryption;
    Normalization normalization = Normalization::None;
    uint8_t index_bytes = 0;
};

// A blind index value: key id and key version (big-endian, so that values
// computed under an older version are recognisable), then the truncated HMAC.
inline constexpr size_t kBlindIndexPrefixSize = 8;

class DataKey {
public:
    DataKey(format::KeyRef ref, std::string name, const SecureBytes& dek, const KeySpec& spec = {});

    const format::KeyRef& ref() const noexcept { return ref_; }
    const std::string& name() const noexcept { return name_; }
    const KeySpec& spec() const noexcept { return spec_; }
    KeyPurpose purpose() const noexcept { return spec_.purpose; }

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
    // Uses since that report's clock was last read: the clock is read every
    // so many uses, not per value (see note_use in key_access.cpp).
    uint32_t uses_since_clock_read() const noexcept { return uses_since_clock_read_; }
    void set_uses_since_clock_read(uint32_t uses) noexcept { uses_since_clock_read_ = uses; }

    // Whether the catalog had this version active or decrypt-only when it was
    // loaded: only such versions produce values for lookups.
    bool live() const noexcept { return live_; }
    void set_live(bool live) noexcept { live_ = live; }

    // Whether a custodian marked this version compromised when it was
    // loaded: it then seals nothing and opens values only to re-encrypt them.
    bool compromised() const noexcept { return compromised_; }
    void set_compromised(bool compromised) noexcept { compromised_ = compromised; }

    // Values sealed by this process under this key and not yet added to the
    // shared usage count (random nonces bound how many a DEK may seal).
    // Deterministic values use no nonce and are not counted.
    uint64_t unreported_seals() const noexcept { return unreported_seals_; }
    void take_unreported_seals() noexcept { unreported_seals_ = 0; }
    uint32_t usage_slot() const noexcept { return usage_slot_; }
    void set_usage_slot(uint32_t slot) noexcept { usage_slot_ = slot; }

    // Randomized (AES-256-GCM): writes format::sealed_size(plaintext.size)
    // bytes to `out`.
    void seal(NonceSource& nonces, ByteView plaintext, ByteView context, uint8_t* out);

    // Deterministic (AES-256-SIV): writes
    // format::deterministic_sealed_size(plaintext.size) bytes to `out`.
    void seal_deterministic(ByteView plaintext, ByteView context, uint8_t* out);

    // Opens a value of either algorithm. `out` must have room for
    // value.ciphertext.size bytes; value.plaintext_size() of them are the
    // plaintext. Throws AuthenticationFailed and leaves `out` wiped.
    void open(const format::ParsedValue& value, ByteView context, uint8_t* out);

    // Blind-index keys: the size of a blind index value, and the value for
    // `plaintext` (kBlindIndexPrefixSize + spec().index_bytes bytes).
    size_t blind_index_size() const noexcept { return kBlindIndexPrefixSize + spec_.index_bytes; }
    void blind_index(ByteView plaintext, uint8_t* out);

    // Throws WrongKeyPurpose unless this key is meant for `purpose`. Inline:
    // every value checks it.
    void require(KeyPurpose purpose) const
    {
        if (spec_.purpose != purpose)
            wrong_purpose(purpose);
    }

private:
    [[noreturn]] void wrong_purpose(KeyPurpose purpose) const;

    format::KeyRef ref_;
    std::string name_;
    KeySpec spec_;
    std::optional<Aes256Gcm> gcm_;
    std::optional<AesSiv> siv_;
    std::optional<BlindIndexer> indexer_;
    int64_t valid_until_ms_ = INT64_MAX;
    uint32_t cache_slot_ = UINT32_MAX;
    int64_t use_reported_ms_ = 0;
    uint32_t uses_since_clock_read_ = 0;
    bool live_ = true;
    bool compromised_ = false;
    uint64_t unreported_seals_ = 0;
    uint32_t usage_slot_ = UINT32_MAX;
};

} // namespace pgphi
