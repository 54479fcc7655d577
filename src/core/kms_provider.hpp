// The AWS KMS key provider: the KEK is a KMS key (id, ARN or alias) that
// never leaves KMS. Requests use the JSON 1.1 protocol, signed with SigV4,
// and carry an encryption context naming the pgphi key and version, so KMS
// itself refuses to unwrap a DEK for another key (and CloudTrail shows which
// pgphi key each call was for).
#pragma once

#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "aws_credentials.hpp"
#include "http_client.hpp"
#include "key_provider.hpp"

namespace pgphi {

// The KMS endpoint of a region as the AWS SDKs' endpoint rules derive it:
// the region's partition (aws, aws-cn, aws-us-gov, aws-iso, aws-iso-b,
// aws-iso-e, aws-iso-f, aws-eusc; unknown regions fall back to aws) gives the
// DNS suffix, FIPS uses "kms-fips", dual-stack the partition's dual-stack
// suffix. Throws ConfigError for a region that is not a host label.
std::string kms_default_endpoint(const std::string& region, bool fips, bool dualstack);
// The same rules for another service ("sts": the regional STS endpoint).
std::string aws_default_endpoint(const std::string& service, const std::string& region, bool fips, bool dualstack);

struct KmsSettings {
    std::string region;
    std::string endpoint; // empty: kms_default_endpoint(region, use_fips, use_dualstack)
    bool use_fips = false;
    bool use_dualstack = false;
    ProxySettings proxy;
    TlsSettings tls;
    HttpTimeouts timeouts;
    RetryPolicy retry;
    bool allow_http_loopback = false;
    AwsCredentialSettings credentials;
    int deletion_window_days = 30; // ScheduleKeyDeletion of a dedicated KEK
};

class KmsKeyProvider final : public KeyProvider {
public:
    explicit KmsKeyProvider(KmsSettings settings);
    ~KmsKeyProvider() override;

    const char* name() const override { return "aws_kms"; }

    WrappedDek wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding) override;
    SecureBytes unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    WrappedDek rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    std::optional<WrappedDek> rewrap_to(const std::string& source_kek, const std::string& destination_kek,
                                        ByteView wrapped, const DekBinding& binding) override;
    KekDescription describe(const std::string& kek_ref) override;
    // CreateKey (a symmetric key described as the pgphi key's own), and
    // ScheduleKeyDeletion with the configured waiting period (7 to 30 days).
    std::string create_dedicated_kek(const std::string& kek_name, const std::string& key_name) override;
    std::string delete_dedicated_kek(const std::string& kek_ref) override;

    // GenerateMac / VerifyMac with an HMAC_256 KMS key (HMAC_SHA_256); the MAC
    // is "kms:HMAC_SHA_256:" and KMS's base64.
    std::string audit_mac(const std::string& key_ref, ByteView message) override;
    bool verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac) override;
    // The plaintext of a generated DEK is left empty (GenerateDataKeyWithoutPlaintext).
    GeneratedDek generate_dek(const std::string& kek_ref, const DekBinding& binding) override;

private:
    // Signs and sends one operation, retrying throttling and transient
    // failures; throws a pgphi::Error for every KMS error type.
    nlohmann::json call(const std::string& operation, const nlohmann::json& body);

    KmsSettings settings_;
    Endpoint endpoint_;
    HttpClient http_;
    AwsCredentialChain credentials_;
};

} // namespace pgphi
