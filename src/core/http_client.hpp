// HTTPS to key managers through libcurl. TLS 1.2 or newer only, peer and host
// verification always on; plain http is refused unless the caller allows it
// for loopback addresses (tests, and the EC2 metadata service's own scheme).
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <utility>
#include <vector>

typedef void CURL;

namespace pgphi {

struct TlsSettings {
    std::string ca_file;       // empty: the system's trust store
    std::string client_cert;   // PEM, for mutual TLS
    std::string client_key;    // PEM, for mutual TLS
};

struct HttpRequest {
    std::string method = "GET";
    std::string url;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string body;

    ~HttpRequest(); // wipes the body: it may carry a plaintext DEK
};

struct HttpResponse {
    long status = 0;
    std::string body;

    ~HttpResponse(); // wipes the body: it may carry a plaintext DEK
};

// Which plain-http peers are allowed besides https ones: loopback addresses
// (tests), and the EC2 instance metadata service, which speaks only http on a
// link-local address.
struct PlainHttp {
    bool loopback = false;
    bool metadata_service = false;
};

struct HttpTimeouts {
    std::chrono::milliseconds connect{2000};
    std::chrono::milliseconds total{5000};
};

class HttpClient {
public:
    // `service` names the peer in error messages ("Vault", "AWS KMS").
    HttpClient(std::string service, TlsSettings tls, HttpTimeouts timeouts, PlainHttp plain_http);
    ~HttpClient();
    HttpClient(const HttpClient&) = delete;
    HttpClient& operator=(const HttpClient&) = delete;

    // Sends one request. A transport failure (refused, reset, timeout, TLS)
    // throws KeyManagerUnavailable naming the service and curl's reason; any
    // HTTP status is returned for the caller to interpret.
    HttpResponse send(const HttpRequest& request);

    const std::string& service() const { return service_; }

private:
    void check_url(const std::string& url) const;

    std::string service_;
    TlsSettings tls_;
    HttpTimeouts timeouts_;
    PlainHttp plain_http_;
    CURL* curl_ = nullptr; // reused so connections are kept alive
};

// A process-wide check that libcurl polls during transfers: when it returns
// true the transfer is abandoned (KeyManagerUnavailable). The key broker sets
// one so that a shutdown does not wait for a slow key manager.
void set_transfer_abort_check(bool (*check)());
bool transfer_abort_requested();

// Bounded retries with full-jitter exponential backoff, for throttling and
// transient failures. Denials are never retried: the caller decides.
struct RetryPolicy {
    int max_attempts = 3;
    std::chrono::milliseconds base_delay{100};
    std::chrono::milliseconds max_delay{2000};

    std::chrono::milliseconds delay_before_attempt(int attempt) const; // attempt >= 2
};

// A process-wide sleep for the backoff between retries when the caller of
// with_retries passes none. The key broker sets one that waits on its latch
// (so a shutdown or the postmaster's death ends the wait); without one,
// std::this_thread::sleep_for.
void set_retry_sleep(void (*sleep)(std::chrono::milliseconds));

// Runs `attempt` until it returns true (done) or the policy's attempts are
// used up; `attempt` gets the attempt number and returns false to ask for a
// retry. Returns false when every attempt asked for a retry.
bool with_retries(const RetryPolicy& policy, const std::function<bool(int)>& attempt,
                  const std::function<void(std::chrono::milliseconds)>& sleep = {});

} // namespace pgphi
