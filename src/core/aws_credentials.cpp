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

constexpr std::time_t kFailedRefreshPause = 5; // a failed refresh is tried again this much later
constexpr int kMaxProfileChain = 16;
constexpr const char* kStsVersion = "2011-06-15";
constexpr const char* kEcsHost = "http://169.254.170.2";

void wipe(std::string& s) { OPENSSL_cleanse(s.data(), s.size()); }

std::string env(const char* name)
{
    const char* value = std::getenv(name);
    return value ? value : "";
}

// The inner text of the first <name> element of `doc` (attributes allowed;
// a self-closing element is empty); false when there is none.
bool xml_element(std::string_view doc, const std::string& name, std::string_view& inner)
{
    std::string open = "<" + name, close = "</" + name + ">";
    size_t at = 0;
    while ((at = doc.find(open, at)) != std::string_view::npos) {
        size_t after = at + open.size();
        if (after >= doc.size())
            return false;
        char next = doc[after];
        if (next == '>' || next == ' ' || next == '\t' || next == '\n' || next == '\r' || next == '/') {
            size_t end_of_tag = doc.find('>', after);
            if (end_of_tag == std::string_view::npos)
                return false;
            if (doc[end_of_tag - 1] == '/') {
                inner = std::string_view();
                return true;
            }
            size_t end = doc.find(close, end_of_tag + 1);
            if (end == std::string_view::npos)
                return false;
            inner = doc.substr(end_of_tag + 1, end - end_of_tag - 1);
            return true;
        }
        at = after;
    }
    return false;
}

// XML character data with its five entities and numeric references undone;
// false for markup or an entity it does not know.
bool xml_text(std::string_view raw, std::string& out)
{
    out.clear();
    std::string_view text = trim(raw);
    for (size_t i = 0; i < text.size(); ++i) {
        char c = text[i];
        if (c == '<')
            return false;
        if (c != '&') {
            out += c;
            continue;
        }
        size_t semi = text.find(';', i);
        if (semi == std::string_view::npos || semi - i > 10)
            return false;
        std::string_view entity = text.substr(i + 1, semi - i - 1);
        if (entity == "amp") out += '&';
        else if (entity == "lt") out += '<';
        else if (entity == "gt") out += '>';
        else if (entity == "quot") out += '"';
        else if (entity == "apos") out += '\'';
        else if (entity.size() > 1 && entity[0] == '#') {
            bool hex = entity[1] == 'x';
            std::string digits(entity.substr(hex ? 2 : 1));
            if (digits.empty() || digits.find_first_not_of(hex ? "0123456789abcdefABCDEF" : "0123456789") != std::string::npos)
                return false;
            unsigned long code = std::stoul(digits, nullptr, hex ? 16 : 10);
            if (code == 0 || code > 0x7e)
                return false; // the fields pgphi reads are ASCII
            out += static_cast<char>(code);
        } else
            return false;
        i = semi;
    }
    return true;
}

// The text of <name> inside `doc` ("" when absent or not plain text).
std::string xml_field(std::string_view doc, const std::string& name)
{
    std::string_view inner;
    std::string out;
    if (!xml_element(doc, name, inner) || !xml_text(inner, out)) {
        wipe(out);
        return {};
    }
    return out;
}

// A message from a key manager, fit for a log line: printable ASCII, bounded.
std::string printable(const std::string& text)
{
    std::string out;
    for (char c : text.substr(0, 300))
        out += (c >= 0x20 && c < 0x7f) ? c : '?';
    return out;
}

} // namespace

void apply_environment(AwsCredentialSettings& settings)
{
    if (!settings.use_environment)
        return;
    auto fill = [](std::string& setting, const char* name) {
        if (setting.empty())
            setting = env(name);
    };
    fill(settings.credentials_file, "AWS_SHARED_CREDENTIALS_FILE");
    fill(settings.config_file, "AWS_CONFIG_FILE");
    if ((settings.profile.empty() || settings.profile == "default") && !env("AWS_PROFILE").empty())
        settings.profile = env("AWS_PROFILE");
    fill(settings.role_arn, "AWS_ROLE_ARN");
    fill(settings.role_session_name, "AWS_ROLE_SESSION_NAME");
    fill(settings.web_identity_token_file, "AWS_WEB_IDENTITY_TOKEN_FILE");
    if (settings.container_credentials_uri.empty())
        fill(settings.container_credentials_relative_uri, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
    if (settings.container_credentials_relative_uri.empty())
        fill(settings.container_credentials_uri, "AWS_CONTAINER_CREDENTIALS_FULL_URI");
    fill(settings.container_authorization_token_file, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
    if (settings.container_authorization_token_file.empty())
        fill(settings.container_authorization_token, "AWS_CONTAINER_AUTHORIZATION_TOKEN");
}

namespace aws {

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

namespace {

sigv4::Credentials json_credentials(const std::string& body, std::time_t now, std::time_t& expires_at,
                                    const std::string& service)
{
    const std::string malformed = service + " returned malformed credentials";
    nlohmann::json doc = nlohmann::json::parse(body, nullptr, false);
    if (doc.is_discarded() || !doc.is_object())
        throw Error(ErrorCode::ProviderError, malformed);
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
            throw Error(ErrorCode::ProviderError, malformed);
        return it->get<std::string>();
    };
    sigv4::Credentials credentials;
    try {
        credentials.access_key_id = text_of("AccessKeyId");
        credentials.secret_access_key = text_of("SecretAccessKey");
        credentials.session_token = text_of("Token");
        if (credentials.access_key_id.empty() || credentials.secret_access_key.empty())
            throw Error(ErrorCode::ProviderError, malformed);
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

} // namespace

sigv4::Credentials imds_credentials(const std::string& body, std::time_t now, std::time_t& expires_at)
{
    return json_credentials(body, now, expires_at, "the instance metadata service");
}

sigv4::Credentials container_credentials(const std::string& body, std::time_t now, std::time_t& expires_at)
{
    return json_credentials(body, now, expires_at, "the container credentials endpoint");
}

ProfileSet::~ProfileSet()
{
    for (auto& [name, values] : profiles)
        for (auto& [key, value] : values)
            wipe(value);
}

void parse_profiles(const std::string& text, bool config_format, ProfileSet& into)
{
    std::string_view rest(text);
    std::map<std::string, std::string>* section = nullptr;
    while (!rest.empty()) {
        size_t newline = rest.find('\n');
        std::string_view line = trim(rest.substr(0, newline));
        rest = newline == std::string_view::npos ? std::string_view() : rest.substr(newline + 1);
        if (line.empty() || line[0] == '#' || line[0] == ';')
            continue;
        if (line.front() == '[' && line.back() == ']') {
            std::string_view name = trim(line.substr(1, line.size() - 2));
            section = nullptr;
            if (config_format) {
                // "[default]" and "[profile name]"; sso-session, services and
                // plain "[name]" sections are not profiles in a config file.
                if (name.rfind("profile ", 0) == 0 || name.rfind("profile\t", 0) == 0)
                    name = trim(name.substr(8));
                else if (name != "default")
                    continue;
            }
            if (!name.empty())
                section = &into.profiles[std::string(name)];
            continue;
        }
        size_t eq = line.find('=');
        if (eq == std::string_view::npos || !section)
            continue;
        std::string_view key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
        if (key.empty())
            continue;
        std::string& slot = (*section)[std::string(key)];
        wipe(slot);
        slot = value;
    }
}

ProfileChain resolve_profile(const ProfileSet& profiles, const std::string& profile)
{
    ProfileChain chain;
    std::vector<RoleStep> outer_first;
    std::vector<std::string> visited;
    std::string name = profile, named_by;
    for (int depth = 0;; ++depth) {
        if (depth >= kMaxProfileChain)
            throw Error(ErrorCode::ConfigError, "the AWS profile chain from \"" + profile + "\" is longer than " +
                                                    std::to_string(kMaxProfileChain) + " profiles");
        auto it = profiles.profiles.find(name);
        if (it == profiles.profiles.end())
            throw Error(ErrorCode::ConfigError,
                        named_by.empty() ? "AWS profile \"" + name + "\" is in neither the shared config nor the credentials file"
                                         : "AWS profile \"" + named_by + "\" names source_profile \"" + name +
                                               "\", which does not exist",
                        {}, "Check pgphi.aws_profile, pgphi.aws_config_file and pgphi.aws_credentials_file.");
        visited.push_back(name);
        const auto& values = it->second;
        auto value = [&](const char* key) -> std::string {
            auto found = values.find(key);
            return found == values.end() ? std::string() : found->second;
        };
        auto take_static_keys = [&] {
            chain.base = ProfileChain::Base::StaticKeys;
            chain.static_keys.access_key_id = value("aws_access_key_id");
            chain.static_keys.secret_access_key = value("aws_secret_access_key");
            chain.static_keys.session_token = value("aws_session_token");
        };
        bool has_keys = !value("aws_access_key_id").empty() && !value("aws_secret_access_key").empty();
        std::string role_arn = value("role_arn");
        if (role_arn.empty()) {
            if (!has_keys)
                throw Error(ErrorCode::ConfigError,
                            "AWS profile \"" + name + "\" has neither static keys nor a role_arn", {},
                            "A profile needs aws_access_key_id and aws_secret_access_key, or role_arn with "
                            "source_profile, credential_source or web_identity_token_file.");
            take_static_keys();
            break;
        }
        std::string web = value("web_identity_token_file"), source = value("source_profile"),
                    credential_source = value("credential_source");
        int given = !web.empty() + !source.empty() + !credential_source.empty();
        if (given != 1)
            throw Error(ErrorCode::ConfigError,
                        "AWS profile \"" + name + "\" names a role_arn with " +
                            (given == 0 ? "none" : "more than one") +
                            " of source_profile, credential_source and web_identity_token_file");
        outer_first.push_back(RoleStep{role_arn, value("role_session_name"), value("external_id"), name});
        if (!web.empty()) {
            chain.base = ProfileChain::Base::WebIdentity;
            chain.web_identity_token_file = web;
            break;
        }
        if (!credential_source.empty()) {
            if (credential_source == "Environment")
                chain.base = ProfileChain::Base::Environment;
            else if (credential_source == "Ec2InstanceMetadata")
                chain.base = ProfileChain::Base::InstanceMetadata;
            else if (credential_source == "EcsContainer")
                chain.base = ProfileChain::Base::Container;
            else
                throw Error(ErrorCode::ConfigError, "AWS profile \"" + name + "\" has an unknown credential_source", {},
                            "Use Environment, Ec2InstanceMetadata or EcsContainer.");
            break;
        }
        if (source == name) {
            // A role profile may take its own static keys to assume the role.
            if (!has_keys)
                throw Error(ErrorCode::ConfigError,
                            "AWS profile \"" + name + "\" is its own source_profile but has no static keys");
            take_static_keys();
            break;
        }
        if (std::find(visited.begin(), visited.end(), source) != visited.end())
            throw Error(ErrorCode::ConfigError,
                        "AWS profiles form a cycle: source_profile \"" + source + "\" of profile \"" + name +
                            "\" leads back to a profile already in the chain");
        named_by = name;
        name = source;
    }
    chain.roles.assign(outer_first.rbegin(), outer_first.rend());
    return chain;
}

sigv4::Credentials sts_credentials(const std::string& xml, const std::string& action, std::time_t now,
                                   std::time_t& expires_at)
{
    const std::string malformed = "AWS STS returned a malformed " + action + " answer";
    std::string_view response, result, credentials;
    if (!xml_element(xml, action + "Response", response) || !xml_element(response, action + "Result", result) ||
        !xml_element(result, "Credentials", credentials))
        throw Error(ErrorCode::ProviderError, malformed);
    sigv4::Credentials out;
    out.access_key_id = xml_field(credentials, "AccessKeyId");
    out.secret_access_key = xml_field(credentials, "SecretAccessKey");
    out.session_token = xml_field(credentials, "SessionToken");
    std::time_t expiration = parse_iso8601_utc(xml_field(credentials, "Expiration"));
    auto visible = [](const std::string& s) {
        return !s.empty() && s.size() <= 4096 &&
               std::all_of(s.begin(), s.end(), [](char c) { return c > 0x20 && c < 0x7f; });
    };
    if (!visible(out.access_key_id) || out.access_key_id.size() > 128 || !visible(out.secret_access_key) ||
        !visible(out.session_token) || expiration == 0)
        throw Error(ErrorCode::ProviderError, malformed);
    if (expiration <= now)
        throw Error(ErrorCode::ProviderError, "AWS STS returned credentials that have expired already",
                    "Check the clocks of the database server and of the STS endpoint.");
    expires_at = expiration;
    return out;
}

StsError sts_error(const std::string& xml)
{
    StsError error;
    std::string_view response, inner;
    if (!xml_element(xml, "ErrorResponse", response))
        return error;
    if (xml_element(response, "Error", inner)) {
        error.code = printable(xml_field(inner, "Code"));
        error.message = printable(xml_field(inner, "Message"));
    }
    std::string id = xml_field(response, "RequestId");
    if (id.size() <= 64 && id.find_first_not_of("0123456789abcdefABCDEF-") == std::string::npos)
        error.request_id = id;
    return error;
}

Error sts_failure(const StsError& error, long status, const std::string& action)
{
    std::string text = "AWS STS " + action + " failed (HTTP " + std::to_string(status) + ")" +
                       (error.code.empty() ? "" : ": " + error.code) +
                       (error.message.empty() ? "" : ": " + error.message) +
                       (error.request_id.empty() ? "" : " (AWS request id " + error.request_id + ")");
    static const char* const kRefusals[] = {"AccessDenied", "InvalidIdentityToken", "ExpiredToken",
                                            "ExpiredTokenException", "InvalidClientTokenId",
                                            "SignatureDoesNotMatch", "IncompleteSignature",
                                            "MissingAuthenticationToken", "IDPRejectedClaim",
                                            "RegionDisabledException", "InvalidAuthorizationMessageException"};
    for (const char* refusal : kRefusals)
        if (error.code == refusal)
            return Error(ErrorCode::KeyManagerDenied, "permission denied by " + text,
                         "Check the role's trust policy, the token and the credentials that assume it.");
    if (status == 429 || status >= 500 || error.code == "Throttling" || error.code == "ThrottlingException" ||
        error.code == "IDPCommunicationError" || error.code == "ServiceUnavailable" || error.code == "InternalFailure")
        return Error(ErrorCode::KeyManagerUnavailable, text);
    if (status == 403)
        return Error(ErrorCode::KeyManagerDenied, "permission denied by " + text);
    return Error(ErrorCode::ProviderError, text);
}

std::string form_encode(const std::vector<std::pair<std::string, std::string>>& fields)
{
    static const char* const kHex = "0123456789ABCDEF";
    std::string out;
    for (const auto& [name, value] : fields) {
        if (!out.empty())
            out += '&';
        for (const std::string* part : {&name, &value}) {
            for (unsigned char c : *part) {
                if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~')
                    out += static_cast<char>(c);
                else {
                    out += '%';
                    out += kHex[c >> 4];
                    out += kHex[c & 15];
                }
            }
            if (part == &name)
                out += '=';
        }
    }
    return out;
}

} // namespace aws


AwsCredentialChain::AwsCredentialChain(AwsCredentialSettings settings) : settings_(std::move(settings))
{
    apply_environment(settings_);
}

AwsCredentialChain::~AwsCredentialChain() = default;

const sigv4::Credentials& AwsCredentialChain::get(std::time_t now)
{
    if (expires_at_ != 0 && now < refresh_at_)
        return current_;
    try {
        refresh(now);
    } catch (const Error&) {
        // Inside the refresh margin the credentials held still work: a
        // refresh that fails (the endpoint down, throttled, a token not yet
        // rotated) keeps them, and is tried again a little later. Once they
        // have expired, the failure is the caller's.
        if (expires_at_ != 0 && now < expires_at_) {
            refresh_at_ = std::min(expires_at_, now + kFailedRefreshPause);
            return current_;
        }
        expires_at_ = 0;
        throw;
    }
    return current_;
}

void AwsCredentialChain::refresh(std::time_t now)
{
    if ((settings_.use_environment && from_environment()) || from_profile(now) || from_web_identity(now) ||
        from_container(now) || from_metadata_service(now))
        return;
    throw Error(ErrorCode::KeyManagerDenied, "no AWS credentials found for AWS KMS",
                "pgphi looked in the server's environment, the shared config and credentials files, web "
                "identity, the container credentials endpoint and the instance metadata service, as configured.",
                "Set pgphi.aws_credentials_file or pgphi.aws_config_file, pgphi.aws_web_identity_token_file "
                "with pgphi.aws_role_arn, pgphi.aws_container_credentials_uri or pgphi.aws_imds_endpoint.");
}

void AwsCredentialChain::keep(const sigv4::Credentials& fetched, std::time_t now, std::time_t expires_at,
                              const char* source)
{
    current_.access_key_id = fetched.access_key_id;
    current_.secret_access_key = fetched.secret_access_key;
    current_.session_token = fetched.session_token;
    expires_at_ = expires_at;
    source_ = source;
    if (expires_at == kNeverExpires) {
        refresh_at_ = kNeverExpires;
        return;
    }
    // Five minutes early, as the SDKs do; for credentials that live less than
    // twenty minutes, once three quarters of their lifetime have passed.
    std::time_t lifetime = expires_at > now ? expires_at - now : 0;
    refresh_at_ = expires_at - std::min(kRefreshMargin, lifetime / 4);
}

bool AwsCredentialChain::from_environment()
{
    const char* id = std::getenv("AWS_ACCESS_KEY_ID");
    const char* secret = std::getenv("AWS_SECRET_ACCESS_KEY");
    if (!id || !secret || !*id || !*secret)
        return false;
    const char* token = std::getenv("AWS_SESSION_TOKEN");
    sigv4::Credentials found;
    found.access_key_id = id;
    found.secret_access_key = secret;
    found.session_token = token ? token : "";
    keep(found, 0, kNeverExpires, "environment");
    return true;
}

namespace {

void read_profiles(const std::string& path, const char* what, bool config_format, aws::ProfileSet& into)
{
    SecureBytes raw = read_secret_file(path, what, 1 << 20);
    std::string text(reinterpret_cast<const char*>(raw.data()), raw.size());
    WipeOnExit wipe_text(text);
    aws::parse_profiles(text, config_format, into);
}

} // namespace

bool AwsCredentialChain::from_profile(std::time_t now)
{
    if (settings_.credentials_file.empty() && settings_.config_file.empty())
        return false;
    aws::ProfileSet profiles;
    // The credentials file's values win over the config file's, as in the SDKs.
    if (!settings_.config_file.empty())
        read_profiles(settings_.config_file, "AWS config file", true, profiles);
    if (!settings_.credentials_file.empty())
        read_profiles(settings_.credentials_file, "AWS credentials file", false, profiles);
    aws::ProfileChain chain = aws::resolve_profile(profiles, settings_.profile.empty() ? "default" : settings_.profile);
    if (chain.base == aws::ProfileChain::Base::StaticKeys && chain.roles.empty()) {
        keep(chain.static_keys, now, kNeverExpires, "credentials file");
        return true;
    }
    sigv4::Credentials credentials;
    std::time_t expires_at = kNeverExpires;
    base_credentials(chain, now, credentials, expires_at);
    size_t first = chain.base == aws::ProfileChain::Base::WebIdentity ? 1 : 0;
    for (size_t i = first; i < chain.roles.size(); ++i) {
        sigv4::Credentials next;
        assume_role(credentials, chain.roles[i], now, next, expires_at);
        credentials.access_key_id = next.access_key_id;
        credentials.secret_access_key = next.secret_access_key;
        credentials.session_token = next.session_token;
    }
    keep(credentials, now, expires_at, "shared config profile (STS AssumeRole)");
    return true;
}

void AwsCredentialChain::base_credentials(const aws::ProfileChain& chain, std::time_t now, sigv4::Credentials& out,
                                          std::time_t& expires_at)
{
    switch (chain.base) {
    case aws::ProfileChain::Base::StaticKeys:
        out.access_key_id = chain.static_keys.access_key_id;
        out.secret_access_key = chain.static_keys.secret_access_key;
        out.session_token = chain.static_keys.session_token;
        expires_at = kNeverExpires;
        return;
    case aws::ProfileChain::Base::WebIdentity:
        assume_role_with_web_identity(chain.web_identity_token_file, chain.roles.at(0), now, out, expires_at);
        return;
    case aws::ProfileChain::Base::Environment: {
        std::string id = env("AWS_ACCESS_KEY_ID"), secret = env("AWS_SECRET_ACCESS_KEY");
        if (id.empty() || secret.empty())
            throw Error(ErrorCode::KeyManagerDenied,
                        "the AWS profile's credential_source is Environment, but the server's environment has no keys");
        out.access_key_id = id;
        out.secret_access_key = secret;
        out.session_token = env("AWS_SESSION_TOKEN");
        wipe(secret);
        expires_at = kNeverExpires;
        return;
    }
    case aws::ProfileChain::Base::InstanceMetadata:
        imds_fetch(now, out, expires_at);
        return;
    case aws::ProfileChain::Base::Container:
        container_fetch(now, out, expires_at);
        return;
    }
}

std::string AwsCredentialChain::session_name(const aws::RoleStep& role, std::time_t now) const
{
    if (!role.session_name.empty())
        return role.session_name;
    if (!settings_.role_session_name.empty())
        return settings_.role_session_name;
    return "pgphi-" + std::to_string(static_cast<long long>(now));
}

void AwsCredentialChain::assume_role(const sigv4::Credentials& with, const aws::RoleStep& role, std::time_t now,
                                     sigv4::Credentials& out, std::time_t& expires_at)
{
    std::vector<std::pair<std::string, std::string>> fields = {
        {"Action", "AssumeRole"}, {"Version", kStsVersion}, {"RoleArn", role.role_arn},
        {"RoleSessionName", session_name(role, now)}};
    if (!role.external_id.empty())
        fields.emplace_back("ExternalId", role.external_id);
    std::time_t step_expires = 0;
    sts_call("AssumeRole", aws::form_encode(fields), &with, now, out, step_expires);
    expires_at = std::min(expires_at, step_expires);
}

void AwsCredentialChain::assume_role_with_web_identity(const std::string& token_file, const aws::RoleStep& role,
                                                       std::time_t now, sigv4::Credentials& out,
                                                       std::time_t& expires_at)
{
    // Read at each call: the kubelet rotates the projected token.
    std::string token = read_identity_token_file(token_file, "AWS web identity token file");
    WipeOnExit wipe_token(token);
    std::vector<std::pair<std::string, std::string>> fields = {
        {"Action", "AssumeRoleWithWebIdentity"}, {"Version", kStsVersion}, {"RoleArn", role.role_arn},
        {"RoleSessionName", session_name(role, now)}, {"WebIdentityToken", token}};
    std::string body = aws::form_encode(fields);
    WipeOnExit wipe_body(body);
    wipe(fields.back().second);
    sts_call("AssumeRoleWithWebIdentity", body, nullptr, now, out, expires_at);
}

void AwsCredentialChain::sts_call(const std::string& action, const std::string& body, const sigv4::Credentials* signer,
                                  std::time_t now, sigv4::Credentials& out, std::time_t& expires_at)
{
    if (settings_.sts_endpoint.empty())
        throw Error(ErrorCode::ConfigError, "assuming an AWS role needs an STS endpoint", {},
                    "Set pgphi.aws_region (the regional STS endpoint is derived from it) or pgphi.aws_sts_endpoint.");
    if (signer && settings_.region.empty())
        throw Error(ErrorCode::ConfigError, "assuming an AWS role needs a region", {}, "Set pgphi.aws_region.");
    if (!sts_)
        sts_ = std::make_unique<HttpClient>("AWS STS", settings_.tls, settings_.timeouts,
                                            PlainHttp{settings_.allow_http_loopback, false}, settings_.proxy);
    Endpoint endpoint = parse_endpoint(settings_.sts_endpoint, "AWS STS");
    HttpRequest request;
    request.method = "POST";
    request.url = endpoint.origin + endpoint.path;
    request.body = body;
    const char* content_type = "application/x-www-form-urlencoded; charset=utf-8";
    if (signer) {
        sigv4::Request signing{"POST", endpoint.path, "", {}, body};
        signing.headers = {{"host", endpoint.host_header}, {"content-type", content_type}};
        std::string authorization = sigv4::sign(signing, *signer, settings_.region, "sts", now);
        WipeOnExit wipe_payload(signing.payload);
        for (const auto& header : signing.headers)
            if (header.first != "host")
                request.headers.push_back(header);
        request.headers.emplace_back("Authorization", authorization);
    } else {
        request.headers.emplace_back("Content-Type", content_type);
    }
    HttpResponse response = sts_->send(request);
    if (response.status == 200) {
        sigv4::Credentials fetched = aws::sts_credentials(response.body, action, now, expires_at);
        out.access_key_id = fetched.access_key_id;
        out.secret_access_key = fetched.secret_access_key;
        out.session_token = fetched.session_token;
        return;
    }
    aws::StsError error = aws::sts_error(response.body);
    if (error.request_id.empty()) {
        std::string id = response.header("x-amzn-requestid");
        if (id.size() <= 64)
            error.request_id = printable(id);
    }
    throw aws::sts_failure(error, response.status, action);
}

bool AwsCredentialChain::from_web_identity(std::time_t now)
{
    if (settings_.web_identity_token_file.empty() && settings_.role_arn.empty())
        return false;
    if (settings_.web_identity_token_file.empty() || settings_.role_arn.empty())
        throw Error(ErrorCode::ConfigError, "AWS web identity needs both a token file and a role ARN", {},
                    "Set pgphi.aws_web_identity_token_file and pgphi.aws_role_arn (or AWS_WEB_IDENTITY_TOKEN_FILE "
                    "and AWS_ROLE_ARN in the server's environment).");
    sigv4::Credentials fetched;
    std::time_t expires_at = 0;
    aws::RoleStep role{settings_.role_arn, {}, {}, {}};
    assume_role_with_web_identity(settings_.web_identity_token_file, role, now, fetched, expires_at);
    keep(fetched, now, expires_at, "web identity (STS AssumeRoleWithWebIdentity)");
    return true;
}

void AwsCredentialChain::container_fetch(std::time_t now, sigv4::Credentials& out, std::time_t& expires_at)
{
    std::string url;
    if (!settings_.container_credentials_relative_uri.empty()) {
        if (settings_.container_credentials_relative_uri[0] != '/')
            throw Error(ErrorCode::ConfigError, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI does not start with /");
        url = kEcsHost + settings_.container_credentials_relative_uri;
    } else if (!settings_.container_credentials_uri.empty()) {
        url = settings_.container_credentials_uri;
    } else {
        throw Error(ErrorCode::KeyManagerDenied, "no container credentials endpoint is configured", {},
                    "Set pgphi.aws_container_credentials_uri.");
    }
    if (!container_)
        container_ = std::make_unique<HttpClient>("the container credentials endpoint", settings_.tls,
                                                  settings_.imds_timeouts, PlainHttp{false, false, true});
    HttpRequest request;
    request.url = url;
    // The token file (EKS Pod Identity) is read at each fetch: it rotates.
    std::string token = !settings_.container_authorization_token_file.empty()
                            ? read_identity_token_file(settings_.container_authorization_token_file,
                                                       "container authorization token file")
                            : settings_.container_authorization_token;
    WipeOnExit wipe_token(token);
    if (!token.empty())
        request.headers.emplace_back("Authorization", token);
    HttpResponse response = container_->send(request);
    for (auto& header : request.headers)
        wipe(header.second);
    if (response.status != 200) {
        std::string text = "the container credentials endpoint returned HTTP " + std::to_string(response.status);
        if (response.status == 429 || response.status >= 500)
            throw Error(ErrorCode::KeyManagerUnavailable, text);
        throw Error(ErrorCode::KeyManagerDenied, "permission denied by " + text,
                    "Check the container's authorization token (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE).");
    }
    sigv4::Credentials fetched = aws::container_credentials(response.body, now, expires_at);
    out.access_key_id = fetched.access_key_id;
    out.secret_access_key = fetched.secret_access_key;
    out.session_token = fetched.session_token;
}

bool AwsCredentialChain::from_container(std::time_t now)
{
    if (settings_.container_credentials_uri.empty() && settings_.container_credentials_relative_uri.empty())
        return false;
    sigv4::Credentials fetched;
    std::time_t expires_at = 0;
    container_fetch(now, fetched, expires_at);
    keep(fetched, now, expires_at, "container credentials endpoint");
    return true;
}

bool AwsCredentialChain::from_metadata_service(std::time_t now)
{
    if (settings_.imds_endpoint.empty())
        return false;
    sigv4::Credentials fetched;
    std::time_t expires_at = 0;
    imds_fetch(now, fetched, expires_at);
    keep(fetched, now, expires_at, "instance metadata service");
    return true;
}

void AwsCredentialChain::imds_fetch(std::time_t now, sigv4::Credentials& out, std::time_t& expires_at)
{
    if (!imds_)
        imds_ = std::make_unique<HttpClient>(
            "the EC2 instance metadata service", TlsSettings{}, settings_.imds_timeouts,
            PlainHttp{settings_.allow_http_loopback, true});
    const std::string base = settings_.imds_endpoint.empty() ? "http://169.254.169.254" : settings_.imds_endpoint;
    // A failing service (5xx) is unavailable and retried; a refusal is a denial.
    auto failed = [](long status, std::string text) {
        return Error(status == 429 || status >= 500 ? ErrorCode::KeyManagerUnavailable : ErrorCode::KeyManagerDenied,
                     std::move(text) + " (HTTP " + std::to_string(status) + ")");
    };

    HttpRequest token_request;
    token_request.method = "PUT";
    token_request.url = base + "/latest/api/token";
    token_request.headers.emplace_back("X-aws-ec2-metadata-token-ttl-seconds", "21600");
    HttpResponse token = imds_->send(token_request);
    if (token.status != 200)
        throw failed(token.status, "the instance metadata service refused a session token");

    std::string session_token = aws::imds_session_token(token.body);
    WipeOnExit wipe_session_token(session_token);

    HttpRequest role_request;
    role_request.url = base + "/latest/meta-data/iam/security-credentials/";
    role_request.headers.emplace_back("X-aws-ec2-metadata-token", session_token);
    HttpResponse role = imds_->send(role_request);
    if (role.status != 200)
        throw failed(role.status, "the instance metadata service has no IAM role for this instance");
    std::string role_name = aws::imds_role_name(role.body);

    HttpRequest credentials_request;
    credentials_request.url = base + "/latest/meta-data/iam/security-credentials/" + role_name;
    credentials_request.headers.emplace_back("X-aws-ec2-metadata-token", session_token);
    HttpResponse credentials = imds_->send(credentials_request);
    if (credentials.status != 200)
        throw failed(credentials.status,
                     "the instance metadata service returned no credentials for role \"" + role_name + "\"");
    sigv4::Credentials fetched = aws::imds_credentials(credentials.body, now, expires_at);
    out.access_key_id = fetched.access_key_id;
    out.secret_access_key = fetched.secret_access_key;
    out.session_token = fetched.session_token;
}

} // namespace pgphi
