// A KMIP client connection: TTLV messages over TLS (OpenSSL), with mutual
// TLS as KMIP servers require (KMIP 1.4 profiles: TLS 1.2 or newer, client
// certificate). The client key is read as a secret file (owned by the server
// account, mode 0600) and handed to OpenSSL from memory; the certificate and
// CA bundle are public. The connection is kept open across requests and
// opened again when the server closed it.
//
// Failures: refused, reset, timed out, or the server's certificate not
// trusted: KeyManagerUnavailable (08006), as for the other key managers. A
// TLS alert in which the server refuses pgphi's own certificate (bad or
// unknown certificate, unknown CA, certificate required, access denied):
// KeyManagerDenied (42501).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bytes.hpp"
#include "http_client.hpp"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace pgphi::kmip {

struct ClientSettings {
    std::string host;                 // name or address; verified against the certificate
    int port = 5696;
    TlsSettings tls;                  // CA bundle, client certificate and key (all required)
    HttpTimeouts timeouts;            // connect (TCP + TLS handshake) and per request
};

class Client {
public:
    explicit Client(ClientSettings settings);
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    // Sends one request message and returns the response message's bytes.
    // The caller wipes the answer (it may hold a DEK): it is returned in a
    // buffer allocated once at its final size.
    std::vector<uint8_t> exchange(const std::vector<uint8_t>& request);

    void disconnect();
    // How many TCP+TLS connections were opened (tests and statistics).
    uint64_t connections_opened() const { return connections_; }

private:
    void connect();
    void load_context();
    void write_all(const uint8_t* data, size_t size, int64_t deadline_ms);
    void read_all(uint8_t* data, size_t size, int64_t deadline_ms);
    [[noreturn]] void fail_io(const char* doing, int ssl_error);

    ClientSettings settings_;
    SSL_CTX* ctx_ = nullptr;
    SSL* ssl_ = nullptr;
    int fd_ = -1;
    uint64_t connections_ = 0;
};

} // namespace pgphi::kmip
