// AES-256-GCM through OpenSSL EVP. One object holds one key with an encrypt
// and a decrypt context whose key schedule is computed once, so each value
// costs only a nonce change and the GCM pass itself.
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

} // namespace pgphi
