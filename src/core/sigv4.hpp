// AWS Signature Version 4, written against OpenSSL's HMAC and SHA-256. Used to
// sign AWS KMS requests; checked against the official SigV4 test suite.
#pragma once

#include <ctime>
#include <string>
#include <utility>
#include <vector>

namespace pgphi::sigv4 {

struct Credentials {
    std::string access_key_id;
    std::string secret_access_key;
    std::string session_token; // empty unless temporary credentials

    ~Credentials();
};

// A request as SigV4 sees it: the path and query as they go on the wire
// (not yet URI-encoded), and the headers that will be signed.
struct Request {
    std::string method;
    std::string path;
    std::string query;
    std::vector<std::pair<std::string, std::string>> headers; // must include host and x-amz-date
    std::string payload;
};

struct Scope {
    std::string date;      // YYYYMMDD
    std::string region;
    std::string service;
};

std::string canonical_request(const Request& request);
std::string string_to_sign(const std::string& amz_date, const Scope& scope, const std::string& canonical);
std::string signature(const std::string& secret_access_key, const Scope& scope, const std::string& to_sign);
std::string authorization_header(const Request& request, const Credentials& credentials, const Scope& scope,
                                 const std::string& amz_date);

// "20150830T123600Z" for a time.
std::string amz_date(std::time_t when);

// Adds x-amz-date (and x-amz-security-token when present) and returns the
// Authorization header value for `request`, signed at `when`.
std::string sign(Request& request, const Credentials& credentials, const std::string& region,
                 const std::string& service, std::time_t when);

std::string sha256_hex(const std::string& data);

} // namespace pgphi::sigv4
