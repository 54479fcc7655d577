#include "kms_provider.hpp"

#include <ctime>

#include <curl/curl.h>
#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include "encoding.hpp"
#include "error.hpp"
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

// Takes a base64 field holding key material out of a response, wiping it there.
SecureBytes take_secret(json& doc, const char* field)
{
    if (!doc.contains(field) || !doc[field].is_string())
        throw Error(ErrorCode::ProviderError, std::string("AWS KMS response has no ") + field);
    auto& text = doc[field].get_ref<std::string&>();
    SecureBytes bytes = base64_decode(text);
    OPENSSL_cleanse(text.data(), text.size());
    return bytes;
}

std::vector<uint8_t> blob_of(const json& doc)
{
    if (!doc.contains("CiphertextBlob") || !doc["CiphertextBlob"].is_string())
        throw Error(ErrorCode::ProviderError, "AWS KMS response has no CiphertextBlob");
    SecureBytes blob = base64_decode(doc["CiphertextBlob"].get<std::string>());
    return std::vector<uint8_t>(blob.data(), blob.data() + blob.size());
}

// Maps a KMS error type to what pgphi reports; `retry` says whether another
// attempt may succeed.
Error kms_error(const std::string& type, const std::string& message, long status, bool& retry)
{
    std::string text = "AWS KMS " + (type.empty() ? "HTTP " + std::to_string(status) : type) +
                       (message.empty() ? "" : ": " + message);
    retry = false;
    if (type == "ThrottlingException" || type == "KMSInternalException" || type == "DependencyTimeoutException" ||
        type == "LimitExceededException" || status == 429 || status >= 500) {
        retry = true;
        return Error(ErrorCode::KeyManagerUnavailable, text, "AWS KMS kept failing after retries.");
    }
    if (type == "AccessDeniedException" || type == "UnrecognizedClientException" ||
        type == "InvalidSignatureException" || type == "ExpiredTokenException" || type == "IncompleteSignature" ||
        status == 403)
        return Error(ErrorCode::KeyManagerDenied, "permission denied by " + text);
    if (type == "DisabledException" || type == "KMSInvalidStateException" || type == "KeyUnavailableException")
        return Error(ErrorCode::KeyManagerKeyDisabled, "the KMS key is not usable: " + text);
    if (type == "InvalidCiphertextException" || type == "IncorrectKeyException")
        return Error(ErrorCode::WrappedDekInvalid, "AWS KMS could not unwrap the DEK: " + text,
                     "The wrapped DEK was altered, moved from another pgphi key or version, or wrapped by "
                     "another KMS key.");
    if (type == "NotFoundException")
        return Error(ErrorCode::KeyNotFound, text);
    return Error(ErrorCode::ProviderError, text);
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
            result = json::parse(response.body, nullptr, false);
            if (result.is_discarded())
                throw Error(ErrorCode::ProviderError, "AWS KMS returned a response that is not JSON");
            return true;
        }
        json error_doc = json::parse(response.body, nullptr, false);
        std::string type, message;
        if (!error_doc.is_discarded() && error_doc.is_object()) {
            type = error_doc.value("__type", "");
            type = type.substr(type.rfind('#') == std::string::npos ? 0 : type.rfind('#') + 1);
            message = error_doc.value("message", error_doc.value("Message", ""));
        }
        bool retry = false;
        Error error = kms_error(type, message, response.status, retry);
        // Credentials may have just expired or been rotated (a new credentials
        // file, new role keys): fetch them again once before calling it a denial.
        if ((type == "ExpiredTokenException" || type == "UnrecognizedClientException" ||
             type == "InvalidSignatureException") && !credentials_refreshed) {
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
    generated.wrapped.blob = blob_of(response);
    generated.wrapped.kek_version = response.value("KeyId", kek_ref);
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
    return WrappedDek{blob_of(response), response.value("KeyId", kek_ref)};
}

SecureBytes KmsKeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    json response = call("Decrypt", {{"KeyId", kek_ref},
                                     {"CiphertextBlob", base64_encode(wrapped)},
                                     {"EncryptionContext", encryption_context(binding)}});
    SecureBytes dek = take_secret(response, "Plaintext");
    if (dek.size() != kDekSize)
        throw Error(ErrorCode::WrappedDekInvalid, "AWS KMS unwrapped a DEK of the wrong size");
    return dek;
}

WrappedDek KmsKeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    json context = encryption_context(binding);
    json response = call("ReEncrypt", {{"CiphertextBlob", base64_encode(wrapped)},
                                       {"SourceKeyId", kek_ref},
                                       {"SourceEncryptionContext", context},
                                       {"DestinationKeyId", kek_ref},
                                       {"DestinationEncryptionContext", context}});
    return WrappedDek{blob_of(response), response.value("KeyId", kek_ref)};
}

KekDescription KmsKeyProvider::describe(const std::string& kek_ref)
{
    json response = call("DescribeKey", {{"KeyId", kek_ref}});
    const json& metadata = response.value("KeyMetadata", json::object());
    if (metadata.value("KeyState", "Enabled") != "Enabled")
        throw Error(ErrorCode::KeyManagerKeyDisabled,
                    "the KMS key is not usable: its state is " + metadata.value("KeyState", std::string("unknown")));
    return KekDescription{name(), kek_ref, metadata.value("Arn", kek_ref)};
}

} // namespace pgphi
