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
    // The response headers pgphi acts on or reports, by lower-case name:
    // retry-after, location, x-amzn-requestid, x-amzn-errortype, x-vault-index.
    std::vector<std::pair<std::string, std::string>> headers;

    // The value of a kept header ("" when absent); `name` in lower case.
    std::string header(const std::string& name) const;
    // Retry-After in seconds (delay-seconds form only; -1 when absent or unusable).
    long retry_after_seconds() const;

    ~HttpResponse(); // wipes the body: it may carry a plaintext DEK
};

// Which plain-http peers are allowed besides https ones: loopback addresses
// (tests), and the EC2 instance metadata service, which speaks only http on a
// link-local address.
struct PlainHttp {
    bool loopback = false;
    bool metadata_service = false;
    // The container credentials endpoint: ECS's 169.254.170.2, EKS Pod
    // Identity's 169.254.170.23 / fd00:ec2::23, or a loopback agent, the
    // plain-http hosts the AWS SDKs accept for it.
    bool container_service = false;
};

// An explicit outbound proxy (pgphi never takes one from the environment):
// http://host:port or https://host:port; https requests go through it with
// CONNECT, so TLS to the key manager stays end to end.
struct ProxySettings {
    std::string url;        // empty: direct
    std::string ca_file;    // for an https:// proxy's own certificate; empty: system store
};

struct HttpTimeouts {
    std::chrono::milliseconds connect{2000};
    std::chrono::milliseconds total{5000};
};

class HttpClient {
public:
    // `service` names the peer in error messages ("Vault", "AWS KMS").
    HttpClient(std::string service, TlsSettings tls, HttpTimeouts timeouts, PlainHttp plain_http,
               ProxySettings proxy = {});
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
    ProxySettings proxy_;
    CURL* curl_ = nullptr; // reused so connections are kept alive
};

// A process-wide check that libcurl polls during transfers: when it returns
// true the transfer is abandoned (KeyManagerUnavailable). The key broker sets
// one so that a shutdown does not wait for a slow key manager.
void set_transfer_abort_check(bool (*check)());
bool transfer_abort_requested();

// Bounded retries with full-jitter exponential backoff, for throttling and
// transient failures. Denials are never retried: the caller decides.
// The defaults are the AWS SDKs' "standard" retry mode: up to 3 attempts,
// full jitter with a base of 1 s, capped at 20 s, so throttling is ridden out
// over seconds rather than retried into.
struct RetryPolicy {
    int max_attempts = 3;
    std::chrono::milliseconds base_delay{1000};
    std::chrono::milliseconds max_delay{20000};

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

// Asks the with_retries loop running on this thread to wait at least `delay`
// before the next attempt (a server's Retry-After), capped at the policy's
// max_delay. Called from inside an attempt.
void request_retry_delay(std::chrono::milliseconds delay);

// Splits a key-manager endpoint ("https://host:443/prefix/") into what a
// request and its signature need: the origin (scheme://host[:port]), the Host
// header value (the port omitted when it is the scheme's default, as libcurl
// sends it), and the path, "/" when none, duplicate slashes collapsed.
struct Endpoint {
    std::string origin;
    std::string host_header;
    std::string path;
};
Endpoint parse_endpoint(const std::string& url, const std::string& service);

} // namespace pgphi
