#include "http_client.hpp"

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

HttpClient::HttpClient(std::string service, TlsSettings tls, HttpTimeouts timeouts, PlainHttp plain_http)
    : service_(std::move(service)), tls_(std::move(tls)), timeouts_(timeouts), plain_http_(plain_http)
{
    global_init_once();
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
         (plain_http_.metadata_service && is_metadata_service_host(host.text))))
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
    curl_easy_setopt(curl_, CURLOPT_PROTOCOLS_STR,
                     plain_http_.loopback || plain_http_.metadata_service ? "http,https" : "https");
    curl_easy_setopt(curl_, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(curl_, CURLOPT_NOPROXY, "*"); // never through a proxy from the environment
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
    for (int n = 1; n <= std::max(1, policy.max_attempts); ++n) {
        if (n > 1 && transfer_abort_requested())
            return false;
        if (n > 1) {
            auto delay = policy.delay_before_attempt(n);
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
