#include "data_key.hpp"

#include <cstring>

#include <openssl/crypto.h>

#include "error.hpp"
#include "kdf.hpp"

namespace pgphi {

namespace {

constexpr size_t kSivKeySize = 64;
constexpr size_t kBlindIndexKeySize = 32;

[[noreturn]] void authentication_failed()
{
    throw Error(ErrorCode::AuthenticationFailed, "pgphi ciphertext failed authentication",
                "The value was altered or truncated, or the context given does not match the one "
                "it was encrypted with.",
                "Check that the same context is passed to encrypt_phi and decrypt_phi.");
}

// The S2V components: the prefix, then the context unless it is empty
// (OpenSSL refuses empty components; an absent context and an empty one are
// the same thing, as with GCM).
size_t siv_components(ByteView prefix, ByteView context, ByteView* ad)
{
    ad[0] = prefix;
    if (context.size == 0)
        return 1;
    ad[1] = context;
    return 2;
}

} // namespace

DataKey::DataKey(format::KeyRef ref, std::string name, const SecureBytes& dek, const KeySpec& spec)
    : ref_(ref), name_(std::move(name)), spec_(spec)
{
    ByteView dek_view(dek.data(), dek.size());
    if (spec_.purpose == KeyPurpose::Encryption) {
        gcm_.emplace(dek_view);
        SecureBytes siv_key =
            hkdf_sha256(dek_view, ByteView(), ByteView(kSivKeyLabel), kSivKeySize);
        siv_.emplace(ByteView(siv_key.data(), siv_key.size()));
    } else {
        SecureBytes hmac_key =
            hkdf_sha256(dek_view, ByteView(), ByteView(kBlindIndexKeyLabel), kBlindIndexKeySize);
        indexer_.emplace(ByteView(hmac_key.data(), hmac_key.size()), spec_.normalization, spec_.index_bytes);
    }
}

void DataKey::wrong_purpose(KeyPurpose purpose) const
{
    if (purpose == KeyPurpose::Encryption)
        throw Error(ErrorCode::WrongKeyPurpose, "pgphi key \"" + name_ + "\" is a blind-index key",
                    "Blind-index keys compute blind indexes; they neither encrypt nor decrypt.",
                    "Encrypt with a key made by pgphi.create_key().");
    throw Error(ErrorCode::WrongKeyPurpose, "pgphi key \"" + name_ + "\" is not a blind-index key",
                "Encryption keys encrypt and decrypt; blind indexes need a key of their own.",
                "Make one with pgphi.create_blind_index_key().");
}

void DataKey::seal(NonceSource& nonces, ByteView plaintext, ByteView context, uint8_t* out)
{
    require(KeyPurpose::Encryption);
    uint8_t* nonce = out + format::kPrefixSize;
    uint8_t* body = nonce + format::kGcmNonceSize;
    format::write_prefix(out, ref_, format::Algorithm::Aes256Gcm);
    nonces.next(nonce);
    gcm_->seal(nonce, ByteView(out, format::kPrefixSize), context, plaintext, body, body + plaintext.size);
    ++unreported_seals_;
}

void DataKey::seal_deterministic(ByteView plaintext, ByteView context, uint8_t* out)
{
    require(KeyPurpose::Encryption);
    uint8_t* tag = out + format::kPrefixSize;
    uint8_t* body = tag + format::kSivTagSize;
    format::write_prefix(out, ref_, format::Algorithm::Aes256Siv);
    // The framed plaintext is assembled in the output and encrypted in place.
    body[0] = 0;
    if (plaintext.size > 0)
        std::memcpy(body + format::kSivFramingSize, plaintext.data, plaintext.size);
    ByteView ad[2];
    size_t ad_count = siv_components(ByteView(out, format::kPrefixSize), context, ad);
    try {
        siv_->seal(ad, ad_count, ByteView(body, format::kSivFramingSize + plaintext.size), tag, body);
    } catch (...) {
        OPENSSL_cleanse(body, format::kSivFramingSize + plaintext.size);
        throw;
    }
}

void DataKey::open(const format::ParsedValue& value, ByteView context, uint8_t* out)
{
    require(KeyPurpose::Encryption);
    if (!value.deterministic()) {
        if (!gcm_->open(value.nonce, value.prefix, context, value.ciphertext, value.tag, out))
            authentication_failed();
        return;
    }
    ByteView ad[2];
    size_t ad_count = siv_components(value.prefix, context, ad);
    if (!siv_->open(ad, ad_count, value.ciphertext, value.tag, out))
        authentication_failed();
    // Authentic, so the framing byte is the zero pgphi wrote; anything else
    // means a foreign writer, and nothing is returned.
    size_t plaintext_size = value.plaintext_size();
    if (out[0] != 0) {
        OPENSSL_cleanse(out, value.ciphertext.size);
        authentication_failed();
    }
    std::memmove(out, out + format::kSivFramingSize, plaintext_size);
    out[plaintext_size] = 0; // the last byte is now a stale copy; leave no extra plaintext byte
}

void DataKey::blind_index(ByteView plaintext, uint8_t* out)
{
    require(KeyPurpose::BlindIndex);
    format::write_be32(out, ref_.key_id);
    format::write_be32(out + 4, ref_.version);
    indexer_->compute(plaintext, out + kBlindIndexPrefixSize);
}

} // namespace pgphi
