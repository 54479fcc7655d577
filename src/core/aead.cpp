#include "aead.hpp"

#include <climits>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "error.hpp"

namespace pgphi {

namespace {

[[noreturn]] void openssl_failure(const char* what, const char* cipher = "AES-256-GCM")
{
    throw Error(ErrorCode::Internal, std::string("OpenSSL ") + cipher + " failure in " + what);
}

[[noreturn]] void siv_failure(const char* what) { openssl_failure(what, "AES-SIV"); }

[[noreturn]] __attribute__((noinline, cold)) void too_large()
{
    throw Error(ErrorCode::InvalidArgument, "value is too large to encrypt");
}

// Inlined into the per-value paths; the throw stays out of line.
inline int checked_length(size_t n)
{
    if (n > static_cast<size_t>(INT_MAX))
        too_large();
    return static_cast<int>(n);
}

// Feeds associated data into a context already set up with key and nonce.
// The encrypt and decrypt updates are separate functions so that each calls
// its EVP function directly (no call through a pointer, per value).
inline void add_encrypt_aad(EVP_CIPHER_CTX* ctx, ByteView aad)
{
    int unused = 0;
    if (aad.size > 0 && EVP_EncryptUpdate(ctx, nullptr, &unused, aad.data, checked_length(aad.size)) != 1)
        openssl_failure("AAD");
}

inline void add_decrypt_aad(EVP_CIPHER_CTX* ctx, ByteView aad)
{
    int unused = 0;
    if (aad.size > 0 && EVP_DecryptUpdate(ctx, nullptr, &unused, aad.data, checked_length(aad.size)) != 1)
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
    add_encrypt_aad(encrypt_ctx_, aad_prefix);
    add_encrypt_aad(encrypt_ctx_, aad_suffix);
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
        add_decrypt_aad(decrypt_ctx_, aad_prefix);
        add_decrypt_aad(decrypt_ctx_, aad_suffix);
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

AesSiv::AesSiv(ByteView key)
{
    const char* name = key.size == 32   ? "AES-128-SIV"
                       : key.size == 48 ? "AES-192-SIV"
                       : key.size == 64 ? "AES-256-SIV"
                                        : nullptr;
    if (!name)
        throw Error(ErrorCode::InvalidArgument, "AES-SIV needs a 32-, 48- or 64-byte key");
    EVP_CIPHER* cipher = EVP_CIPHER_fetch(nullptr, name, nullptr);
    encrypt_template_ = EVP_CIPHER_CTX_new();
    decrypt_template_ = EVP_CIPHER_CTX_new();
    work_ = EVP_CIPHER_CTX_new();
    bool ok = cipher && encrypt_template_ && decrypt_template_ && work_ &&
              EVP_EncryptInit_ex(encrypt_template_, cipher, nullptr, key.data, nullptr) == 1 &&
              EVP_DecryptInit_ex(decrypt_template_, cipher, nullptr, key.data, nullptr) == 1;
    EVP_CIPHER_free(cipher); // the contexts hold their own reference
    if (!ok) {
        EVP_CIPHER_CTX_free(encrypt_template_);
        EVP_CIPHER_CTX_free(decrypt_template_);
        EVP_CIPHER_CTX_free(work_);
        siv_failure("key setup");
    }
}

AesSiv::~AesSiv()
{
    EVP_CIPHER_CTX_free(encrypt_template_);
    EVP_CIPHER_CTX_free(decrypt_template_);
    EVP_CIPHER_CTX_free(work_);
}

namespace {

void check_siv_input(const ByteView* ad, size_t ad_count, ByteView data)
{
    if (data.size == 0)
        throw Error(ErrorCode::InvalidArgument, "AES-SIV input must not be empty");
    for (size_t i = 0; i < ad_count; ++i)
        if (ad[i].size == 0)
            throw Error(ErrorCode::InvalidArgument, "AES-SIV associated data components must not be empty");
}

} // namespace

void AesSiv::seal(const ByteView* ad, size_t ad_count, ByteView plaintext, uint8_t* tag, uint8_t* out)
{
    check_siv_input(ad, ad_count, plaintext);
    int len = 0;
    if (EVP_CIPHER_CTX_copy(work_, encrypt_template_) != 1)
        siv_failure("context copy");
    // Each update without an output buffer is one S2V component.
    for (size_t i = 0; i < ad_count; ++i)
        if (EVP_EncryptUpdate(work_, nullptr, &len, ad[i].data, checked_length(ad[i].size)) != 1)
            siv_failure("AAD");
    // SIV needs the whole plaintext in one call: S2V reads it before CTR
    // writes, which is also why out may alias it.
    if (EVP_EncryptUpdate(work_, out, &len, plaintext.data, checked_length(plaintext.size)) != 1 ||
        EVP_EncryptFinal_ex(work_, out + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(work_, EVP_CTRL_AEAD_GET_TAG, static_cast<int>(kTagSize), tag) != 1)
        siv_failure("encrypt");
}

bool AesSiv::open(const ByteView* ad, size_t ad_count, ByteView ciphertext, const uint8_t* tag, uint8_t* out)
{
    int len = 0;
    try {
        check_siv_input(ad, ad_count, ciphertext);
        if (EVP_CIPHER_CTX_copy(work_, decrypt_template_) != 1)
            siv_failure("context copy");
        // The tag is the CTR pass's IV, so it is needed before any data.
        if (EVP_CIPHER_CTX_ctrl(work_, EVP_CTRL_AEAD_SET_TAG, static_cast<int>(kTagSize),
                                const_cast<uint8_t*>(tag)) != 1)
            siv_failure("tag setup");
        for (size_t i = 0; i < ad_count; ++i)
            if (EVP_DecryptUpdate(work_, nullptr, &len, ad[i].data, checked_length(ad[i].size)) != 1)
                siv_failure("AAD");
    } catch (...) {
        OPENSSL_cleanse(out, ciphertext.size);
        throw;
    }
    // The update decrypts and verifies at once; it fails on a bad tag.
    if (EVP_DecryptUpdate(work_, out, &len, ciphertext.data, checked_length(ciphertext.size)) != 1 ||
        EVP_DecryptFinal_ex(work_, out + len, &len) != 1) {
        OPENSSL_cleanse(out, ciphertext.size);
        return false;
    }
    return true;
}

} // namespace pgphi
