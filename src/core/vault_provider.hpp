// The HashiCorp Vault Transit key provider: the KEK is a Transit key that
// never leaves Vault. The key broker draws each DEK and has Transit encrypt it
// with associated_data naming its pgphi key id and version, so a wrapped DEK
// moved to another key or version in the catalog does not decrypt. Transit's
// datakey and rewrap cannot carry associated data, so neither is used: a
// rewrap is a decrypt and an encrypt in the broker. The Transit key version
// that wrapped each DEK ("vault:vN:") is recorded as its KEK version.
//
// Authentication (auth_method): a token read from a file; AppRole (role id
// from a file, secret id from a file or unwrapped once from a response-wrapping
// token and then kept in memory only); Kubernetes or JWT/OIDC (a token file
// read afresh at each login, so a rotated service account token is used); or
// TLS certificate auth (the client certificate pgphi presents). A token from a
// login is renewed when a third of its lease is left, and pgphi logs in again
// when renewal fails or Vault refuses the token.
#pragma once

#include <ctime>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "http_client.hpp"
#include "key_provider.hpp"

namespace pgphi {

struct VaultSettings {
    std::string address;              // https://vault.example:8200
    std::string mount = "transit";
    std::string vault_namespace;      // X-Vault-Namespace, Vault Enterprise / HCP
    std::string token_file;
    std::string approle_role_id_file;
    std::string approle_secret_id_file;
    std::string approle_mount = "approle";
    std::string approle_wrapped_secret_id_file; // a wrapping token whose secret is the secret id
    std::string auth_method;    // "", token, approle, kubernetes, jwt, cert ("": token file, else AppRole)
    std::string auth_mount;     // kubernetes, jwt, cert: "" is the method's name
    std::string auth_role;      // kubernetes, jwt: the role; cert: the certificate role's name (optional)
    std::string jwt_file;       // kubernetes (default: the service account token), jwt
    TlsSettings tls;
    HttpTimeouts timeouts;
    RetryPolicy retry;
    bool allow_http_loopback = false;
    ProxySettings proxy;
    // Whether DEKs that pgphi 0.2.0 wrapped without a binding still unwrap.
    bool accept_unbound_deks = true;
};

class VaultKeyProvider final : public KeyProvider {
public:
    explicit VaultKeyProvider(VaultSettings settings);
    ~VaultKeyProvider() override;

    const char* name() const override { return "vault"; }

    WrappedDek wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding) override;
    SecureBytes unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    WrappedDek rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    KekDescription describe(const std::string& kek_ref) override;

    // Transit hmac/<key>/sha2-256 and verify/<key>/sha2-256; the MAC is
    // Vault's "vault:v<N>:<base64>".
    std::string audit_mac(const std::string& key_ref, ByteView message) override;
    bool verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac) override;

    // A new aes256-gcm96 Transit key of that name (refused when one exists);
    // deleting it first allows deletion in its config, as Transit requires.
    std::string create_dedicated_kek(const std::string& kek_name, const std::string& key_name) override;
    std::string delete_dedicated_kek(const std::string& kek_ref) override;
    // Seconds until the current token's lease ends (for status reporting);
    // negative when no token is held or it does not expire.
    long token_seconds_left(std::time_t now) const;

private:
    enum class Method { Get, Post, Delete };

    // One authenticated Transit call with retries; `path` follows /v1/.
    nlohmann::json call(Method method, const std::string& path, const nlohmann::json& body);
    // One HTTP exchange, unauthenticated unless `token` is given.
    // A 307 from a standby is followed once, to an https address (or the
    // configured address's own scheme), with the same TLS verification.
    long exchange(Method method, const std::string& path, const nlohmann::json* body, const std::string* token,
                  nlohmann::json& out, HttpResponse* raw = nullptr);
    // Whether Vault still accepts the current token (auth/token/lookup-self).
    bool token_still_valid();
    void ensure_token(std::time_t now);
    void login(std::time_t now);
    // The AppRole secret id: from its file, or unwrapped once from the
    // wrapping token file and kept (wiped on exit) for later logins.
    std::string approle_secret_id();
    long login_with(const std::string& mount, nlohmann::json& body, nlohmann::json& response);
    bool renew(std::time_t now);
    void forget_token();
    static void check_key_name(const std::string& kek_ref);
    // Whether the Transit key exists (keys/<name> answers, not 404).
    bool transit_key_exists(const std::string& kek_ref);

    VaultSettings settings_;
    HttpClient http_;
    std::string token_;
    std::time_t token_obtained_ = 0;
    long token_ttl_ = 0;          // seconds; 0: no expiry known
    bool token_renewable_ = false;
    SecureBytes unwrapped_secret_id_; // held in memory only: the wrapping token works once
};

} // namespace pgphi
