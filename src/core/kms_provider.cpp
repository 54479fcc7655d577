#include "kms_provider.hpp"

#include <ctime>

#include <curl/curl.h>
#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include "encoding.hpp"
#include "error.hpp"
#include "kms_response.hpp"
#include "sigv4.hpp"

namespace pgphi {

using nlohmann::json;

namespace {

constexpr const char* kService = "AWS KMS";

json encryption_context(const DekBinding& binding)
{
    return json{{"pgphi:key", binding.key_name},
                {"pgphi:key_id", std::to_string(binding.key_id)},
                {"pgphi:key_version", std::to_string(binding.version)}};
}

std::string host_of(const std::string& url)
{
    size_t start = url.find("://");
    start = start == std::string::npos ? 0 : start + 3;
    size_t end = url.find('/', start);
    return url.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

} // namespace

KmsKeyProvider::KmsKeyProvider(KmsSettings settings)
    : settings_(std::move(settings)),
      endpoint_(settings_.endpoint.empty() ? "https://kms." + settings_.region + ".amazonaws.com" : settings_.endpoint),
      http_(kService, settings_.tls, settings_.timeouts, PlainHttp{settings_.allow_http_loopback, false}),
      credentials_(settings_.credentials)
{
    if (settings_.region.empty())
        throw Error(ErrorCode::ConfigError, "AWS KMS needs a region", {}, "Set pgphi.aws_region.");
}

KmsKeyProvider::~KmsKeyProvider() = default;

json KmsKeyProvider::call(const std::string& operation, const json& body)
{
    std::string payload = body.dump();
    json result;
    Error last_error(ErrorCode::KeyManagerUnavailable, "AWS KMS did not answer");
    bool credentials_refreshed = false;

    bool done = with_retries(settings_.retry, [&](int) {
        sigv4::Request signing{"POST", "/", "", {}, payload};
        signing.headers = {{"host", host_of(endpoint_)},
                           {"content-type", "application/x-amz-json-1.1"},
                           {"x-amz-target", "TrentService." + operation}};
        const sigv4::Credentials& credentials = credentials_.get(std::time(nullptr));
        std::string authorization = sigv4::sign(signing, credentials, settings_.region, "kms", std::time(nullptr));

        HttpRequest request;
        request.method = "POST";
        request.url = endpoint_ + "/";
        for (const auto& header : signing.headers)
            if (header.first != "host")
                request.headers.push_back(header);
        request.headers.emplace_back("Authorization", authorization);
        request.body = payload;

        HttpResponse response;
        try {
            response = http_.send(request);
        } catch (const Error& e) {
            if (e.code() != ErrorCode::KeyManagerUnavailable)
                throw;
            last_error = e;
            return false; // transport failure: retry
        }
        if (response.status == 200) {
            result = kms::parse_reply(response.body);
            return true;
        }
        kms::ErrorReply reply = kms::parse_error(response.body);
        bool retry = false;
        Error error = kms::error_for(reply, response.status, retry);
        // Credentials may have just expired or been rotated (a new credentials
        // file, new role keys): fetch them again once before calling it a denial.
        if (kms::credentials_refused(reply) && !credentials_refreshed) {
            credentials_.invalidate();
            credentials_refreshed = true;
            last_error = error;
            return false;
        }
        if (!retry)
            throw error;
        last_error = error;
        return false;
    });
    OPENSSL_cleanse(payload.data(), payload.size());
    if (!done)
        throw last_error;
    return result;
}

GeneratedDek KmsKeyProvider::generate_dek(const std::string& kek_ref, const DekBinding& binding)
{
    // Without plaintext: the new DEK is first unwrapped by the session that
    // uses it, so it never needs to leave KMS here.
    json response = call("GenerateDataKeyWithoutPlaintext",
                         {{"KeyId", kek_ref}, {"KeySpec", "AES_256"},
                          {"EncryptionContext", encryption_context(binding)}});
    GeneratedDek generated;
    generated.wrapped.blob = kms::ciphertext_blob(response);
    generated.wrapped.kek_version = kms::key_id(response, kek_ref);
    return generated;
}

WrappedDek KmsKeyProvider::wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding)
{
    json request = {{"KeyId", kek_ref},
                    {"Plaintext", base64_encode(ByteView(dek.data(), dek.size()))},
                    {"EncryptionContext", encryption_context(binding)}};
    json response = call("Encrypt", request);
    auto& plaintext_in_request = request["Plaintext"].get_ref<std::string&>();
    OPENSSL_cleanse(plaintext_in_request.data(), plaintext_in_request.size());
    return WrappedDek{kms::ciphertext_blob(response), kms::key_id(response, kek_ref)};
}

SecureBytes KmsKeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    json response = call("Decrypt", {{"KeyId", kek_ref},
                                     {"CiphertextBlob", base64_encode(wrapped)},
                                     {"EncryptionContext", encryption_context(binding)}});
    return kms::unwrapped_dek(response);
}

WrappedDek KmsKeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    json context = encryption_context(binding);
    json response = call("ReEncrypt", {{"CiphertextBlob", base64_encode(wrapped)},
                                       {"SourceKeyId", kek_ref},
                                       {"SourceEncryptionContext", context},
                                       {"DestinationKeyId", kek_ref},
                                       {"DestinationEncryptionContext", context}});
    return WrappedDek{kms::ciphertext_blob(response), kms::key_id(response, kek_ref)};
}

KekDescription KmsKeyProvider::describe(const std::string& kek_ref)
{
    json response = call("DescribeKey", {{"KeyId", kek_ref}});
    return KekDescription{name(), kek_ref, kms::described_arn(response, kek_ref)};
}

namespace {
constexpr const char* kKmsMacPrefix = "kms:HMAC_SHA_256:";
}

std::string KmsKeyProvider::audit_mac(const std::string& key_ref, ByteView message)
{
    json response = call("GenerateMac", {{"KeyId", key_ref},
                                         {"Message", base64_encode(message)},
                                         {"MacAlgorithm", "HMAC_SHA_256"}});
    if (!response.is_object() || !response.contains("Mac") || !response["Mac"].is_string() ||
        response["Mac"].get_ref<const std::string&>().empty())
        throw Error(ErrorCode::ProviderError, "AWS KMS GenerateMac response has no Mac");
    return kKmsMacPrefix + response["Mac"].get<std::string>();
}

bool KmsKeyProvider::verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac)
{
    std::string prefix = kKmsMacPrefix;
    if (mac.compare(0, prefix.size(), prefix) != 0 || mac.size() == prefix.size())
        return false; // not a KMS HMAC at all
    json response;
    try {
        response = call("VerifyMac", {{"KeyId", key_ref},
                                      {"Message", base64_encode(message)},
                                      {"Mac", mac.substr(prefix.size())},
                                      {"MacAlgorithm", "HMAC_SHA_256"}});
    } catch (const Error& e) {
        // KMS says KMSInvalidMacException for a MAC that does not verify, and
        // rejects one that is not base64 or has the wrong length.
        std::string what = e.what();
        if (e.code() == ErrorCode::ProviderError &&
            (what.find("KMSInvalidMacException") != std::string::npos ||
             what.find("ValidationException") != std::string::npos ||
             what.find("SerializationException") != std::string::npos))
            return false;
        throw;
    }
    return response.is_object() && response.contains("MacValid") && response["MacValid"].is_boolean() &&
           response["MacValid"].get<bool>();
}

} // namespace pgphi
