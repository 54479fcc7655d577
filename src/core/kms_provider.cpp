#include "kms_provider.hpp"

#include <cctype>
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

// The key a wrapped DEK names in Decrypt and ReEncrypt: the key ARN recorded
// when it was wrapped, else the configured reference (a catalog from before
// pgphi recorded ARNs, or one whose KEK version is not an ARN).
std::string source_key(const std::string& kek_ref, const DekBinding& binding)
{
    std::string arn = kms::arn_of_kek_version(binding.wrapped_by);
    return arn.rfind("arn:", 0) == 0 && arn.find(":key/") != std::string::npos ? arn : kek_ref;
}

struct Partition {
    const char* id;
    const char* region_prefix;   // regions of the partition start with it ...
    const char* region_pattern;  // ... and match <prefix>-<word>-<digits> (nullptr: aws's own list)
    const char* dns_suffix;
    const char* dualstack_suffix;
};

// botocore's partitions.json (1.43): regionRegex, dnsSuffix, dualStackDnsSuffix.
// Every partition supports FIPS and dual-stack there.
constexpr Partition kPartitions[] = {
    {"aws-cn", "cn-", nullptr, "amazonaws.com.cn", "api.amazonwebservices.com.cn"},
    {"aws-us-gov", "us-gov-", nullptr, "amazonaws.com", "api.aws"},
    {"aws-iso", "us-iso-", nullptr, "c2s.ic.gov", "api.aws.ic.gov"},
    {"aws-iso-b", "us-isob-", nullptr, "sc2s.sgov.gov", "api.aws.scloud"},
    {"aws-iso-e", "eu-isoe-", nullptr, "cloud.adc-e.uk", "api.cloud-aws.adc-e.uk"},
    {"aws-iso-f", "us-isof-", nullptr, "csp.hci.ic.gov", "api.aws.hci.ic.gov"},
    {"aws-eusc", "eusc-de-", nullptr, "amazonaws.eu", "api.amazonwebservices.eu"},
};
constexpr Partition kAws = {"aws", "", nullptr, "amazonaws.com", "api.aws"};

// "<prefix><word>-<digits>" (botocore's \w+ is letters, digits and "_").
bool matches_partition(const std::string& region, const std::string& prefix)
{
    if (region.rfind(prefix, 0) != 0)
        return false;
    std::string rest = region.substr(prefix.size());
    size_t dash = rest.rfind('-');
    if (dash == std::string::npos || dash == 0 || dash + 1 == rest.size())
        return false;
    for (size_t i = 0; i < dash; ++i)
        if (!std::isalnum(static_cast<unsigned char>(rest[i])) && rest[i] != '_')
            return false;
    for (size_t i = dash + 1; i < rest.size(); ++i)
        if (!std::isdigit(static_cast<unsigned char>(rest[i])))
            return false;
    return true;
}

} // namespace

std::string kms_default_endpoint(const std::string& region, bool fips, bool dualstack)
{
    return aws_default_endpoint("kms", region, fips, dualstack);
}

std::string aws_default_endpoint(const std::string& service, const std::string& region, bool fips, bool dualstack)
{
    // The endpoint rules require a valid host label (RFC 1123, lower case here).
    bool valid = !region.empty() && region.size() <= 63 && region.front() != '-' && region.back() != '-';
    for (char c : region)
        valid = valid && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-');
    if (!valid)
        throw Error(ErrorCode::ConfigError, "pgphi.aws_region is not a valid AWS region name", {},
                    "Set it to a region such as us-east-1, or set pgphi.aws_kms_endpoint.");
    const Partition* partition = &kAws;
    for (const Partition& candidate : kPartitions)
        if (matches_partition(region, candidate.region_prefix))
            partition = &candidate;
    return "https://" + service + (fips ? "-fips." : ".") + region + "." +
           (dualstack ? partition->dualstack_suffix : partition->dns_suffix);
}

KmsKeyProvider::KmsKeyProvider(KmsSettings settings)
    : settings_(std::move(settings)),
      http_(kService, settings_.tls, settings_.timeouts, PlainHttp{settings_.allow_http_loopback, false},
            settings_.proxy),
      credentials_(settings_.credentials)
{
    if (settings_.region.empty())
        throw Error(ErrorCode::ConfigError, "AWS KMS needs a region", {}, "Set pgphi.aws_region.");
    endpoint_ = parse_endpoint(settings_.endpoint.empty()
                                   ? kms_default_endpoint(settings_.region, settings_.use_fips, settings_.use_dualstack)
                                   : settings_.endpoint,
                               kService);
}

KmsKeyProvider::~KmsKeyProvider() = default;

json KmsKeyProvider::call(const std::string& operation, const json& body)
{
    std::string payload = body.dump();
    json result;
    Error last_error(ErrorCode::KeyManagerUnavailable, "AWS KMS did not answer");
    bool credentials_refreshed = false;

    bool done = with_retries(settings_.retry, [&](int) {
        // The path and Host header signed are those sent (a VPC endpoint's
        // "https://host:443/" included: libcurl omits the default port).
        sigv4::Request signing{"POST", endpoint_.path, "", {}, payload};
        signing.headers = {{"host", endpoint_.host_header},
                           {"content-type", "application/x-amz-json-1.1"},
                           {"x-amz-target", "TrentService." + operation}};
        std::string authorization;
        try {
            // A credential source that cannot be reached (STS, the container
            // endpoint or the metadata service down or throttling) is retried
            // like KMS itself; a refusal is not.
            const sigv4::Credentials& credentials = credentials_.get(std::time(nullptr));
            authorization = sigv4::sign(signing, credentials, settings_.region, "kms", std::time(nullptr));
        } catch (const Error& e) {
            if (e.code() != ErrorCode::KeyManagerUnavailable)
                throw;
            last_error = e;
            return false;
        }

        HttpRequest request;
        request.method = "POST";
        request.url = endpoint_.origin + endpoint_.path;
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
        if (reply.type.empty()) {
            // The error type may come only in x-amzn-ErrorType ("Type:uri").
            std::string header = response.header("x-amzn-errortype");
            reply.type = header.substr(0, header.find(':'));
        }
        bool retry = false;
        Error error = kms::error_for(reply, response.status, retry);
        // The request id, for a support case, with every failure.
        std::string request_id = response.header("x-amzn-requestid");
        if (!request_id.empty() && request_id.size() <= 64)
            error = Error(error.code(), std::string(error.what()) + " (AWS request id " + request_id + ")",
                          error.detail(), error.hint());
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
    generated.wrapped.kek_version = kms::kek_version(response, kek_ref, "KeyMaterialId");
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
    return WrappedDek{kms::ciphertext_blob(response), kms::kek_version(response, kek_ref, "KeyMaterialId")};
}

SecureBytes KmsKeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    json response = call("Decrypt", {{"KeyId", source_key(kek_ref, binding)},
                                     {"CiphertextBlob", base64_encode(wrapped)},
                                     {"EncryptionContext", encryption_context(binding)}});
    return kms::unwrapped_dek(response);
}

WrappedDek KmsKeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    return *rewrap_to(kek_ref, kek_ref, wrapped, binding);
}

// ReEncrypt names the key that wrapped the DEK as the source and the new one
// as the destination; the binding (encryption context) stays the same.
std::optional<WrappedDek> KmsKeyProvider::rewrap_to(const std::string& source_kek, const std::string& destination_kek,
                                                    ByteView wrapped, const DekBinding& binding)
{
    json context = encryption_context(binding);
    json response = call("ReEncrypt", {{"CiphertextBlob", base64_encode(wrapped)},
                                       {"SourceKeyId", source_key(source_kek, binding)},
                                       {"SourceEncryptionContext", context},
                                       {"DestinationKeyId", destination_kek},
                                       {"DestinationEncryptionContext", context}});
    return WrappedDek{kms::ciphertext_blob(response),
                      kms::kek_version(response, destination_kek, "DestinationKeyMaterialId")};
}

KekDescription KmsKeyProvider::describe(const std::string& kek_ref)
{
    json response = call("DescribeKey", {{"KeyId", kek_ref}});
    return KekDescription{name(), kek_ref, kms::described_arn(response, kek_ref)};
}

std::string KmsKeyProvider::create_dedicated_kek(const std::string& kek_name, const std::string& key_name)
{
    if (!kek_name.empty())
        throw Error(ErrorCode::InvalidArgument, "AWS KMS names a new key itself", {},
                    "Omit kek with dedicated_kek => true; the new key's ARN becomes the pgphi key's KEK.");
    // No Tags: tagging at creation needs kms:TagResource as well.
    json response = call("CreateKey", {{"Description", "pgphi: the dedicated KEK of pgphi key " + key_name},
                                       {"KeyUsage", "ENCRYPT_DECRYPT"},
                                       {"KeySpec", "SYMMETRIC_DEFAULT"}});
    return kms::described_arn(response, "");
}

std::string KmsKeyProvider::delete_dedicated_kek(const std::string& kek_ref)
{
    json description;
    try {
        description = call("DescribeKey", {{"KeyId", kek_ref}});
    } catch (const Error& e) {
        if (e.code() == ErrorCode::KeyNotFound)
            return "the AWS KMS key was already deleted";
        throw;
    }
    if (kms::key_state(description) == "PendingDeletion")
        return "the AWS KMS key was already scheduled for deletion";
    return kms::scheduled_deletion(
        call("ScheduleKeyDeletion", {{"KeyId", kek_ref}, {"PendingWindowInDays", settings_.deletion_window_days}}));
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
