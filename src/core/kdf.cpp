#include "kdf.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "error.hpp"

namespace pgphi {

SecureBytes hkdf_sha256(ByteView key, ByteView salt, ByteView info, size_t length)
{
    SecureBytes out(length);
    EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
    EVP_KDF_CTX* ctx = kdf ? EVP_KDF_CTX_new(kdf) : nullptr;
    EVP_KDF_free(kdf); // the context holds its own reference

    char digest[] = "SHA256";
    OSSL_PARAM params[5];
    size_t n = 0;
    params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<uint8_t*>(key.data), key.size);
    if (salt.size > 0)
        params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<uint8_t*>(salt.data),
                                                        salt.size);
    if (info.size > 0)
        params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<uint8_t*>(info.data),
                                                        info.size);
    params[n] = OSSL_PARAM_construct_end();

    // EVP_KDF_CTX_free cleanses the context's copy of the key.
    bool ok = ctx && EVP_KDF_derive(ctx, out.data(), length, params) == 1;
    EVP_KDF_CTX_free(ctx);
    if (!ok)
        throw Error(ErrorCode::Internal, "OpenSSL HKDF-SHA-256 failure");
    return out;
}

} // namespace pgphi
