// libFuzzer target for the parsers of AWS KMS's JSON 1.1 answers
// (src/core/kms_response.cpp): each input is one HTTP body, read as an error
// answer (with several statuses) and as the successful answer of
// GenerateDataKeyWithoutPlaintext, Encrypt, ReEncrypt, Decrypt and
// DescribeKey. Every parser returns or refuses with a pgphi::Error; the DEK
// of a Decrypt answer is wiped there, even when the answer is refused.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_support.hpp"
#include "kms_response.hpp"

using namespace pgphi;
using nlohmann::json;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const std::string body(reinterpret_cast<const char*>(data), size);

    // Error answers: every one maps to an error, whatever the status.
    kms::ErrorReply reply;
    fuzz::refuses_cleanly("parse_error", {}, [&] { reply = kms::parse_error(body); });
    for (long status : {400L, 403L, 404L, 429L, 500L, 503L}) {
        bool retry = false;
        fuzz::refuses_cleanly("error_for", {}, [&] {
            Error error = kms::error_for(reply, status, retry);
            fuzz::require(error.code() != ErrorCode::Internal, "error_for", "internal error code");
            fuzz::require(!retry || error.code() == ErrorCode::KeyManagerUnavailable, "error_for",
                          "retries an error that is not transient");
        });
        fuzz::refuses_cleanly("credentials_refused", {}, [&] { kms::credentials_refused(reply); });
    }

    json doc;
    if (!fuzz::refuses_cleanly("parse_reply", {ErrorCode::ProviderError}, [&] { doc = kms::parse_reply(body); }))
        return 0;

    // GenerateDataKeyWithoutPlaintext, Encrypt, ReEncrypt
    fuzz::refuses_cleanly("ciphertext_blob", {ErrorCode::ProviderError}, [&] { kms::ciphertext_blob(doc); });
    std::string id;
    if (fuzz::refuses_cleanly("key_id", {ErrorCode::ProviderError}, [&] { id = kms::key_id(doc, "fallback"); }))
        fuzz::require(!id.empty(), "key_id", "empty key id");

    // Decrypt: the base64 DEK is wiped from the answer whatever happens.
    json decrypt = doc;
    bool had_plaintext = decrypt.is_object() && decrypt.contains("Plaintext") && decrypt["Plaintext"].is_string();
    SecureBytes dek;
    if (fuzz::refuses_cleanly("unwrapped_dek", {ErrorCode::ProviderError, ErrorCode::WrappedDekInvalid},
                              [&] { dek = kms::unwrapped_dek(decrypt); }))
        fuzz::require(dek.size() == 32, "unwrapped_dek", "returned a DEK that is not 32 bytes");
    if (had_plaintext)
        fuzz::require(fuzz::wiped(decrypt["Plaintext"].get_ref<const std::string&>()), "unwrapped_dek",
                      "left the DEK's base64 in the answer");

    // DescribeKey
    std::string arn;
    if (fuzz::refuses_cleanly("described_arn", {ErrorCode::ProviderError, ErrorCode::KeyManagerKeyDisabled},
                              [&] { arn = kms::described_arn(doc, "fallback"); }))
        fuzz::require(!arn.empty(), "described_arn", "empty ARN");
    return 0;
}
