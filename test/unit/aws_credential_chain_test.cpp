// The parsers behind the AWS credential chain's newer sources: STS's XML
// answers (AssumeRole, AssumeRoleWithWebIdentity, ErrorResponse), the
// container credentials endpoint's JSON, and the shared config and
// credentials files' profile chains (role_arn + source_profile, cycles).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>

#include "aws_credentials.hpp"
#include "error.hpp"
#include "refusal.hpp"

using namespace pgphi;
using pgphi::test_support::refusal;
using pgphi::test_support::refusal_text;

namespace {

// Credentials made up at test time (no key-like literal in the repository);
// the secret has the "/" and "+" that real ones carry.
std::string random_text(const char* alphabet, size_t length)
{
    std::random_device device;
    std::string text;
    size_t size = std::strlen(alphabet);
    for (size_t i = 0; i < length; ++i)
        text += alphabet[device() % size];
    return text;
}

const std::string kAccessKeyId = "ASIA" + random_text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16);
const std::string kSecretAccessKey =
    random_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 18) + "/+" +
    random_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 20);

const std::string kAssumeRole = R"(<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <SourceIdentity>DevUser123</SourceIdentity>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/demo/John</Arn>
      <AssumedRoleId>ARO123EXAMPLE123:John</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>)" + kAccessKeyId + R"(</AccessKeyId>
      <SecretAccessKey>)" + kSecretAccessKey + R"(</SecretAccessKey>
      <SessionToken>AQoDYXdzEPT//////////wEXAMPLEtc764&amp;bNrC</SessionToken>
      <Expiration>2030-01-01T00:00:00Z</Expiration>
    </Credentials>
    <PackedPolicySize>8</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata>
    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
  </ResponseMetadata>
</AssumeRoleResponse>)";

aws::ProfileSet profiles(const std::string& config, const std::string& credentials)
{
    aws::ProfileSet set;
    aws::parse_profiles(config, true, set);
    aws::parse_profiles(credentials, false, set);
    return set;
}

} // namespace

TEST(StsAnswers, AssumeRoleCredentialsWithEntitiesUndone)
{
    std::time_t expires_at = 0;
    sigv4::Credentials credentials = aws::sts_credentials(kAssumeRole, "AssumeRole", 1700000000, expires_at);
    EXPECT_EQ(credentials.access_key_id, kAccessKeyId);
    EXPECT_EQ(credentials.secret_access_key, kSecretAccessKey);
    EXPECT_EQ(credentials.session_token, "AQoDYXdzEPT//////////wEXAMPLEtc764&bNrC");
    EXPECT_EQ(expires_at, 1893456000);
}

TEST(StsAnswers, WebIdentityAnswerIsReadUnderItsOwnElements)
{
    std::string xml = kAssumeRole;
    for (const char* from : {"<AssumeRoleResponse", "</AssumeRoleResponse>", "<AssumeRoleResult>", "</AssumeRoleResult>"}) {
        std::string tag = from;
        std::string renamed = tag;
        renamed.replace(renamed.find("AssumeRole"), 10, "AssumeRoleWithWebIdentity");
        xml.replace(xml.find(tag), tag.size(), renamed);
    }
    std::time_t expires_at = 0;
    EXPECT_EQ(aws::sts_credentials(xml, "AssumeRoleWithWebIdentity", 1700000000, expires_at).access_key_id,
              kAccessKeyId);
    // The answer of one operation is not taken for another's.
    EXPECT_EQ(refusal([&] { aws::sts_credentials(xml, "AssumeRole", 1700000000, expires_at); }),
              ErrorCode::ProviderError);
}

TEST(StsAnswers, MalformedOrExpiredAnswersAreRefused)
{
    std::time_t expires_at = 0;
    std::string good = kAssumeRole;
    auto without = [&](const std::string& field) {
        std::string xml = good;
        size_t open = xml.find("<" + field + ">");
        size_t close = xml.find("</" + field + ">") + field.size() + 3;
        return xml.erase(open, close - open);
    };
    for (const std::string& xml :
         {without("AccessKeyId"), without("SecretAccessKey"), without("SessionToken"), without("Expiration"),
          std::string("<AssumeRoleResponse><AssumeRoleResult></AssumeRoleResult></AssumeRoleResponse>"),
          std::string(""), std::string("<AssumeRoleResponse>"),
          // A key id with a control character, an unknown entity, nested markup.
          std::string(good).replace(good.find(kAccessKeyId), 4, "AS\x01I"),
          std::string(good).replace(good.find("&amp;"), 5, "&nbsp;"),
          std::string(good).replace(good.find(kAccessKeyId), 4, "<b/>")})
        EXPECT_EQ(refusal([&] { aws::sts_credentials(xml, "AssumeRole", 1700000000, expires_at); }),
                  ErrorCode::ProviderError)
            << xml;
    // Credentials that expired before they arrived (a clock far off).
    EXPECT_EQ(refusal([&] { aws::sts_credentials(good, "AssumeRole", 1900000000, expires_at); }),
              ErrorCode::ProviderError);
}

TEST(StsAnswers, ErrorsMapToDenialsOrRetries)
{
    aws::StsError error = aws::sts_error(R"(<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>
    <Message>The web identity token that was passed could not be validated</Message></Error>
  <RequestId>4f6b6c4e-0d2a-11e9-a0a5-0d6bf2f0ae8d</RequestId>
</ErrorResponse>)");
    EXPECT_EQ(error.code, "InvalidIdentityToken");
    EXPECT_EQ(error.request_id, "4f6b6c4e-0d2a-11e9-a0a5-0d6bf2f0ae8d");
    Error denied = aws::sts_failure(error, 400, "AssumeRoleWithWebIdentity");
    EXPECT_EQ(denied.code(), ErrorCode::KeyManagerDenied);
    EXPECT_NE(std::string(denied.what()).find("4f6b6c4e"), std::string::npos);
    for (const char* code : {"AccessDenied", "ExpiredTokenException", "InvalidClientTokenId", "SignatureDoesNotMatch"})
        EXPECT_EQ(aws::sts_failure(aws::StsError{code, "", ""}, 403, "AssumeRole").code(), ErrorCode::KeyManagerDenied);
    EXPECT_EQ(aws::sts_failure(aws::StsError{"Throttling", "Rate exceeded", ""}, 400, "AssumeRole").code(),
              ErrorCode::KeyManagerUnavailable);
    EXPECT_EQ(aws::sts_failure(aws::StsError{"IDPCommunicationError", "", ""}, 400, "AssumeRole").code(),
              ErrorCode::KeyManagerUnavailable);
    EXPECT_EQ(aws::sts_failure(aws::StsError{}, 503, "AssumeRole").code(), ErrorCode::KeyManagerUnavailable);
    EXPECT_EQ(aws::sts_failure(aws::StsError{"ValidationError", "", ""}, 400, "AssumeRole").code(),
              ErrorCode::ProviderError);
    // Not an STS error at all: nothing invented.
    aws::StsError none = aws::sts_error("<html>bad gateway</html>");
    EXPECT_TRUE(none.code.empty() && none.request_id.empty());
}

TEST(StsRequests, FormEncodingIsTheQueryProtocols)
{
    EXPECT_EQ(aws::form_encode({{"Action", "AssumeRole"}, {"RoleArn", "arn:aws:iam::1:role/a b+c"}}),
              "Action=AssumeRole&RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa%20b%2Bc");
}

TEST(ContainerCredentials, ParsesTheEndpointsDocument)
{
    std::time_t expires_at = 0;
    sigv4::Credentials credentials = aws::container_credentials(
        R"({"RoleArn":"arn:aws:iam::1:role/r","AccessKeyId":"ASIA1","SecretAccessKey":"S","Token":"T",)"
        R"("Expiration":"2030-01-01T00:00:00Z","AccountId":"111122223333"})",
        1700000000, expires_at);
    EXPECT_EQ(credentials.access_key_id, "ASIA1");
    EXPECT_EQ(credentials.session_token, "T");
    EXPECT_EQ(expires_at, 1893456000);
    std::string text = refusal_text([&] { aws::container_credentials("{\"code\":\"x\"}", 1700000000, expires_at); });
    EXPECT_NE(text.find("container credentials endpoint"), std::string::npos) << text;
}

TEST(ProfileChains, StaticKeysAndConfigSections)
{
    aws::ProfileSet set = profiles("[default]\nregion = us-east-1\n[profile app]\naws_access_key_id = AKIDCONF\n"
                                   "aws_secret_access_key = conf\n[sso-session x]\naws_access_key_id = NOT\n"
                                   "[plain]\naws_access_key_id = NOT\n",
                                   "[app]\naws_secret_access_key = fromcredentials\n");
    aws::ProfileChain chain = aws::resolve_profile(set, "app");
    EXPECT_EQ(chain.base, aws::ProfileChain::Base::StaticKeys);
    EXPECT_TRUE(chain.roles.empty());
    EXPECT_EQ(chain.static_keys.access_key_id, "AKIDCONF");
    EXPECT_EQ(chain.static_keys.secret_access_key, "fromcredentials"); // the credentials file wins
    // "[plain]" and "[sso-session x]" in a config file are no profiles.
    EXPECT_EQ(set.profiles.count("plain"), 0u);
    EXPECT_EQ(set.profiles.count("x"), 0u);
    EXPECT_EQ(refusal([&] { aws::resolve_profile(set, "missing"); }), ErrorCode::ConfigError);
    EXPECT_EQ(refusal([&] { aws::resolve_profile(set, "default"); }), ErrorCode::ConfigError);
}

TEST(ProfileChains, RolesAreAssumedFromTheSourceOutwards)
{
    aws::ProfileSet set = profiles("[profile outer]\nrole_arn = arn:aws:iam::1:role/outer\nsource_profile = middle\n"
                                   "role_session_name = db\n"
                                   "[profile middle]\nrole_arn = arn:aws:iam::1:role/middle\nsource_profile = base\n"
                                   "external_id = ext-1\n",
                                   "[base]\naws_access_key_id = AKIDBASE\naws_secret_access_key = base\n");
    aws::ProfileChain chain = aws::resolve_profile(set, "outer");
    EXPECT_EQ(chain.base, aws::ProfileChain::Base::StaticKeys);
    EXPECT_EQ(chain.static_keys.access_key_id, "AKIDBASE");
    ASSERT_EQ(chain.roles.size(), 2u);
    EXPECT_EQ(chain.roles[0].role_arn, "arn:aws:iam::1:role/middle");
    EXPECT_EQ(chain.roles[0].external_id, "ext-1");
    EXPECT_EQ(chain.roles[1].role_arn, "arn:aws:iam::1:role/outer");
    EXPECT_EQ(chain.roles[1].session_name, "db");
}

TEST(ProfileChains, SelfSourceUsesItsOwnKeysOtherCyclesAreRefused)
{
    aws::ProfileSet self = profiles("", "[me]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = me\n"
                                        "aws_access_key_id = AKIDME\naws_secret_access_key = me\n");
    aws::ProfileChain chain = aws::resolve_profile(self, "me");
    EXPECT_EQ(chain.static_keys.access_key_id, "AKIDME");
    ASSERT_EQ(chain.roles.size(), 1u);

    aws::ProfileSet cycle = profiles("[profile a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = b\n"
                                     "[profile b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = c\n"
                                     "[profile c]\nrole_arn = arn:aws:iam::1:role/c\nsource_profile = a\n",
                                     "");
    std::string text = refusal_text([&] { aws::resolve_profile(cycle, "a"); });
    EXPECT_NE(text.find("cycle"), std::string::npos) << text;
    EXPECT_EQ(refusal([&] { aws::resolve_profile(cycle, "b"); }), ErrorCode::ConfigError);

    // A self-reference without keys, a missing source, a role with no source.
    aws::ProfileSet bad = profiles("[profile selfless]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = selfless\n"
                                   "[profile dangling]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = nowhere\n"
                                   "[profile sourceless]\nrole_arn = arn:aws:iam::1:role/r\n"
                                   "[profile both]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = x\n"
                                   "credential_source = Environment\n"
                                   "[profile odd]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = Laptop\n",
                                   "");
    for (const char* name : {"selfless", "dangling", "sourceless", "both", "odd"})
        EXPECT_EQ(refusal([&] { aws::resolve_profile(bad, name); }), ErrorCode::ConfigError) << name;
    EXPECT_NE(refusal_text([&] { aws::resolve_profile(bad, "dangling"); }).find("\"nowhere\""), std::string::npos);
}

TEST(ProfileChains, LongChainsAreRefused)
{
    std::string config;
    for (int i = 0; i < 40; ++i)
        config += "[profile p" + std::to_string(i) + "]\nrole_arn = arn:aws:iam::1:role/r" + std::to_string(i) +
                  "\nsource_profile = p" + std::to_string(i + 1) + "\n";
    config += "[profile p40]\naws_access_key_id = A\naws_secret_access_key = B\n";
    aws::ProfileSet set = profiles(config, "");
    EXPECT_EQ(refusal([&] { aws::resolve_profile(set, "p0"); }), ErrorCode::ConfigError);
    EXPECT_EQ(aws::resolve_profile(set, "p30").roles.size(), 10u);
}

TEST(ProfileChains, WebIdentityAndCredentialSourceBases)
{
    aws::ProfileSet set = profiles("[profile irsa]\nrole_arn = arn:aws:iam::1:role/web\n"
                                   "web_identity_token_file = /var/run/secrets/token\n"
                                   "[profile ec2]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = Ec2InstanceMetadata\n"
                                   "[profile ecs]\nrole_arn = arn:aws:iam::1:role/r\ncredential_source = EcsContainer\n"
                                   "[profile outer]\nrole_arn = arn:aws:iam::1:role/outer\nsource_profile = irsa\n",
                                   "");
    aws::ProfileChain web = aws::resolve_profile(set, "outer");
    EXPECT_EQ(web.base, aws::ProfileChain::Base::WebIdentity);
    EXPECT_EQ(web.web_identity_token_file, "/var/run/secrets/token");
    ASSERT_EQ(web.roles.size(), 2u);
    EXPECT_EQ(web.roles[0].role_arn, "arn:aws:iam::1:role/web"); // assumed with the token
    EXPECT_EQ(aws::resolve_profile(set, "ec2").base, aws::ProfileChain::Base::InstanceMetadata);
    EXPECT_EQ(aws::resolve_profile(set, "ecs").base, aws::ProfileChain::Base::Container);
}

TEST(AwsCredentialSettings, EnvironmentFillsOnlyEmptySettings)
{
    setenv("AWS_ROLE_ARN", "arn:aws:iam::1:role/env", 1);
    setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/env/token", 1);
    setenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/abc", 1);
    setenv("AWS_PROFILE", "envprofile", 1);
    AwsCredentialSettings settings;
    settings.role_arn = "arn:aws:iam::1:role/setting";
    apply_environment(settings);
    EXPECT_EQ(settings.role_arn, "arn:aws:iam::1:role/setting");
    EXPECT_EQ(settings.web_identity_token_file, "/env/token");
    EXPECT_EQ(settings.container_credentials_relative_uri, "/v2/credentials/abc");
    EXPECT_EQ(settings.profile, "envprofile");

    AwsCredentialSettings off;
    off.use_environment = false;
    apply_environment(off);
    EXPECT_TRUE(off.web_identity_token_file.empty());
    EXPECT_EQ(off.profile, "default");
    for (const char* name : {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                             "AWS_PROFILE"})
        unsetenv(name);
}

TEST(AwsCredentialChain, AWebIdentityHalfConfiguredIsAConfigError)
{
    AwsCredentialSettings settings;
    settings.use_environment = false;
    settings.role_arn = "arn:aws:iam::1:role/r";
    AwsCredentialChain chain(settings);
    EXPECT_EQ(refusal([&] { chain.get(1700000000); }), ErrorCode::ConfigError);
}
