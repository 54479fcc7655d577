// Where the AWS KMS provider gets its credentials: the AWS SDKs' default
// chain, in their order.
//
//  1. static keys in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//     AWS_SESSION_TOKEN);
//  2. a profile of the shared config and credentials files, with static keys
//     or a role to assume: role_arn with source_profile (STS AssumeRole, in a
//     chain of profiles), with web_identity_token_file, or with
//     credential_source (Environment, Ec2InstanceMetadata, EcsContainer);
//  3. web identity: a token file and a role (STS AssumeRoleWithWebIdentity,
//     unsigned; EKS IRSA);
//  4. the container credentials endpoint (ECS, EKS Pod Identity), with an
//     authorization token read from a file at each fetch;
//  5. the EC2 instance metadata service (IMDSv2 token flow).
//
// Each source is configured by a setting (src/pg/shared/settings.cpp); with
// use_environment, an empty setting takes the SDKs' environment variable
// (apply_environment). Temporary credentials are refreshed before they
// expire (five minutes early, or a quarter of their lifetime when that is
// shorter); when a refresh fails while the credentials held are still valid,
// they are kept.
#pragma once

#include <ctime>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "error.hpp"
#include "http_client.hpp"
#include "sigv4.hpp"

namespace pgphi {

struct AwsCredentialSettings {
    bool use_environment = true;
    std::string credentials_file; // shared credentials file; empty: skip
    std::string config_file;      // shared config file; empty: skip
    std::string profile = "default";
    std::string region;           // signs STS requests
    std::string sts_endpoint;     // https://sts.<region>.<suffix>; needed for roles
    std::string role_arn;         // with web_identity_token_file: web identity
    std::string role_session_name;
    std::string web_identity_token_file;
    std::string container_credentials_uri;          // full URI
    std::string container_credentials_relative_uri; // appended to http://169.254.170.2
    std::string container_authorization_token_file;
    std::string container_authorization_token;      // the environment's AWS_CONTAINER_AUTHORIZATION_TOKEN
    std::string imds_endpoint;    // empty: skip; normally http://169.254.169.254
    TlsSettings tls;              // STS and https container endpoints
    ProxySettings proxy;          // STS only (never the link-local services)
    HttpTimeouts timeouts;
    HttpTimeouts imds_timeouts{std::chrono::milliseconds(1000), std::chrono::milliseconds(2000)};
    bool allow_http_loopback = false;
};

// Fills the empty settings from the SDKs' environment variables
// (AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE, AWS_PROFILE when the profile
// is "default", AWS_ROLE_ARN, AWS_ROLE_SESSION_NAME,
// AWS_WEB_IDENTITY_TOKEN_FILE, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI,
// AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE,
// AWS_CONTAINER_AUTHORIZATION_TOKEN) when use_environment is on.
void apply_environment(AwsCredentialSettings& settings);

// The parsers behind the chain, callable without a file or a network (the
// fuzz target test/fuzz/aws_credentials_fuzz.cpp and the unit tests use them).
namespace aws {

// The profiles of a shared config file ("[profile name]", "[default]"; other
// sections ignored) or credentials file ("[name]"), as key = value maps. The
// values are wiped when the set is destroyed (they hold secret keys).
struct ProfileSet {
    std::map<std::string, std::map<std::string, std::string>> profiles;
    ~ProfileSet();
};
void parse_profiles(const std::string& text, bool config_format, ProfileSet& into);

// One role a profile chain assumes.
struct RoleStep {
    std::string role_arn;
    std::string session_name; // empty: pgphi's default
    std::string external_id;
    std::string profile;      // the profile that names it (for messages)
};

// What a profile resolves to: base credentials, then roles assumed in turn,
// each with the credentials the previous step produced.
struct ProfileChain {
    enum class Base { StaticKeys, WebIdentity, Environment, InstanceMetadata, Container };
    Base base = Base::StaticKeys;
    sigv4::Credentials static_keys;      // Base::StaticKeys
    std::string web_identity_token_file; // Base::WebIdentity: roles[0] is the web identity's role
    std::vector<RoleStep> roles;
};

// Follows role_arn / source_profile from `profile` as the SDKs do: a profile
// whose source_profile is itself uses its own static keys; any other cycle,
// a missing source profile, a role_arn with neither source_profile nor
// credential_source, or a chain of more than 16 profiles is a ConfigError.
ProfileChain resolve_profile(const ProfileSet& profiles, const std::string& profile);

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

// The container credentials endpoint's JSON document (AccessKeyId,
// SecretAccessKey, Token, Expiration), as imds_credentials.
sigv4::Credentials container_credentials(const std::string& body, std::time_t now, std::time_t& expires_at);

// The Credentials of an STS AssumeRole or AssumeRoleWithWebIdentity answer
// (XML, query protocol); `action` is the operation's name. ProviderError
// when the answer is not that operation's result or lacks a field, or the
// credentials have expired already.
sigv4::Credentials sts_credentials(const std::string& xml, const std::string& action, std::time_t now,
                                   std::time_t& expires_at);

// The Code, Message and RequestId of an STS ErrorResponse ("" when absent).
struct StsError {
    std::string code;
    std::string message;
    std::string request_id;
};
StsError sts_error(const std::string& xml);

// The pgphi error for an STS failure: refusals (bad or expired token,
// unknown role, bad signature) are KeyManagerDenied; throttling,
// IDPCommunicationError and 5xx are KeyManagerUnavailable (retried).
Error sts_failure(const StsError& error, long status, const std::string& action);

// application/x-www-form-urlencoded, as the query protocol sends it.
std::string form_encode(const std::vector<std::pair<std::string, std::string>>& fields);

} // namespace aws

class AwsCredentialChain {
public:
    // Reads the environment into `settings` first (apply_environment).
    explicit AwsCredentialChain(AwsCredentialSettings settings);
    ~AwsCredentialChain();

    // Current credentials; throws KeyManagerDenied when no source has any,
    // KeyManagerUnavailable when a source could not be reached (the caller
    // retries). Credentials still valid are kept when a refresh fails.
    const sigv4::Credentials& get(std::time_t now);

    // Forgets cached credentials (after the service rejected them).
    void invalidate() { expires_at_ = 0; refresh_at_ = 0; }

    const char* source() const { return source_; }
    // When the credentials held expire (0: none held; max: never).
    std::time_t expires_at() const { return expires_at_; }

private:
    bool from_environment();
    bool from_profile(std::time_t now);
    bool from_web_identity(std::time_t now);
    bool from_container(std::time_t now);
    bool from_metadata_service(std::time_t now);
    void refresh(std::time_t now);
    void keep(const sigv4::Credentials& fetched, std::time_t now, std::time_t expires_at, const char* source);

    // The base credentials a profile chain starts from.
    void base_credentials(const aws::ProfileChain& chain, std::time_t now, sigv4::Credentials& out,
                          std::time_t& expires_at);
    void assume_role(const sigv4::Credentials& with, const aws::RoleStep& role, std::time_t now,
                     sigv4::Credentials& out, std::time_t& expires_at);
    void assume_role_with_web_identity(const std::string& token_file, const aws::RoleStep& role, std::time_t now,
                                       sigv4::Credentials& out, std::time_t& expires_at);
    void sts_call(const std::string& action, const std::string& body, const sigv4::Credentials* signer,
                  std::time_t now, sigv4::Credentials& out, std::time_t& expires_at);
    void container_fetch(std::time_t now, sigv4::Credentials& out, std::time_t& expires_at);
    void imds_fetch(std::time_t now, sigv4::Credentials& out, std::time_t& expires_at);
    std::string session_name(const aws::RoleStep& role, std::time_t now) const;

    AwsCredentialSettings settings_;
    sigv4::Credentials current_;
    std::time_t expires_at_ = 0; // 0: nothing cached
    std::time_t refresh_at_ = 0; // when to fetch again
    const char* source_ = "none";
    std::unique_ptr<HttpClient> imds_;
    std::unique_ptr<HttpClient> sts_;
    std::unique_ptr<HttpClient> container_;
};

} // namespace pgphi
