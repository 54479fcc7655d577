#include "aead.hpp"

#include <climits>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "error.hpp"

namespace pgphi {

namespace {

[[noreturn]] void openssl_failure(const char* what)
{
    throw Error(ErrorCode::Internal, std::string("OpenSSL AES-256-GCM failure in ") + what);
}

int checked_length(size_t n)
{
    if (n > static_cast<size_t>(INT_MAX))
        throw Error(ErrorCode::InvalidArgument, "value is too large to encrypt");
    return static_cast<int>(n);
}

// Feeds associated data into a context already set up with key and nonce.
void add_aad(EVP_CIPHER_CTX* ctx, ByteView aad, int (*update)(EVP_CIPHER_CTX*, unsigned char*, int*,
                                                            const unsigned char*, int))
{
    int unused = 0;
    if (aad.size > 0 && update(ctx, nullptr, &unused, aad.data, checked_length(aad.size)) != 1)
        openssl_failure("AAD");
}

} // namespace

Aes256Gcm::Aes256Gcm(ByteView key)
{
    if (key.size != kKeySize)
        throw Error(ErrorCode::InvalidArgument, "AES-256-GCM needs a 32-byte key");
    encrypt_ctx_ = EVP_CIPHER_CTX_new();
    decrypt_ctx_ = EVP_CIPHER_CTX_new();
    if (!encrypt_ctx_ || !decrypt_ctx_ ||
        EVP_EncryptInit_ex(encrypt_ctx_, EVP_aes_256_gcm(), nullptr, key.data, nullptr) != 1 ||
        EVP_DecryptInit_ex(decrypt_ctx_, EVP_aes_256_gcm(), nullptr, key.data, nullptr) != 1) {
        EVP_CIPHER_CTX_free(encrypt_ctx_);
        EVP_CIPHER_CTX_free(decrypt_ctx_);
        openssl_failure("key setup");
    }
}

Aes256Gcm::~Aes256Gcm()
{
    // EVP_CIPHER_CTX_free cleanses the key schedule before releasing it.
    EVP_CIPHER_CTX_free(encrypt_ctx_);
    EVP_CIPHER_CTX_free(decrypt_ctx_);
}

void Aes256Gcm::seal(const uint8_t* nonce, ByteView aad_prefix, ByteView aad_suffix,
                     ByteView plaintext, uint8_t* out, uint8_t* tag)
{
    int len = 0;
    if (EVP_EncryptInit_ex(encrypt_ctx_, nullptr, nullptr, nullptr, nonce) != 1)
        openssl_failure("nonce setup");
    add_aad(encrypt_ctx_, aad_prefix, EVP_EncryptUpdate);
    add_aad(encrypt_ctx_, aad_suffix, EVP_EncryptUpdate);
    if (plaintext.size > 0 &&
        EVP_EncryptUpdate(encrypt_ctx_, out, &len, plaintext.data, checked_length(plaintext.size)) != 1)
        openssl_failure("encrypt");
    if (EVP_EncryptFinal_ex(encrypt_ctx_, out + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(encrypt_ctx_, EVP_CTRL_GCM_GET_TAG, kTagSize, tag) != 1)
        openssl_failure("finish");
}

bool Aes256Gcm::open(const uint8_t* nonce, ByteView aad_prefix, ByteView aad_suffix,
                     ByteView ciphertext, const uint8_t* tag, uint8_t* out)
{
    int len = 0;
    try {
        if (EVP_DecryptInit_ex(decrypt_ctx_, nullptr, nullptr, nullptr, nonce) != 1)
            openssl_failure("nonce setup");
        add_aad(decrypt_ctx_, aad_prefix, EVP_DecryptUpdate);
        add_aad(decrypt_ctx_, aad_suffix, EVP_DecryptUpdate);
        if (ciphertext.size > 0 &&
            EVP_DecryptUpdate(decrypt_ctx_, out, &len, ciphertext.data, checked_length(ciphertext.size)) != 1)
            openssl_failure("decrypt");
        // OpenSSL's API takes a non-const tag pointer but only reads it.
        if (EVP_CIPHER_CTX_ctrl(decrypt_ctx_, EVP_CTRL_GCM_SET_TAG, kTagSize, const_cast<uint8_t*>(tag)) != 1)
            openssl_failure("tag setup");
    } catch (...) {
        OPENSSL_cleanse(out, ciphertext.size); // never leave unauthenticated bytes behind
        throw;
    }
    if (EVP_DecryptFinal_ex(decrypt_ctx_, out + len, &len) != 1) {
        OPENSSL_cleanse(out, ciphertext.size);
        return false;
    }
    return true;
}

} // namespace pgphi
