#include "kmip_client.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "error.hpp"
#include "kmip_ttlv.hpp"
#include "secret_file.hpp"

namespace pgphi::kmip {

namespace {

int64_t now_ms()
{
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

std::string openssl_reason()
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0)
        return "TLS failure";
    char text[256];
    ERR_error_string_n(e, text, sizeof(text));
    return text;
}

// Whether the last OpenSSL error is an alert in which the server refused
// pgphi's certificate.
bool refused_our_certificate()
{
    unsigned long e;
    bool refused = false;
    while ((e = ERR_get_error()) != 0) {
        if (ERR_GET_LIB(e) != ERR_LIB_SSL)
            continue;
        switch (ERR_GET_REASON(e)) {
        case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
        case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
        case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
        case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
        case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
        case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
        case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
        case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
            refused = true;
            break;
        default:
            break;
        }
    }
    return refused;
}

// Waits until `fd` is ready for `events`, in slices so that a shutdown of
// the key broker (transfer_abort_requested) ends the wait.
void wait_for(int fd, short events, int64_t deadline_ms, const std::string& service)
{
    for (;;) {
        if (transfer_abort_requested())
            throw Error(ErrorCode::KeyManagerUnavailable, service + " request abandoned: pgphi is shutting down");
        int64_t left = deadline_ms - now_ms();
        if (left <= 0)
            throw Error(ErrorCode::KeyManagerUnavailable, service + " is unavailable: timed out",
                        "pgphi.provider_connect_timeout and pgphi.provider_timeout bound each request.");
        pollfd p{fd, events, 0};
        int rc = poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 200)));
        if (rc > 0)
            return;
        if (rc < 0 && errno != EINTR)
            throw Error(ErrorCode::KeyManagerUnavailable, service + " is unavailable: " + std::strerror(errno));
    }
}

bool is_ip_address(const std::string& host)
{
    in6_addr a6{};
    in_addr a4{};
    return inet_pton(AF_INET, host.c_str(), &a4) == 1 || inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

const std::string kService = "the KMIP server";

// A write to a connection the server has closed raises SIGPIPE, whose
// default action ends the process. As libpq does: block it while pgphi
// talks to the server, and take back one that the writes raised.
class BlockSigpipe {
public:
    BlockSigpipe()
    {
        sigset_t pipe;
        sigemptyset(&pipe);
        sigaddset(&pipe, SIGPIPE);
        pthread_sigmask(SIG_BLOCK, &pipe, &previous_);
        sigset_t pending;
        was_pending_ = sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1;
    }
    ~BlockSigpipe()
    {
        sigset_t pending;
        if (!was_pending_ && sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1) {
            sigset_t pipe;
            sigemptyset(&pipe);
            sigaddset(&pipe, SIGPIPE);
            timespec none{0, 0};
            sigtimedwait(&pipe, nullptr, &none);
        }
        pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
    }
    BlockSigpipe(const BlockSigpipe&) = delete;
    BlockSigpipe& operator=(const BlockSigpipe&) = delete;

private:
    sigset_t previous_;
    bool was_pending_ = false;
};

} // namespace

Client::Client(ClientSettings settings) : settings_(std::move(settings))
{
    if (settings_.host.empty())
        throw Error(ErrorCode::ConfigError, "the KMIP provider has no server", {}, "Set pgphi.kmip_host.");
    if (settings_.port <= 0 || settings_.port > 65535)
        throw Error(ErrorCode::ConfigError, "pgphi.kmip_port is not a TCP port");
    if (settings_.tls.client_cert.empty() || settings_.tls.client_key.empty())
        throw Error(ErrorCode::ConfigError, "the KMIP provider has no client certificate", {},
                    "KMIP servers authenticate clients by mutual TLS: set pgphi.kmip_client_cert and "
                    "pgphi.kmip_client_key.");
}

Client::~Client()
{
    disconnect();
    SSL_CTX_free(ctx_);
}

void Client::disconnect()
{
    if (ssl_) {
        SSL_free(ssl_);
        ssl_ = nullptr;
    }
    if (fd_ >= 0) {
        close(fd_);
        fd_ = -1;
    }
}

void Client::load_context()
{
    if (ctx_)
        return;
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        throw Error(ErrorCode::Internal, "could not create a TLS context: " + openssl_reason());
    struct Guard {
        SSL_CTX*& ctx;
        ~Guard() { SSL_CTX_free(ctx); }
    } guard{ctx};
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    int loaded = settings_.tls.ca_file.empty() ? SSL_CTX_set_default_verify_paths(ctx)
                                               : SSL_CTX_load_verify_locations(ctx, settings_.tls.ca_file.c_str(), nullptr);
    if (loaded != 1)
        throw Error(ErrorCode::ConfigError,
                    "could not read the KMIP CA bundle \"" + settings_.tls.ca_file + "\": " + openssl_reason(), {},
                    "pgphi.kmip_ca names the PEM file of the CA that signs the KMIP server's certificate.");
    if (SSL_CTX_use_certificate_chain_file(ctx, settings_.tls.client_cert.c_str()) != 1)
        throw Error(ErrorCode::ConfigError,
                    "could not read the KMIP client certificate \"" + settings_.tls.client_cert + "\": " +
                        openssl_reason());
    // The key is a secret: owned by the server account and mode 0600, as
    // every secret file of pgphi; parsed from memory that is then wiped.
    SecureBytes pem = read_secret_file(settings_.tls.client_key, "KMIP client key file", 64 * 1024);
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    EVP_PKEY* key = bio ? PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr) : nullptr;
    BIO_free(bio);
    if (!key)
        throw Error(ErrorCode::SecretFileInvalid,
                    "KMIP client key file \"" + settings_.tls.client_key + "\" holds no PEM private key");
    int used = SSL_CTX_use_PrivateKey(ctx, key);
    EVP_PKEY_free(key);
    if (used != 1 || SSL_CTX_check_private_key(ctx) != 1)
        throw Error(ErrorCode::ConfigError, "the KMIP client key does not match the client certificate", {},
                    "Check pgphi.kmip_client_cert and pgphi.kmip_client_key.");
    ERR_clear_error();
    ctx_ = ctx;
    ctx = nullptr;
}

void Client::connect()
{
    load_context();
    disconnect();
    int64_t deadline = now_ms() + settings_.timeouts.connect.count();

    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    std::string port = std::to_string(settings_.port);
    int rc = getaddrinfo(settings_.host.c_str(), port.c_str(), &hints, &found);
    if (rc != 0)
        throw Error(ErrorCode::KeyManagerUnavailable,
                    kService + " is unavailable: could not resolve \"" + settings_.host + "\": " + gai_strerror(rc));
    std::string last = "no address";
    for (addrinfo* a = found; a && fd_ < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) {
            last = std::strerror(errno);
            continue;
        }
        if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
            last = std::strerror(errno);
            close(fd);
            continue;
        }
        try {
            wait_for(fd, POLLOUT, deadline, kService);
        } catch (...) {
            close(fd);
            freeaddrinfo(found);
            throw;
        }
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            last = std::strerror(err);
            close(fd);
            continue;
        }
        fd_ = fd;
    }
    freeaddrinfo(found);
    if (fd_ < 0)
        throw Error(ErrorCode::KeyManagerUnavailable, kService + " is unavailable: " + last,
                    "pgphi could not connect to " + settings_.host + ":" + port + ".");
    int one = 1;
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    ssl_ = SSL_new(ctx_);
    if (!ssl_ || SSL_set_fd(ssl_, fd_) != 1)
        throw Error(ErrorCode::Internal, "could not set up TLS: " + openssl_reason());
    if (is_ip_address(settings_.host)) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), settings_.host.c_str());
    } else {
        SSL_set_tlsext_host_name(ssl_, settings_.host.c_str());
        SSL_set1_host(ssl_, settings_.host.c_str());
    }
    for (;;) {
        int r = SSL_connect(ssl_);
        if (r == 1)
            break;
        int e = SSL_get_error(ssl_, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            wait_for(fd_, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline, kService);
            continue;
        }
        long verify = SSL_get_verify_result(ssl_);
        if (verify != X509_V_OK) {
            std::string reason = X509_verify_cert_error_string(verify);
            ERR_clear_error();
            disconnect();
            throw Error(ErrorCode::KeyManagerUnavailable,
                        kService + " is unavailable: its certificate is not trusted: " + reason,
                        {}, "pgphi.kmip_ca must name the CA that signs the KMIP server's certificate, and "
                            "pgphi.kmip_host a name or address the certificate is for.");
        }
        fail_io("TLS handshake", e);
    }
    ++connections_;
}

void Client::fail_io(const char* doing, int ssl_error)
{
    std::string reason = ssl_error == SSL_ERROR_ZERO_RETURN ? "connection closed by the server"
                         : ssl_error == SSL_ERROR_SYSCALL && ERR_peek_last_error() == 0
                             ? (errno != 0 ? std::strerror(errno) : "connection closed by the server")
                             : openssl_reason();
    bool refused = refused_our_certificate();
    disconnect();
    if (refused)
        throw Error(ErrorCode::KeyManagerDenied,
                    "permission denied by the KMIP server: it refused pgphi's client certificate (" + reason + ")",
                    {}, "pgphi.kmip_client_cert must be signed by a CA the KMIP server trusts for clients.");
    throw Error(ErrorCode::KeyManagerUnavailable, kService + " is unavailable: " + doing + " failed: " + reason);
}

void Client::write_all(const uint8_t* data, size_t size, int64_t deadline_ms)
{
    size_t done = 0;
    while (done < size) {
        errno = 0;
        int r = SSL_write(ssl_, data + done, static_cast<int>(size - done));
        if (r > 0) {
            done += static_cast<size_t>(r);
            continue;
        }
        int e = SSL_get_error(ssl_, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            wait_for(fd_, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_ms, kService);
            continue;
        }
        fail_io("sending", e);
    }
}

void Client::read_all(uint8_t* data, size_t size, int64_t deadline_ms)
{
    size_t done = 0;
    while (done < size) {
        errno = 0;
        int r = SSL_read(ssl_, data + done, static_cast<int>(size - done));
        if (r > 0) {
            done += static_cast<size_t>(r);
            continue;
        }
        int e = SSL_get_error(ssl_, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            wait_for(fd_, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline_ms, kService);
            continue;
        }
        fail_io("receiving", e);
    }
}

std::vector<uint8_t> Client::exchange(const std::vector<uint8_t>& request)
{
    BlockSigpipe no_sigpipe;
    // A kept connection the server has closed meanwhile fails at once: open
    // a new one and send again, once.
    for (int attempt = 0;; ++attempt) {
        bool reused = ssl_ != nullptr;
        if (!ssl_)
            connect();
        int64_t deadline = now_ms() + settings_.timeouts.total.count();
        try {
            write_all(request.data(), request.size(), deadline);
            uint8_t header[8];
            read_all(header, sizeof(header), deadline);
            size_t total = message_size(header);
            std::vector<uint8_t> answer(total);
            std::memcpy(answer.data(), header, sizeof(header));
            read_all(answer.data() + sizeof(header), total - sizeof(header), deadline);
            return answer;
        } catch (const Error& e) {
            disconnect();
            if (e.code() == ErrorCode::KeyManagerUnavailable && reused && attempt == 0 &&
                std::strstr(e.what(), "timed out") == nullptr && !transfer_abort_requested())
                continue;
            throw;
        }
    }
}

} // namespace pgphi::kmip
