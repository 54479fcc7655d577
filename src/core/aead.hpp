// The AEAD ciphers, through OpenSSL EVP.
//
// Aes256Gcm: one object holds one key with an encrypt and a decrypt context
// whose key schedule is computed once, so each value costs only a nonce change
// and the GCM pass itself.
//
// AesSiv: AES-SIV (RFC 5297), deterministic authenticated encryption. The
// same plaintext and associated data always give the same output.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bytes.hpp"
#include "secure_bytes.hpp"

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace pgphi {

class Aes256Gcm {
public:
    static constexpr size_t kKeySize = 32;
    static constexpr size_t kNonceSize = 12;
    static constexpr size_t kTagSize = 16;

    explicit Aes256Gcm(ByteView key);
    ~Aes256Gcm();
    Aes256Gcm(const Aes256Gcm&) = delete;
    Aes256Gcm& operator=(const Aes256Gcm&) = delete;

    // Encrypts `plaintext` into `out` (same length) and writes the tag. The
    // associated data is the concatenation aad_prefix || aad_suffix; taking it
    // in two parts spares callers a copy of header and context.
    void seal(const uint8_t* nonce, ByteView aad_prefix, ByteView aad_suffix, ByteView plaintext,
              uint8_t* out, uint8_t* tag);

    // Decrypts into `out` (same length as ciphertext). Returns false when the
    // tag does not verify; `out` is then wiped, so no unauthenticated byte
    // ever leaves this function.
    bool open(const uint8_t* nonce, ByteView aad_prefix, ByteView aad_suffix, ByteView ciphertext,
              const uint8_t* tag, uint8_t* out);

private:
    EVP_CIPHER_CTX* encrypt_ctx_ = nullptr;
    EVP_CIPHER_CTX* decrypt_ctx_ = nullptr;
};

class AesSiv {
public:
    static constexpr size_t kTagSize = 16;

    // A 32-, 48- or 64-byte key: AES-128-, AES-192- or AES-256-SIV (half of
    // it keys S2V's CMAC, half the CTR pass). pgphi uses 64 bytes.
    explicit AesSiv(ByteView key);
    ~AesSiv();
    AesSiv(const AesSiv&) = delete;
    AesSiv& operator=(const AesSiv&) = delete;

    // S2V over the associated data components ad[0..ad_count) and the
    // plaintext, then CTR. Writes the synthetic IV to `tag` and the
    // ciphertext (same length) to `out`, which may be plaintext.data itself.
    // OpenSSL 3 cannot process an empty component or an empty plaintext, so
    // both are refused (InvalidArgument); callers frame their data instead.
    void seal(const ByteView* ad, size_t ad_count, ByteView plaintext, uint8_t* tag, uint8_t* out);

    // Decrypts into `out` (may be ciphertext.data). Returns false, with `out`
    // wiped, when the tag does not verify.
    bool open(const ByteView* ad, size_t ad_count, ByteView ciphertext, const uint8_t* tag, uint8_t* out);

private:
    // An SIV context serves one message only, so each call starts from a
    // copy of a keyed template: the key schedules are computed once.
    EVP_CIPHER_CTX* encrypt_template_ = nullptr;
    EVP_CIPHER_CTX* decrypt_template_ = nullptr;
    EVP_CIPHER_CTX* work_ = nullptr;
};

} // namespace pgphi
