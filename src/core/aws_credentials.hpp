// Where the AWS KMS provider gets its credentials, in the order the AWS SDKs
// use: the server's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
// AWS_SESSION_TOKEN), a shared-credentials-style file, then the EC2 instance
// metadata service (IMDSv2 token flow). Temporary credentials are cached
// until shortly before they expire.
#pragma once

#include <ctime>
#include <memory>
#include <string>

#include "http_client.hpp"
#include "sigv4.hpp"

namespace pgphi {

struct AwsCredentialSettings {
    bool use_environment = true;
    std::string credentials_file; // empty: skip
    std::string profile = "default";
    std::string imds_endpoint;    // empty: skip; normally http://169.254.169.254
    HttpTimeouts imds_timeouts{std::chrono::milliseconds(1000), std::chrono::milliseconds(2000)};
    bool allow_http_loopback = false;
};

// The parsers behind the chain, callable without a file or a network (the
// fuzz target test/fuzz/aws_credentials_fuzz.cpp uses them).
namespace aws {

// The named profile of a shared-credentials-style file; ConfigError naming
// `path` when the profile lacks a key id or secret.
sigv4::Credentials parse_credentials_file(const std::string& text, const std::string& profile,
                                          const std::string& path);

// The session token of an IMDSv2 PUT /latest/api/token answer, which goes
// into a header of the next requests; ProviderError unless it is one word of
// visible ASCII.
std::string imds_session_token(const std::string& body);

// The role name from the metadata service's security-credentials listing,
// which goes into the next request's path: KeyManagerDenied when there is
// none, ProviderError when it is not an IAM role name.
std::string imds_role_name(const std::string& listing);

// The role's credentials document; sets `expires_at` from its Expiration
// (or a few minutes from `now` when it has none).
sigv4::Credentials imds_credentials(const std::string& body, std::time_t now, std::time_t& expires_at);

} // namespace aws

class AwsCredentialChain {
public:
    explicit AwsCredentialChain(AwsCredentialSettings settings);

    // Current credentials; throws KeyManagerDenied when no source has any.
    const sigv4::Credentials& get(std::time_t now);

    // Forgets cached credentials (after the service rejected them).
    void invalidate() { expires_at_ = 0; }

    const char* source() const { return source_; }

private:
    bool from_environment();
    bool from_file();
    bool from_metadata_service(std::time_t now);

    AwsCredentialSettings settings_;
    sigv4::Credentials current_;
    std::time_t expires_at_ = 0; // 0: nothing cached
    const char* source_ = "none";
    std::unique_ptr<HttpClient> imds_;
};

} // namespace pgphi
