// libFuzzer target for what the AWS credential sources parse
// (src/core/aws_credentials.cpp): the EC2 instance metadata service's role
// listing and credentials document, which arrive over plain http, and the
// shared-credentials file, STS's XML answers and errors, the container
// credentials endpoint's document, and shared config profile chains. Each input is given to every parser; each returns
// or refuses with a pgphi::Error.
#include <cstdint>
#include <ctime>
#include <string>

#include "aws_credentials.hpp"
#include "fuzz_support.hpp"

using namespace pgphi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const std::string text(reinterpret_cast<const char*>(data), size);

    // Both go into the next requests: a header value and a URL path.
    std::string token;
    if (fuzz::refuses_cleanly("imds_session_token", {ErrorCode::ProviderError},
                              [&] { token = aws::imds_session_token(text); }))
        fuzz::require(fuzz::header_safe(token), "imds_session_token", "token unfit for a header");
    std::string role;
    if (fuzz::refuses_cleanly("imds_role_name", {ErrorCode::KeyManagerDenied, ErrorCode::ProviderError},
                              [&] { role = aws::imds_role_name(text); }))
        fuzz::require(fuzz::header_safe(role) && role.find_first_of("/?#%") == std::string::npos,
                      "imds_role_name", "role name that changes the path");

    const std::time_t now = 1700000000;
    std::time_t expires_at = 0;
    if (fuzz::refuses_cleanly("imds_credentials", {ErrorCode::ProviderError}, [&] {
            sigv4::Credentials credentials = aws::imds_credentials(text, now, expires_at);
            fuzz::require(!credentials.access_key_id.empty() && !credentials.secret_access_key.empty(),
                          "imds_credentials", "accepted credentials without a key id or secret");
        }))
        fuzz::require(expires_at > now, "imds_credentials", "credentials that expired already");

    for (const char* action : {"AssumeRole", "AssumeRoleWithWebIdentity"}) {
        std::time_t sts_expires = 0;
        if (fuzz::refuses_cleanly("sts_credentials", {ErrorCode::ProviderError}, [&] {
                sigv4::Credentials credentials = aws::sts_credentials(text, action, now, sts_expires);
                fuzz::require(fuzz::header_safe(credentials.access_key_id) &&
                                  fuzz::header_safe(credentials.session_token) &&
                                  !credentials.secret_access_key.empty(),
                              "sts_credentials", "credentials unfit for a request");
            }))
            fuzz::require(sts_expires > now, "sts_credentials", "credentials that expired already");
    }
    aws::StsError sts_error = aws::sts_error(text);
    fuzz::require(sts_error.request_id.size() <= 64 && sts_error.code.size() <= 300 && sts_error.message.size() <= 300,
                  "sts_error", "unbounded error fields");
    fuzz::refuses_cleanly("container_credentials", {ErrorCode::ProviderError},
                          [&] { aws::container_credentials(text, now, expires_at); });

    for (bool config_format : {true, false}) {
        aws::ProfileSet profiles;
        aws::parse_profiles(text, config_format, profiles);
        for (const char* profile : {"default", "pgphi"})
            fuzz::refuses_cleanly("resolve_profile", {ErrorCode::ConfigError}, [&] {
                aws::ProfileChain chain = aws::resolve_profile(profiles, profile);
                fuzz::require(chain.roles.size() <= 16, "resolve_profile", "a chain longer than the limit");
                fuzz::require(chain.base != aws::ProfileChain::Base::StaticKeys ||
                                  (!chain.static_keys.access_key_id.empty() &&
                                   !chain.static_keys.secret_access_key.empty()),
                              "resolve_profile", "accepted a profile without a key id or secret");
            });
    }
    return 0;
}
