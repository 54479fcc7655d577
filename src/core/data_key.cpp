#include "data_key.hpp"

#include "error.hpp"

namespace pgphi {

DataKey::DataKey(format::KeyRef ref, std::string name, const SecureBytes& dek)
    : ref_(ref), name_(std::move(name)), cipher_(ByteView(dek.data(), dek.size()))
{
}

void DataKey::seal(NonceSource& nonces, ByteView plaintext, ByteView context, uint8_t* out)
{
    uint8_t* nonce = out + format::kPrefixSize;
    uint8_t* body = nonce + format::kGcmNonceSize;
    format::write_prefix(out, ref_);
    nonces.next(nonce);
    cipher_.seal(nonce, ByteView(out, format::kPrefixSize), context, plaintext, body,
                 body + plaintext.size);
    ++unreported_seals_;
}

void DataKey::open(const format::ParsedValue& value, ByteView context, uint8_t* out)
{
    if (!cipher_.open(value.nonce, value.prefix, context, value.ciphertext, value.tag, out))
        throw Error(ErrorCode::AuthenticationFailed, "pgphi ciphertext failed authentication",
                    "The value was altered or truncated, or the context given does not match the one "
                    "it was encrypted with.",
                    "Check that the same context is passed to encrypt_phi and decrypt_phi.");
}

} // namespace pgphi
