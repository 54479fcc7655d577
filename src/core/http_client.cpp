#include "http_client.hpp"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <mutex>
#include <thread>

#include <arpa/inet.h>
#include <csignal>
#include <pthread.h>
#include <netinet/in.h>

#include <curl/curl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "error.hpp"

namespace pgphi {

namespace {

bool (*g_abort_check)() = nullptr;
void (*g_retry_sleep)(std::chrono::milliseconds) = nullptr;

// libcurl's threaded resolver. Debian's libcurl (AsynchDNS without c-ares)
// resolves each host name in a short-lived thread of the calling process.
// Decision: accepted, with every signal blocked while a transfer runs. The
// thread runs getaddrinfo and calls nothing of PostgreSQL's; the one danger
// is a signal the kernel delivers to it, which would run PostgreSQL's handler
// (die, the latch's) on the wrong thread. A thread inherits the signal mask
// of the thread that creates it, so blocking every signal around
// curl_easy_perform makes the resolver thread start with all of them blocked.
// The shutdown signals still end a transfer at once: the progress callback
// looks at the pending set, and they are delivered, to the process's own
// thread, when the mask is restored. The synchronous resolver would start no
// thread, but with CURLOPT_NOSIGNAL (required: its timeout uses SIGALRM) it
// cannot time out, so a dead DNS server would hang the key broker.
class BlockAllSignals {
public:
    BlockAllSignals()
    {
        sigset_t all;
        sigfillset(&all);
        blocked_ = pthread_sigmask(SIG_BLOCK, &all, &previous_) == 0;
    }
    ~BlockAllSignals()
    {
        if (blocked_)
            pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
    }
    BlockAllSignals(const BlockAllSignals&) = delete;
    BlockAllSignals& operator=(const BlockAllSignals&) = delete;

private:
    sigset_t previous_;
    bool blocked_ = false;
};

bool shutdown_signal_pending()
{
    sigset_t pending;
    return sigpending(&pending) == 0 && (sigismember(&pending, SIGTERM) == 1 || sigismember(&pending, SIGQUIT) == 1);
}

int on_progress(void*, curl_off_t, curl_off_t, curl_off_t, curl_off_t)
{
    return transfer_abort_requested() || shutdown_signal_pending() ? 1 : 0;
}

void global_init_once()
{
    static std::once_flag once;
    std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

size_t append_body(char* data, size_t size, size_t count, void* user)
{
    auto* body = static_cast<std::string*>(user);
    size_t n = size * count;
    // Grow by copying into a wiped-on-exit buffer ourselves, so no stale copy
    // of a secret is left behind by std::string's reallocation.
    if (body->size() + n > body->capacity()) {
        std::string bigger;
        bigger.reserve(std::max(body->capacity() * 2, body->size() + n));
        bigger.append(*body);
        OPENSSL_cleanse(body->data(), body->size());
        body->swap(bigger);
    }
    body->append(data, n);
    return n;
}

// A numeric loopback address (127.0.0.0/8, ::1) or "localhost"; names that
// merely start with "127." are not.
bool is_loopback_host(const std::string& host)
{
    if (host == "localhost" || host == "[::1]" || host == "::1")
        return true;
    in_addr address{};
    return inet_pton(AF_INET, host.c_str(), &address) == 1 && (ntohl(address.s_addr) >> 24) == 127;
}

bool is_metadata_service_host(const std::string& host)
{
    return host == "169.254.169.254" || host == "[fd00:ec2::254]" || host == "fd00:ec2::254";
}

bool is_container_service_host(const std::string& host)
{
    return host == "169.254.170.2" || host == "169.254.170.23" || host == "[fd00:ec2::23]" ||
           host == "fd00:ec2::23" || is_loopback_host(host);
}

struct CurlUrl {
    CURLU* handle = curl_url();
    ~CurlUrl() { curl_url_cleanup(handle); }
};

struct CurlString {
    char* text = nullptr;
    ~CurlString() { curl_free(text); }
};

struct CurlHeaders {
    curl_slist* list = nullptr;
    ~CurlHeaders() { curl_slist_free_all(list); }
};

} // namespace

void set_transfer_abort_check(bool (*check)()) { g_abort_check = check; }
void set_retry_sleep(void (*sleep)(std::chrono::milliseconds)) { g_retry_sleep = sleep; }
bool transfer_abort_requested() { return g_abort_check && g_abort_check(); }

HttpRequest::~HttpRequest() { OPENSSL_cleanse(body.data(), body.size()); }
HttpResponse::~HttpResponse() { OPENSSL_cleanse(body.data(), body.size()); }

std::string HttpResponse::header(const std::string& name) const
{
    for (const auto& [key, value] : headers)
        if (key == name)
            return value;
    return {};
}

long HttpResponse::retry_after_seconds() const
{
    std::string value = header("retry-after");
    if (value.empty() || value.size() > 6 || value.find_first_not_of("0123456789") != std::string::npos)
        return -1;
    return std::stol(value);
}

namespace {

// Keeps the headers HttpResponse documents; never a header that could carry
// a secret (no Set-Cookie, no token).
size_t keep_header(char* data, size_t size, size_t count, void* user)
{
    auto* response = static_cast<HttpResponse*>(user);
    size_t n = size * count;
    std::string line(data, n);
    size_t colon = line.find(':');
    if (line.rfind("HTTP/", 0) == 0) {
        response->headers.clear(); // a new response (after a 100 Continue, say)
        return n;
    }
    if (colon == std::string::npos)
        return n;
    std::string name = line.substr(0, colon);
    for (char& c : name)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    static const char* const kKept[] = {"retry-after", "location", "x-amzn-requestid", "x-amzn-errortype",
                                        "x-vault-index"};
    for (const char* kept : kKept) {
        if (name == kept) {
            std::string value = line.substr(colon + 1);
            size_t start = value.find_first_not_of(" \t");
            size_t end = value.find_last_not_of(" \t\r\n");
            value = start == std::string::npos ? "" : value.substr(start, end - start + 1);
            if (value.size() <= 2048)
                response->headers.emplace_back(name, value);
        }
    }
    return n;
}

thread_local std::chrono::milliseconds t_requested_delay{0};

} // namespace

void request_retry_delay(std::chrono::milliseconds delay) { t_requested_delay = std::max(t_requested_delay, delay); }

Endpoint parse_endpoint(const std::string& url, const std::string& service)
{
    CurlUrl parsed;
    CurlString scheme, host, port, path;
    if (!parsed.handle || curl_url_set(parsed.handle, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK ||
        curl_url_get(parsed.handle, CURLUPART_SCHEME, &scheme.text, 0) != CURLUE_OK ||
        curl_url_get(parsed.handle, CURLUPART_HOST, &host.text, 0) != CURLUE_OK)
        throw Error(ErrorCode::ConfigError, service + " address \"" + url + "\" is not a valid URL");
    CurlString query;
    if (curl_url_get(parsed.handle, CURLUPART_QUERY, &query.text, 0) == CURLUE_OK && query.text && *query.text)
        throw Error(ErrorCode::ConfigError, service + " address \"" + url + "\" has a query string",
                    {}, "Give the endpoint as https://host[:port][/path].");
    Endpoint endpoint;
    std::string explicit_port;
    if (curl_url_get(parsed.handle, CURLUPART_PORT, &port.text, 0) == CURLUE_OK && port.text)
        explicit_port = port.text;
    bool default_port = explicit_port.empty() || (std::strcmp(scheme.text, "https") == 0 && explicit_port == "443") ||
                        (std::strcmp(scheme.text, "http") == 0 && explicit_port == "80");
    endpoint.host_header = std::string(host.text) + (default_port ? "" : ":" + explicit_port);
    endpoint.origin = std::string(scheme.text) + "://" + endpoint.host_header;
    std::string raw_path;
    if (curl_url_get(parsed.handle, CURLUPART_PATH, &path.text, 0) == CURLUE_OK && path.text)
        raw_path = path.text;
    for (char c : raw_path)
        if (!(c == '/' && !endpoint.path.empty() && endpoint.path.back() == '/'))
            endpoint.path += c;
    if (endpoint.path.empty() || endpoint.path[0] != '/')
        endpoint.path.insert(endpoint.path.begin(), '/');
    return endpoint;
}

HttpClient::HttpClient(std::string service, TlsSettings tls, HttpTimeouts timeouts, PlainHttp plain_http,
                       ProxySettings proxy)
    : service_(std::move(service)), tls_(std::move(tls)), timeouts_(timeouts), plain_http_(plain_http),
      proxy_(std::move(proxy))
{
    global_init_once();
    if (!proxy_.url.empty() && proxy_.url.rfind("http://", 0) != 0 && proxy_.url.rfind("https://", 0) != 0)
        throw Error(ErrorCode::ConfigError, "the outbound proxy for " + service_ + " is not an http:// or https:// URL",
                    {}, "Set pgphi.provider_proxy to http://host:port or https://host:port.");
    curl_ = curl_easy_init();
    if (!curl_)
        throw Error(ErrorCode::Internal, "could not initialise libcurl");
}

HttpClient::~HttpClient() { curl_easy_cleanup(curl_); }

void HttpClient::check_url(const std::string& url) const
{
    CurlUrl parsed;
    CurlString scheme, host;
    if (!parsed.handle || curl_url_set(parsed.handle, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK ||
        curl_url_get(parsed.handle, CURLUPART_SCHEME, &scheme.text, 0) != CURLUE_OK ||
        curl_url_get(parsed.handle, CURLUPART_HOST, &host.text, 0) != CURLUE_OK)
        throw Error(ErrorCode::ConfigError, service_ + " address \"" + url + "\" is not a valid URL");
    if (std::strcmp(scheme.text, "https") == 0)
        return;
    if (std::strcmp(scheme.text, "http") == 0 &&
        ((plain_http_.loopback && is_loopback_host(host.text)) ||
         (plain_http_.metadata_service && is_metadata_service_host(host.text)) ||
         (plain_http_.container_service && is_container_service_host(host.text))))
        return;
    throw Error(ErrorCode::ConfigError, service_ + " address \"" + url + "\" does not use https",
                "pgphi talks to key managers over TLS only.",
                std::strcmp(scheme.text, "http") == 0
                    ? "Plain http is allowed only to loopback addresses, with pgphi.allow_insecure_http_loopback (for tests)."
                    : "");
}

HttpResponse HttpClient::send(const HttpRequest& request)
{
    check_url(request.url);

    CurlHeaders headers;
    for (const auto& [name, value] : request.headers) {
        // A line break in a value (a token file with two lines, a token from
        // a key manager) would add headers of its own; the value is not shown.
        if (value.find_first_of(std::string("\r\n\0", 3)) != std::string::npos)
            throw Error(ErrorCode::ConfigError, "the " + name + " header for " + service_ + " contains a line break",
                        {}, "Check the file the token or credentials come from.");
        std::string line = name + ": " + value;
        curl_slist* grown = curl_slist_append(headers.list, line.c_str());
        OPENSSL_cleanse(line.data(), line.size()); // may hold a token
        if (!grown)
            throw std::bad_alloc();
        headers.list = grown;
    }
    // No "Expect: 100-continue" round trip for small JSON bodies.
    headers.list = curl_slist_append(headers.list, "Expect:");

    HttpResponse response;
    response.body.reserve(4096);
    char curl_error[CURL_ERROR_SIZE] = "";

    curl_easy_reset(curl_);
    curl_easy_setopt(curl_, CURLOPT_URL, request.url.c_str());
    // Only the schemes check_url allowed. CURLOPT_PROTOCOLS_STR is 7.85's; the
    // bitmask it replaces is what 7.76 (RHEL 9) and 7.81 (Ubuntu 22.04) have.
    bool plain_allowed = plain_http_.loopback || plain_http_.metadata_service || plain_http_.container_service;
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(curl_, CURLOPT_PROTOCOLS_STR, plain_allowed ? "http,https" : "https");
#else
    curl_easy_setopt(curl_, CURLOPT_PROTOCOLS,
                     plain_allowed ? static_cast<long>(CURLPROTO_HTTP | CURLPROTO_HTTPS) : static_cast<long>(CURLPROTO_HTTPS));
#endif
    curl_easy_setopt(curl_, CURLOPT_FOLLOWLOCATION, 0L); // redirects are the provider's decision (Vault HA)
    if (proxy_.url.empty()) {
        curl_easy_setopt(curl_, CURLOPT_NOPROXY, "*"); // never through a proxy from the environment
    } else {
        // Only the configured proxy, never one from the environment, and
        // https through a CONNECT tunnel so TLS stays end to end.
        curl_easy_setopt(curl_, CURLOPT_PROXY, proxy_.url.c_str());
        curl_easy_setopt(curl_, CURLOPT_NOPROXY, "");
        curl_easy_setopt(curl_, CURLOPT_HTTPPROXYTUNNEL, 1L);
        if (!proxy_.ca_file.empty())
            curl_easy_setopt(curl_, CURLOPT_PROXY_CAINFO, proxy_.ca_file.c_str());
    }
    curl_easy_setopt(curl_, CURLOPT_NOSIGNAL, 1L); // never touch the backend's signal handlers
    curl_easy_setopt(curl_, CURLOPT_SSLVERSION, static_cast<long>(CURL_SSLVERSION_TLSv1_2));
    curl_easy_setopt(curl_, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(curl_, CURLOPT_SSL_VERIFYHOST, 2L);
    if (!tls_.ca_file.empty())
        curl_easy_setopt(curl_, CURLOPT_CAINFO, tls_.ca_file.c_str());
    if (!tls_.client_cert.empty())
        curl_easy_setopt(curl_, CURLOPT_SSLCERT, tls_.client_cert.c_str());
    if (!tls_.client_key.empty())
        curl_easy_setopt(curl_, CURLOPT_SSLKEY, tls_.client_key.c_str());
    curl_easy_setopt(curl_, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(timeouts_.connect.count()));
    curl_easy_setopt(curl_, CURLOPT_TIMEOUT_MS, static_cast<long>(timeouts_.total.count()));
    curl_easy_setopt(curl_, CURLOPT_CUSTOMREQUEST, request.method.c_str());
    if (request.method != "GET") {
        curl_easy_setopt(curl_, CURLOPT_POSTFIELDS, request.body.data());
        curl_easy_setopt(curl_, CURLOPT_POSTFIELDSIZE, static_cast<long>(request.body.size()));
    }
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, headers.list);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, append_body);
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &response.body);
    curl_easy_setopt(curl_, CURLOPT_HEADERFUNCTION, keep_header);
    curl_easy_setopt(curl_, CURLOPT_HEADERDATA, &response);
    curl_easy_setopt(curl_, CURLOPT_ERRORBUFFER, curl_error);
    if (g_abort_check) {
        curl_easy_setopt(curl_, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(curl_, CURLOPT_XFERINFOFUNCTION, on_progress);
    }

    CURLcode rc;
    {
        BlockAllSignals during_transfer; // see BlockAllSignals
        rc = curl_easy_perform(curl_);
    }
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, nullptr);
    if (rc == CURLE_ABORTED_BY_CALLBACK)
        throw Error(ErrorCode::KeyManagerUnavailable, service_ + " request abandoned: pgphi is shutting down");
    if (rc != CURLE_OK) {
        std::string reason = curl_error[0] ? curl_error : curl_easy_strerror(rc);
        throw Error(ErrorCode::KeyManagerUnavailable, service_ + " is unavailable: " + reason,
                    "pgphi could not complete a request to " + request.url + ".");
    }
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &response.status);
    return response;
}

std::chrono::milliseconds RetryPolicy::delay_before_attempt(int attempt) const
{
    // Full jitter: uniform in [0, min(max, base * 2^(attempt-2))].
    long long cap = base_delay.count() << std::min(attempt - 2, 20);
    cap = std::min<long long>(cap, max_delay.count());
    uint32_t random = 0;
    RAND_bytes(reinterpret_cast<unsigned char*>(&random), sizeof(random));
    return std::chrono::milliseconds(cap > 0 ? static_cast<long long>(random % (cap + 1)) : 0);
}

bool with_retries(const RetryPolicy& policy, const std::function<bool(int)>& attempt,
                  const std::function<void(std::chrono::milliseconds)>& sleep)
{
    t_requested_delay = std::chrono::milliseconds(0);
    for (int n = 1; n <= std::max(1, policy.max_attempts); ++n) {
        if (n > 1 && transfer_abort_requested())
            return false;
        if (n > 1) {
            auto delay = std::max(policy.delay_before_attempt(n), std::min(t_requested_delay, policy.max_delay));
            t_requested_delay = std::chrono::milliseconds(0);
            if (sleep)
                sleep(delay);
            else if (g_retry_sleep)
                g_retry_sleep(delay);
            else
                std::this_thread::sleep_for(delay);
        }
        if (n > 1 && transfer_abort_requested())
            return false; // told to stop during the backoff
        if (attempt(n))
            return true;
    }
    return false;
}

} // namespace pgphi
