#include "aws_credentials.hpp"

#include <cstdlib>
#include <iomanip>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include "error.hpp"
#include "secret_file.hpp"

namespace pgphi {

namespace {

constexpr std::time_t kNeverExpires = std::numeric_limits<std::time_t>::max();
constexpr std::time_t kRefreshMargin = 300; // renew temporary credentials 5 minutes early

std::string trim(const std::string& s)
{
    size_t begin = s.find_first_not_of(" \t\r");
    size_t end = s.find_last_not_of(" \t\r");
    return begin == std::string::npos ? std::string() : s.substr(begin, end - begin + 1);
}

// "2026-11-23T05:00:00Z" -> seconds since the epoch; 0 when unparsable.
std::time_t parse_iso8601_utc(const std::string& text)
{
    std::tm tm{};
    std::istringstream in(text);
    in >> std::get_time(&tm, "%Y-%m-%dT%H:%M:%S");
    return in.fail() ? 0 : timegm(&tm);
}

} // namespace

AwsCredentialChain::AwsCredentialChain(AwsCredentialSettings settings) : settings_(std::move(settings)) {}

const sigv4::Credentials& AwsCredentialChain::get(std::time_t now)
{
    if (expires_at_ != 0 && now + kRefreshMargin < expires_at_)
        return current_;
    if ((settings_.use_environment && from_environment()) || from_file() || from_metadata_service(now))
        return current_;
    throw Error(ErrorCode::KeyManagerDenied, "no AWS credentials found for AWS KMS",
                "pgphi looked in the server's environment, the credentials file and the instance "
                "metadata service, as configured.",
                "Set pgphi.aws_credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                "server's environment, or run on an instance with a role.");
}

bool AwsCredentialChain::from_environment()
{
    const char* id = std::getenv("AWS_ACCESS_KEY_ID");
    const char* secret = std::getenv("AWS_SECRET_ACCESS_KEY");
    if (!id || !secret || !*id || !*secret)
        return false;
    const char* token = std::getenv("AWS_SESSION_TOKEN");
    current_.access_key_id = id;
    current_.secret_access_key = secret;
    current_.session_token = token ? token : "";
    expires_at_ = kNeverExpires;
    source_ = "environment";
    return true;
}

// The shared-credentials format: [profile] sections of "key = value" lines.
bool AwsCredentialChain::from_file()
{
    if (settings_.credentials_file.empty())
        return false;
    SecureBytes raw = read_secret_file(settings_.credentials_file, "AWS credentials file", 1 << 20);
    std::istringstream in(std::string(reinterpret_cast<const char*>(raw.data()), raw.size()));
    std::string line, section;
    sigv4::Credentials found;
    for (; std::getline(in, line);) {
        line = trim(line);
        if (line.empty() || line[0] == '#' || line[0] == ';')
            continue;
        if (line.front() == '[' && line.back() == ']') {
            section = trim(line.substr(1, line.size() - 2));
            continue;
        }
        size_t eq = line.find('=');
        if (eq == std::string::npos || section != settings_.profile)
            continue;
        std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
        if (key == "aws_access_key_id")
            found.access_key_id = value;
        else if (key == "aws_secret_access_key")
            found.secret_access_key = value;
        else if (key == "aws_session_token")
            found.session_token = value;
    }
    if (found.access_key_id.empty() || found.secret_access_key.empty())
        throw Error(ErrorCode::ConfigError,
                    "AWS credentials file \"" + settings_.credentials_file + "\" has no complete profile \"" +
                        settings_.profile + "\"",
                    "A profile needs aws_access_key_id and aws_secret_access_key.");
    current_.access_key_id = found.access_key_id;
    current_.secret_access_key = found.secret_access_key;
    current_.session_token = found.session_token;
    expires_at_ = kNeverExpires;
    source_ = "credentials file";
    return true;
}

bool AwsCredentialChain::from_metadata_service(std::time_t now)
{
    if (settings_.imds_endpoint.empty())
        return false;
    if (!imds_)
        imds_ = std::make_unique<HttpClient>(
            "the EC2 instance metadata service", TlsSettings{}, settings_.imds_timeouts,
            PlainHttp{settings_.allow_http_loopback, true});
    const std::string& base = settings_.imds_endpoint;

    HttpRequest token_request;
    token_request.method = "PUT";
    token_request.url = base + "/latest/api/token";
    token_request.headers.emplace_back("X-aws-ec2-metadata-token-ttl-seconds", "21600");
    HttpResponse token = imds_->send(token_request);
    if (token.status != 200)
        throw Error(ErrorCode::KeyManagerDenied,
                    "the instance metadata service refused a session token (HTTP " + std::to_string(token.status) + ")");

    HttpRequest role_request;
    role_request.url = base + "/latest/meta-data/iam/security-credentials/";
    role_request.headers.emplace_back("X-aws-ec2-metadata-token", token.body);
    HttpResponse role = imds_->send(role_request);
    std::string role_name = trim(role.body.substr(0, role.body.find('\n')));
    if (role.status != 200 || role_name.empty())
        throw Error(ErrorCode::KeyManagerDenied, "the instance metadata service has no IAM role for this instance");

    HttpRequest credentials_request;
    credentials_request.url = base + "/latest/meta-data/iam/security-credentials/" + role_name;
    credentials_request.headers.emplace_back("X-aws-ec2-metadata-token", token.body);
    HttpResponse credentials = imds_->send(credentials_request);
    if (credentials.status != 200)
        throw Error(ErrorCode::KeyManagerDenied, "the instance metadata service returned no credentials for role \"" +
                                                     role_name + "\"");
    nlohmann::json doc = nlohmann::json::parse(credentials.body, nullptr, false);
    if (doc.is_discarded() || !doc.contains("AccessKeyId") || !doc.contains("SecretAccessKey"))
        throw Error(ErrorCode::ProviderError, "the instance metadata service returned malformed credentials");
    current_.access_key_id = doc.value("AccessKeyId", "");
    current_.secret_access_key = doc.value("SecretAccessKey", "");
    current_.session_token = doc.value("Token", "");
    auto& secret_in_doc = doc["SecretAccessKey"].get_ref<std::string&>();
    OPENSSL_cleanse(secret_in_doc.data(), secret_in_doc.size());
    std::time_t expiration = parse_iso8601_utc(doc.value("Expiration", ""));
    expires_at_ = expiration > now ? expiration : now + kRefreshMargin + 60;
    source_ = "instance metadata service";
    return true;
}

} // namespace pgphi
