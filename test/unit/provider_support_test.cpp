// The pieces the Vault and KMS providers are built from, tested without a
// server: base64, secret files, the https-only policy, retry backoff and the
// AWS credential sources.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "aws_credentials.hpp"
#include "encoding.hpp"
#include "error.hpp"
#include "vault_provider.hpp"
#include "http_client.hpp"
#include "secret_file.hpp"
#include "refusal.hpp"

using namespace pgphi;
using pgphi::test_support::refusal;
using pgphi::test_support::refusal_text;

namespace {

class TempDir : public ::testing::Test {
protected:
    void SetUp() override
    {
        char tmpl[] = "/tmp/pgphi-unit-XXXXXX";
        ASSERT_NE(mkdtemp(tmpl), nullptr);
        dir = tmpl;
    }
    void TearDown() override { std::system(("rm -rf " + dir).c_str()); }

    std::string write(const std::string& name, const std::string& content, mode_t mode = 0600)
    {
        std::string path = dir + "/" + name;
        std::ofstream(path, std::ios::binary) << content;
        chmod(path.c_str(), mode);
        return path;
    }

    std::string dir;
};

} // namespace

TEST(Base64, RoundTripsEveryLength)
{
    for (size_t n = 0; n < 40; ++n) {
        std::string data(n, '\0');
        for (size_t i = 0; i < n; ++i)
            data[i] = static_cast<char>(i * 37 + 1);
        std::string encoded = base64_encode(ByteView(data));
        SecureBytes decoded = base64_decode(encoded);
        ASSERT_EQ(std::string(reinterpret_cast<const char*>(decoded.data()), decoded.size()), data) << n;
    }
    EXPECT_EQ(base64_encode(ByteView(std::string("pgphi"))), "cGdwaGk=");
}

TEST(Base64, RejectsMalformedInput)
{
    EXPECT_THROW(base64_decode("abc"), Error);
    EXPECT_THROW(base64_decode("ab!d"), Error);
}

TEST_F(TempDir, SecretTextIsTrimmedAndChecked)
{
    std::string token = write("token", "  hvs.example-token\n");
    EXPECT_EQ(read_secret_text(token, "Vault token file"), "hvs.example-token");

    std::string open_to_all = write("open", "secret", 0644);
    std::string message;
    EXPECT_EQ(refusal([&] { read_secret_text(open_to_all, "Vault token file"); }, &message),
              ErrorCode::SecretFileInvalid);
    EXPECT_NE(message.find("Vault token file"), std::string::npos);
    EXPECT_EQ(refusal([&] { read_secret_text(dir + "/absent", "Vault token file"); }),
              ErrorCode::SecretFileMissing);
    std::string empty = write("empty", " \n");
    EXPECT_EQ(refusal([&] { read_secret_text(empty, "Vault token file"); }), ErrorCode::SecretFileInvalid);
}

TEST(HttpClient, RefusesPlainHttpExceptToAllowedLoopback)
{
    HttpClient strict("Vault", TlsSettings{}, HttpTimeouts{}, PlainHttp{false, false});
    HttpRequest request;
    request.url = "http://127.0.0.1:1/v1/sys/health";
    std::string message;
    EXPECT_EQ(refusal([&] { strict.send(request); }, &message), ErrorCode::ConfigError);
    EXPECT_NE(message.find("does not use https"), std::string::npos);

    HttpClient loopback("Vault", TlsSettings{}, HttpTimeouts{}, PlainHttp{true, false});
    request.url = "http://10.0.0.1:8200/v1/sys/health"; // not loopback: refused before any connection
    EXPECT_EQ(refusal([&] { loopback.send(request); }), ErrorCode::ConfigError);
    request.url = "ftp://127.0.0.1/x";
    EXPECT_EQ(refusal([&] { loopback.send(request); }), ErrorCode::ConfigError);
}

TEST(HttpClient, UnreachableServerIsUnavailable)
{
    // Port 1 on loopback: nothing listens there, the connection is refused.
    HttpClient client("AWS KMS", TlsSettings{}, HttpTimeouts{}, PlainHttp{false, false});
    HttpRequest request;
    request.url = "https://127.0.0.1:1/";
    std::string message;
    EXPECT_EQ(refusal([&] { client.send(request); }, &message), ErrorCode::KeyManagerUnavailable);
    EXPECT_NE(message.find("AWS KMS is unavailable"), std::string::npos);
}

TEST(RetryPolicy, DelaysGrowAndStayCapped)
{
    RetryPolicy policy;
    policy.base_delay = std::chrono::milliseconds(100);
    policy.max_delay = std::chrono::milliseconds(400);
    for (int attempt = 2; attempt < 10; ++attempt)
        for (int i = 0; i < 50; ++i) {
            auto delay = policy.delay_before_attempt(attempt);
            ASSERT_GE(delay.count(), 0);
            ASSERT_LE(delay.count(), std::min(400LL, 100LL << (attempt - 2)));
        }
}

TEST(RetryPolicy, StopsAtSuccessOrAfterMaxAttempts)
{
    RetryPolicy policy;
    policy.max_attempts = 3;
    int calls = 0;
    auto no_sleep = [](std::chrono::milliseconds) {};
    EXPECT_FALSE(with_retries(policy, [&](int) { ++calls; return false; }, no_sleep));
    EXPECT_EQ(calls, 3);
    calls = 0;
    EXPECT_TRUE(with_retries(policy, [&](int n) { ++calls; return n == 2; }, no_sleep));
    EXPECT_EQ(calls, 2);
}

TEST_F(TempDir, AwsCredentialsFileProfiles)
{
    std::string path = write("credentials", "[default]\naws_access_key_id = AKIDDEFAULT\n"
                                             "aws_secret_access_key = secretdefault\n\n"
                                             "# the database's role\n[pgphi]\n"
                                             "aws_access_key_id=AKIDPGPHI\naws_secret_access_key=secretpgphi\n"
                                             "aws_session_token = token123\n");
    AwsCredentialSettings settings;
    settings.use_environment = false;
    settings.credentials_file = path;
    settings.profile = "pgphi";
    AwsCredentialChain chain(settings);
    const auto& credentials = chain.get(std::time(nullptr));
    EXPECT_EQ(credentials.access_key_id, "AKIDPGPHI");
    EXPECT_EQ(credentials.secret_access_key, "secretpgphi");
    EXPECT_EQ(credentials.session_token, "token123");
    EXPECT_STREQ(chain.source(), "credentials file");

    settings.profile = "missing";
    AwsCredentialChain missing(settings);
    EXPECT_EQ(refusal([&] { missing.get(std::time(nullptr)); }), ErrorCode::ConfigError);
}

TEST_F(TempDir, AwsCredentialsFromEnvironmentComeFirst)
{
    setenv("AWS_ACCESS_KEY_ID", "AKIDENV", 1);
    setenv("AWS_SECRET_ACCESS_KEY", "secretenv", 1);
    unsetenv("AWS_SESSION_TOKEN");
    AwsCredentialSettings settings;
    settings.credentials_file = write("credentials", "[default]\naws_access_key_id=A\naws_secret_access_key=B\n");
    AwsCredentialChain chain(settings);
    EXPECT_EQ(chain.get(std::time(nullptr)).access_key_id, "AKIDENV");
    EXPECT_STREQ(chain.source(), "environment");
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
}

TEST(AwsCredentials, NoSourceIsADenial)
{
    AwsCredentialSettings settings;
    settings.use_environment = false;
    AwsCredentialChain chain(settings);
    EXPECT_EQ(refusal([&] { chain.get(std::time(nullptr)); }), ErrorCode::KeyManagerDenied);
}

TEST(VaultAuthSettings, EachMethodNeedsWhatItLogsInWith)
{
    auto settings = [] {
        VaultSettings s;
        s.address = "https://127.0.0.1:8200";
        return s;
    };
    auto config_error = [&](VaultSettings s) { return refusal([&] { VaultKeyProvider provider(std::move(s)); }); };
    VaultSettings none = settings();
    EXPECT_EQ(config_error(none), ErrorCode::ConfigError);
    VaultSettings kubernetes = settings();
    kubernetes.auth_method = "kubernetes";
    EXPECT_EQ(config_error(kubernetes), ErrorCode::ConfigError); // no role
    kubernetes.auth_role = "pgphi";
    EXPECT_NO_THROW(VaultKeyProvider{kubernetes}); // the service account token by default
    VaultSettings jwt = settings();
    jwt.auth_method = "jwt";
    jwt.auth_role = "pgphi";
    EXPECT_EQ(config_error(jwt), ErrorCode::ConfigError); // no token file
    VaultSettings cert = settings();
    cert.auth_method = "cert";
    EXPECT_EQ(config_error(cert), ErrorCode::ConfigError); // no client certificate
    cert.tls.client_cert = "/c.pem";
    cert.tls.client_key = "/c.key";
    EXPECT_NO_THROW(VaultKeyProvider{cert});
    VaultSettings wrapped = settings();
    wrapped.approle_role_id_file = "/role-id";
    wrapped.approle_wrapped_secret_id_file = "/wrapped";
    EXPECT_NO_THROW(VaultKeyProvider{wrapped}); // AppRole, chosen without auth_method
    VaultSettings unknown = settings();
    unknown.auth_method = "ldap";
    EXPECT_EQ(config_error(unknown), ErrorCode::ConfigError);
}

TEST_F(TempDir, IdentityTokenFilesMayBeRootOwnedProjectionsButNotWritableByOthers)
{
    // A projected Kubernetes token: 0644 (owner and mode of the server
    // account are not required, unlike a secret file pgphi's admin writes).
    std::string token = write("token", "eyJhbGciOi.token.sig\n");
    chmod(token.c_str(), 0644);
    EXPECT_EQ(read_identity_token_file(token, "Kubernetes service account token file"), "eyJhbGciOi.token.sig");
    EXPECT_EQ(refusal([&] { read_secret_text(token, "Vault token file"); }), ErrorCode::SecretFileInvalid);
    chmod(token.c_str(), 0666);
    std::string message;
    EXPECT_EQ(refusal([&] { read_identity_token_file(token, "web identity token file"); }, &message),
              ErrorCode::SecretFileInvalid);
    EXPECT_NE(message.find("writable by group or others"), std::string::npos) << message;
    EXPECT_EQ(refusal([&] { read_identity_token_file(token + ".absent", "token file"); }),
              ErrorCode::SecretFileMissing);
}
