#include "sigv4.hpp"

#include <algorithm>
#include <cctype>
#include <map>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "bytes.hpp"
#include "encoding.hpp"
#include "error.hpp"

namespace pgphi::sigv4 {

namespace {

constexpr const char* kAlgorithm = "AWS4-HMAC-SHA256";

std::string hmac_sha256(const std::string& key, const std::string& data)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t mac_len = 0;
    if (!EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, key.data(), key.size(),
                   reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, sizeof(mac), &mac_len))
        throw Error(ErrorCode::Internal, "HMAC-SHA-256 failed");
    return std::string(reinterpret_cast<char*>(mac), mac_len);
}

bool unreserved(unsigned char c)
{
    return std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~';
}

// RFC 3986 percent-encoding of everything but unreserved characters.
std::string uri_encode(const std::string& text, bool keep_slash)
{
    static const char digits[] = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : text) {
        if (unreserved(c) || (keep_slash && c == '/')) {
            out.push_back(static_cast<char>(c));
        } else {
            out.push_back('%');
            out.push_back(digits[c >> 4]);
            out.push_back(digits[c & 0xF]);
        }
    }
    return out;
}

// Removes empty and "." segments and resolves ".." (as AWS does for every
// service but S3), keeping a trailing slash.
std::string normalized_path(const std::string& path)
{
    std::vector<std::string> segments;
    size_t start = 0;
    while (start <= path.size()) {
        size_t end = path.find('/', start);
        if (end == std::string::npos)
            end = path.size();
        std::string segment = path.substr(start, end - start);
        if (segment == "..") {
            if (!segments.empty())
                segments.pop_back();
        } else if (!segment.empty() && segment != ".") {
            segments.push_back(segment);
        }
        start = end + 1;
    }
    std::string out;
    for (const auto& segment : segments)
        out += "/" + uri_encode(segment, false);
    bool trailing = path.size() > 1 && path.back() == '/' && !segments.empty();
    if (out.empty() || trailing)
        out += "/";
    return out;
}

std::string canonical_query(const std::string& query)
{
    std::vector<std::pair<std::string, std::string>> params;
    size_t start = 0;
    while (start < query.size()) {
        size_t end = query.find('&', start);
        if (end == std::string::npos)
            end = query.size();
        std::string item = query.substr(start, end - start);
        if (!item.empty()) {
            size_t eq = item.find('=');
            std::string key = item.substr(0, eq);
            std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
            params.emplace_back(uri_encode(key, false), uri_encode(value, false));
        }
        start = end + 1;
    }
    std::sort(params.begin(), params.end());
    std::string out;
    for (const auto& [key, value] : params)
        out += (out.empty() ? "" : "&") + key + "=" + value;
    return out;
}

std::string lower(std::string s)
{
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
}

// Trims and collapses runs of spaces, as SigV4 prescribes for header values.
std::string trimmed_value(const std::string& value)
{
    std::string out;
    bool in_space = false;
    for (char c : value) {
        if (c == ' ' || c == '\t') {
            in_space = !out.empty();
            continue;
        }
        if (in_space)
            out.push_back(' ');
        in_space = false;
        out.push_back(c);
    }
    return out;
}

// Header name -> comma-joined values, sorted by name.
std::map<std::string, std::string> canonical_headers(const Request& request)
{
    std::map<std::string, std::string> headers;
    for (const auto& [name, value] : request.headers) {
        std::string& joined = headers[lower(name)];
        joined += (joined.empty() ? "" : ",") + trimmed_value(value);
    }
    return headers;
}

std::string signed_header_names(const std::map<std::string, std::string>& headers)
{
    std::string names;
    for (const auto& entry : headers)
        names += (names.empty() ? "" : ";") + entry.first;
    return names;
}

std::string credential_scope(const Scope& scope)
{
    return scope.date + "/" + scope.region + "/" + scope.service + "/aws4_request";
}

} // namespace

Credentials::~Credentials() { OPENSSL_cleanse(secret_access_key.data(), secret_access_key.size()); }

std::string sha256_hex(const std::string& data)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr) != 1)
        throw Error(ErrorCode::Internal, "SHA-256 failed");
    return hex_lower(ByteView(digest, len));
}

std::string canonical_request(const Request& request)
{
    auto headers = canonical_headers(request);
    std::string out = request.method + "\n" + normalized_path(request.path) + "\n" +
                      canonical_query(request.query) + "\n";
    for (const auto& [name, value] : headers)
        out += name + ":" + value + "\n";
    out += "\n" + signed_header_names(headers) + "\n" + sha256_hex(request.payload);
    return out;
}

std::string string_to_sign(const std::string& amz_date, const Scope& scope, const std::string& canonical)
{
    return std::string(kAlgorithm) + "\n" + amz_date + "\n" + credential_scope(scope) + "\n" +
           sha256_hex(canonical);
}

std::string signature(const std::string& secret_access_key, const Scope& scope, const std::string& to_sign)
{
    std::string key = hmac_sha256("AWS4" + secret_access_key, scope.date);
    key = hmac_sha256(key, scope.region);
    key = hmac_sha256(key, scope.service);
    key = hmac_sha256(key, "aws4_request");
    std::string mac = hmac_sha256(key, to_sign);
    OPENSSL_cleanse(key.data(), key.size());
    return hex_lower(ByteView(reinterpret_cast<const uint8_t*>(mac.data()), mac.size()));
}

std::string authorization_header(const Request& request, const Credentials& credentials, const Scope& scope,
                                 const std::string& date)
{
    std::string canonical = canonical_request(request);
    std::string to_sign = string_to_sign(date, scope, canonical);
    return std::string(kAlgorithm) + " Credential=" + credentials.access_key_id + "/" + credential_scope(scope) +
           ", SignedHeaders=" + signed_header_names(canonical_headers(request)) +
           ", Signature=" + signature(credentials.secret_access_key, scope, to_sign);
}

std::string amz_date(std::time_t when)
{
    std::tm utc{};
    gmtime_r(&when, &utc);
    char buffer[20];
    std::strftime(buffer, sizeof(buffer), "%Y%m%dT%H%M%SZ", &utc);
    return buffer;
}

std::string sign(Request& request, const Credentials& credentials, const std::string& region,
                 const std::string& service, std::time_t when)
{
    std::string date = amz_date(when);
    request.headers.emplace_back("x-amz-date", date);
    if (!credentials.session_token.empty())
        request.headers.emplace_back("x-amz-security-token", credentials.session_token);
    return authorization_header(request, credentials, Scope{date.substr(0, 8), region, service}, date);
}

} // namespace pgphi::sigv4
