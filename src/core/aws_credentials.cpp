#include "aws_credentials.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string_view>

#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include "error.hpp"
#include "secret_file.hpp"

namespace pgphi {

namespace {

constexpr std::time_t kNeverExpires = std::numeric_limits<std::time_t>::max();
constexpr std::time_t kRefreshMargin = 300; // renew temporary credentials 5 minutes early

std::string_view trim(std::string_view s)
{
    size_t begin = s.find_first_not_of(" \t\r");
    size_t end = s.find_last_not_of(" \t\r");
    return begin == std::string_view::npos ? std::string_view() : s.substr(begin, end - begin + 1);
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

namespace aws {

// The shared-credentials format: [profile] sections of "key = value" lines.
// Lines are views into `text`, so the secret is copied only into the result
// (whose destructor wipes it).
sigv4::Credentials parse_credentials_file(const std::string& text, const std::string& profile,
                                          const std::string& path)
{
    sigv4::Credentials found;
    std::string_view rest(text), section;
    while (!rest.empty()) {
        size_t newline = rest.find('\n');
        std::string_view line = trim(rest.substr(0, newline));
        rest = newline == std::string_view::npos ? std::string_view() : rest.substr(newline + 1);
        if (line.empty() || line[0] == '#' || line[0] == ';')
            continue;
        if (line.front() == '[' && line.back() == ']') {
            section = trim(line.substr(1, line.size() - 2));
            continue;
        }
        size_t eq = line.find('=');
        if (eq == std::string_view::npos || section != profile)
            continue;
        std::string_view key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
        if (key == "aws_access_key_id")
            found.access_key_id = value;
        else if (key == "aws_secret_access_key")
            found.secret_access_key = value;
        else if (key == "aws_session_token")
            found.session_token = value;
    }
    if (found.access_key_id.empty() || found.secret_access_key.empty())
        throw Error(ErrorCode::ConfigError,
                    "AWS credentials file \"" + path + "\" has no complete profile \"" + profile + "\"",
                    "A profile needs aws_access_key_id and aws_secret_access_key.");
    return found;
}

std::string imds_session_token(const std::string& body)
{
    if (body.empty() || body.size() > 4096 ||
        std::any_of(body.begin(), body.end(), [](char c) { return c < 0x21 || c > 0x7e; }))
        throw Error(ErrorCode::ProviderError, "the instance metadata service returned a malformed session token");
    return body;
}

std::string imds_role_name(const std::string& listing)
{
    std::string role_name(trim(std::string_view(listing).substr(0, listing.find('\n'))));
    if (role_name.empty())
        throw Error(ErrorCode::KeyManagerDenied, "the instance metadata service has no IAM role for this instance");
    // IAM role names: up to 64 of letters, digits and +=,.@_- (so the name
    // cannot change the path it is appended to).
    auto allowed = [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || std::string_view("+=,.@_-").find(c) != std::string_view::npos;
    };
    if (role_name.size() > 64 || !std::all_of(role_name.begin(), role_name.end(), allowed))
        throw Error(ErrorCode::ProviderError, "the instance metadata service returned a malformed IAM role name");
    return role_name;
}

sigv4::Credentials imds_credentials(const std::string& body, std::time_t now, std::time_t& expires_at)
{
    nlohmann::json doc = nlohmann::json::parse(body, nullptr, false);
    if (doc.is_discarded() || !doc.is_object())
        throw Error(ErrorCode::ProviderError, "the instance metadata service returned malformed credentials");
    // The secrets are wiped from the document on every path.
    auto wipe_field = [&](const char* name) {
        auto it = doc.find(name);
        if (it != doc.end() && it->is_string())
            OPENSSL_cleanse(it->get_ref<std::string&>().data(), it->get_ref<std::string&>().size());
    };
    auto text_of = [&](const char* name) -> std::string {
        auto it = doc.find(name);
        if (it == doc.end() || it->is_null())
            return {};
        if (!it->is_string())
            throw Error(ErrorCode::ProviderError, "the instance metadata service returned malformed credentials");
        return it->get<std::string>();
    };
    sigv4::Credentials credentials;
    try {
        credentials.access_key_id = text_of("AccessKeyId");
        credentials.secret_access_key = text_of("SecretAccessKey");
        credentials.session_token = text_of("Token");
        if (credentials.access_key_id.empty() || credentials.secret_access_key.empty())
            throw Error(ErrorCode::ProviderError, "the instance metadata service returned malformed credentials");
        std::time_t expiration = parse_iso8601_utc(text_of("Expiration"));
        expires_at = expiration > now ? expiration : now + kRefreshMargin + 60;
    } catch (...) {
        wipe_field("SecretAccessKey");
        wipe_field("Token");
        throw;
    }
    wipe_field("SecretAccessKey");
    wipe_field("Token");
    return credentials;
}

} // namespace aws

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

bool AwsCredentialChain::from_file()
{
    if (settings_.credentials_file.empty())
        return false;
    SecureBytes raw = read_secret_file(settings_.credentials_file, "AWS credentials file", 1 << 20);
    std::string text(reinterpret_cast<const char*>(raw.data()), raw.size());
    sigv4::Credentials found;
    try {
        found = aws::parse_credentials_file(text, settings_.profile, settings_.credentials_file);
    } catch (...) {
        OPENSSL_cleanse(text.data(), text.size());
        throw;
    }
    OPENSSL_cleanse(text.data(), text.size());
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

    std::string session_token = aws::imds_session_token(token.body);
    WipeOnExit wipe_session_token(session_token);

    HttpRequest role_request;
    role_request.url = base + "/latest/meta-data/iam/security-credentials/";
    role_request.headers.emplace_back("X-aws-ec2-metadata-token", session_token);
    HttpResponse role = imds_->send(role_request);
    if (role.status != 200)
        throw Error(ErrorCode::KeyManagerDenied, "the instance metadata service has no IAM role for this instance");
    std::string role_name = aws::imds_role_name(role.body);

    HttpRequest credentials_request;
    credentials_request.url = base + "/latest/meta-data/iam/security-credentials/" + role_name;
    credentials_request.headers.emplace_back("X-aws-ec2-metadata-token", session_token);
    HttpResponse credentials = imds_->send(credentials_request);
    if (credentials.status != 200)
        throw Error(ErrorCode::KeyManagerDenied, "the instance metadata service returned no credentials for role \"" +
                                                     role_name + "\"");
    sigv4::Credentials fetched = aws::imds_credentials(credentials.body, now, expires_at_);
    current_.access_key_id = fetched.access_key_id;
    current_.secret_access_key = fetched.secret_access_key;
    current_.session_token = fetched.session_token;
    source_ = "instance metadata service";
    return true;
}

} // namespace pgphi
