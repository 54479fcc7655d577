#include "kms_response.hpp"

#include <ctime>

#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include "encoding.hpp"
#include "key_provider.hpp"

namespace pgphi::kms {

using nlohmann::json;

namespace {

// doc[name] when doc is an object that has it, else nullptr. (nlohmann's
// value() and operator[] throw or assert on other types.)
const json* member(const json& doc, const char* name)
{
    if (!doc.is_object())
        return nullptr;
    auto it = doc.find(name);
    return it == doc.end() ? nullptr : &*it;
}

// An optional string field: `fallback` when absent or null, ProviderError
// when it is something else.
std::string string_or(const json& doc, const char* name, const std::string& fallback)
{
    const json* value = member(doc, name);
    if (!value || value->is_null())
        return fallback;
    if (!value->is_string())
        throw Error(ErrorCode::ProviderError, std::string("AWS KMS returned a ") + name + " that is not a string");
    return value->get<std::string>();
}

// A string field of an error answer, which is read leniently: "" unless a string.
std::string error_text(const json& doc, const char* name)
{
    const json* value = member(doc, name);
    return value && value->is_string() ? value->get<std::string>() : std::string();
}

} // namespace

json parse_reply(const std::string& body)
{
    json doc = json::parse(body, nullptr, false);
    if (doc.is_discarded() || !doc.is_object())
        throw Error(ErrorCode::ProviderError, "AWS KMS returned a response that is not a JSON object");
    return doc;
}

ErrorReply parse_error(const std::string& body)
{
    json doc = json::parse(body, nullptr, false);
    ErrorReply reply;
    if (doc.is_discarded())
        return reply;
    // "com.amazonaws.kms#NotFoundException" -> "NotFoundException"
    reply.type = error_text(doc, "__type");
    size_t hash = reply.type.rfind('#');
    if (hash != std::string::npos)
        reply.type.erase(0, hash + 1);
    reply.message = error_text(doc, "message");
    if (reply.message.empty())
        reply.message = error_text(doc, "Message");
    return reply;
}

Error error_for(const ErrorReply& reply, long status, bool& retry)
{
    const std::string& type = reply.type;
    std::string text = "AWS KMS " + (type.empty() ? "HTTP " + std::to_string(status) : type) +
                       (reply.message.empty() ? "" : ": " + reply.message);
    retry = false;
    // Retryable, as the SDKs' standard mode and KMS's documentation have it:
    // throttling, internal and dependency failures, and KeyUnavailableException
    // (the key material is briefly unreachable, e.g. a custom key store).
    if (type == "ThrottlingException" || type == "KMSInternalException" || type == "DependencyTimeoutException" ||
        type == "LimitExceededException" || type == "KeyUnavailableException" || status == 429 || status >= 500) {
        retry = true;
        return Error(ErrorCode::KeyManagerUnavailable, text, "AWS KMS kept failing after retries.");
    }
    if (type == "AccessDeniedException" || type == "UnrecognizedClientException" ||
        type == "InvalidSignatureException" || type == "ExpiredTokenException" || type == "IncompleteSignature" ||
        status == 403)
        return Error(ErrorCode::KeyManagerDenied, "permission denied by " + text);
    if (type == "DisabledException" || type == "KMSInvalidStateException")
        return Error(ErrorCode::KeyManagerKeyDisabled, "the KMS key is not usable: " + text);
    if (type == "InvalidCiphertextException" || type == "IncorrectKeyException")
        return Error(ErrorCode::WrappedDekInvalid, "AWS KMS could not unwrap the DEK: " + text,
                     "The wrapped DEK was altered, moved from another pgphi key or version, or wrapped by "
                     "another KMS key.");
    if (type == "NotFoundException")
        return Error(ErrorCode::KeyNotFound, text);
    return Error(ErrorCode::ProviderError, text);
}

bool credentials_refused(const ErrorReply& reply)
{
    return reply.type == "ExpiredTokenException" || reply.type == "UnrecognizedClientException" ||
           reply.type == "InvalidSignatureException";
}

std::vector<uint8_t> ciphertext_blob(const json& response)
{
    const json* text = member(response, "CiphertextBlob");
    if (!text || !text->is_string())
        throw Error(ErrorCode::ProviderError, "AWS KMS response has no CiphertextBlob");
    SecureBytes blob = base64_decode(text->get_ref<const std::string&>());
    if (blob.empty())
        throw Error(ErrorCode::ProviderError, "AWS KMS returned an empty CiphertextBlob");
    return std::vector<uint8_t>(blob.data(), blob.data() + blob.size());
}

SecureBytes unwrapped_dek(json& response)
{
    const json* found = member(response, "Plaintext");
    if (!found || !found->is_string())
        throw Error(ErrorCode::ProviderError, "AWS KMS response has no Plaintext");
    // The base64 text is the DEK: wiped whether or not it decodes.
    std::string& text = response["Plaintext"].get_ref<std::string&>();
    WipeOnExit wipe_text(text);
    SecureBytes dek = base64_decode(text);
    if (dek.size() != KeyProvider::kDekSize)
        throw Error(ErrorCode::WrappedDekInvalid, "AWS KMS unwrapped a DEK of the wrong size");
    return dek;
}

std::string key_id(const json& response, const std::string& fallback)
{
    std::string id = string_or(response, "KeyId", fallback);
    return id.empty() ? fallback : id;
}

std::string kek_version(const json& response, const std::string& fallback, const char* material_field)
{
    std::string arn = key_id(response, fallback);
    const json* material = member(response, material_field);
    if (!material)
        return arn;
    const std::string* id = material->is_string() ? material->get_ptr<const std::string*>() : nullptr;
    bool valid = id && id->size() == 64 &&
                 id->find_first_not_of("0123456789abcdef") == std::string::npos;
    if (!valid)
        throw Error(ErrorCode::ProviderError, std::string("AWS KMS answered an invalid ") + material_field);
    return arn + "#" + *id;
}

std::string arn_of_kek_version(const std::string& kek_version)
{
    return kek_version.substr(0, kek_version.find('#'));
}

std::string described_arn(const json& response, const std::string& fallback)
{
    const json* metadata = member(response, "KeyMetadata");
    if (!metadata || !metadata->is_object())
        throw Error(ErrorCode::ProviderError, "AWS KMS's description of the key has no KeyMetadata");
    std::string state = string_or(*metadata, "KeyState", "Enabled");
    if (state != "Enabled")
        throw Error(ErrorCode::KeyManagerKeyDisabled, "the KMS key is not usable: its state is " + state);
    std::string arn = string_or(*metadata, "Arn", fallback);
    return arn.empty() ? fallback : arn;
}

std::string key_state(const json& response)
{
    const json* metadata = member(response, "KeyMetadata");
    return metadata && metadata->is_object() ? string_or(*metadata, "KeyState", "") : "";
}

std::string scheduled_deletion(const json& response)
{
    const json* date = member(response, "DeletionDate");
    if (!date || !date->is_number() || date->get<double>() <= 0 || date->get<double>() > 1e11)
        throw Error(ErrorCode::ProviderError, "AWS KMS's answer to ScheduleKeyDeletion has no DeletionDate");
    std::time_t when = static_cast<std::time_t>(date->get<double>());
    std::tm utc{};
    gmtime_r(&when, &utc);
    char text[32];
    std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
    const json* days = member(response, "PendingWindowInDays");
    return std::string("AWS KMS deletes the key on ") + text +
           (days && days->is_number_integer() ? " (after a waiting period of " +
                                                    std::to_string(days->get<long>()) + " days)"
                                              : "");
}

} // namespace pgphi::kms
