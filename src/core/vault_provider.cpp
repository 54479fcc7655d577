#include "vault_provider.hpp"

#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include <string_view>

#include "encoding.hpp"
#include "error.hpp"
#include "secret_file.hpp"
#include "vault_response.hpp"

namespace pgphi {

using nlohmann::json;

namespace {

void wipe(std::string& s) { OPENSSL_cleanse(s.data(), s.size()); }

// A wrapped DEK pgphi bound to its key: the Transit ciphertext after this
// marker was encrypted with associated_data naming the pgphi key id and
// version, so Vault refuses it under any other key or version. Without the
// marker it is a DEK from datakey/wrapped (pgphi 0.2.0), bound to nothing.
constexpr std::string_view kBoundMarker = "pgphi-ad1:";

struct StoredDek {
    std::string ciphertext; // vault:vN:...
    bool bound = false;
};

StoredDek stored_dek(ByteView wrapped)
{
    StoredDek stored;
    stored.ciphertext.assign(reinterpret_cast<const char*>(wrapped.data), wrapped.size);
    if (stored.ciphertext.rfind(kBoundMarker, 0) == 0) {
        stored.ciphertext.erase(0, kBoundMarker.size());
        stored.bound = true;
    }
    if (stored.ciphertext.rfind("vault:v", 0) != 0)
        throw Error(ErrorCode::WrappedDekInvalid, "wrapped DEK is not a Vault Transit ciphertext",
                    "The key catalog entry may have been created by another provider or damaged.");
    return stored;
}

// What Transit authenticates with a bound DEK: the same facts the local
// provider and KMS bind (key id and version; the name may change).
std::string associated_data(const DekBinding& binding)
{
    std::string text = "pgphi DEK key_id=" + std::to_string(binding.key_id) +
                       " version=" + std::to_string(binding.version);
    return base64_encode(ByteView(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

} // namespace

VaultKeyProvider::VaultKeyProvider(VaultSettings settings)
    : settings_(std::move(settings)),
      http_("Vault", settings_.tls, settings_.timeouts, PlainHttp{settings_.allow_http_loopback, false},
            settings_.proxy)
{
    if (settings_.address.empty())
        throw Error(ErrorCode::ConfigError, "the Vault provider has no address", {}, "Set pgphi.vault_addr.");
    while (!settings_.address.empty() && settings_.address.back() == '/')
        settings_.address.pop_back();
    std::string& method = settings_.auth_method;
    bool approle_ready = !settings_.approle_role_id_file.empty() &&
                         (!settings_.approle_secret_id_file.empty() || !settings_.approle_wrapped_secret_id_file.empty());
    if (method.empty())
        method = !settings_.token_file.empty() ? "token" : approle_ready ? "approle" : "";
    if (method.empty() || (method == "token" && settings_.token_file.empty()) || (method == "approle" && !approle_ready))
        throw Error(ErrorCode::ConfigError, "the Vault provider has no credentials",
                    {}, "Set pgphi.vault_token_file, or pgphi.vault_approle_role_id_file and "
                        "pgphi.vault_approle_secret_id_file (or ..._wrapped_secret_id_file), or "
                        "pgphi.vault_auth_method.");
    if (method == "kubernetes" || method == "jwt") {
        if (settings_.auth_role.empty())
            throw Error(ErrorCode::ConfigError, "Vault " + method + " auth needs a role", {},
                        "Set pgphi.vault_auth_role.");
        if (settings_.jwt_file.empty() && method == "kubernetes")
            settings_.jwt_file = "/var/run/secrets/kubernetes.io/serviceaccount/token";
        if (settings_.jwt_file.empty())
            throw Error(ErrorCode::ConfigError, "Vault JWT auth needs a token file", {}, "Set pgphi.vault_jwt_file.");
    } else if (method == "cert") {
        if (settings_.tls.client_cert.empty() || settings_.tls.client_key.empty())
            throw Error(ErrorCode::ConfigError, "Vault TLS certificate auth needs a client certificate", {},
                        "Set pgphi.vault_client_cert and pgphi.vault_client_key.");
    } else if (method != "token" && method != "approle") {
        throw Error(ErrorCode::ConfigError, "pgphi.vault_auth_method must be token, approle, kubernetes, jwt or cert");
    }
    if (settings_.auth_mount.empty())
        settings_.auth_mount = method;
    if (settings_.auth_mount.find_first_of("?#% ") != std::string::npos)
        throw Error(ErrorCode::ConfigError, "pgphi.vault_auth_mount is not a mount path");
}

VaultKeyProvider::~VaultKeyProvider() { forget_token(); }

std::string VaultKeyProvider::approle_secret_id()
{
    if (!settings_.approle_secret_id_file.empty())
        return read_secret_text(settings_.approle_secret_id_file, "Vault AppRole secret id file");
    if (unwrapped_secret_id_.empty()) {
        // A wrapping token works once: unwrap it now, keep the secret id in
        // memory only, and never read the file again while it lasts.
        std::string wrapping_token =
            read_secret_text(settings_.approle_wrapped_secret_id_file, "Vault wrapped secret id file");
        WipeOnExit wipe_wrapping_token(wrapping_token);
        json response;
        json body = json::object();
        long status = exchange(Method::Post, "sys/wrapping/unwrap", &body, &wrapping_token, response);
        if (status != 200) {
            std::string reason = vault::first_error(response);
            std::string text = "Vault refused to unwrap the AppRole secret id (HTTP " + std::to_string(status) + ")" +
                               (reason.empty() ? "" : ": " + reason);
            if (status == 429 || status >= 500)
                throw Error(ErrorCode::KeyManagerUnavailable, text);
            throw Error(ErrorCode::KeyManagerDenied, "permission denied: " + text,
                        "A wrapping token can be unwrapped once, before its TTL ends: put a new one in "
                        "pgphi.vault_approle_wrapped_secret_id_file.");
        }
        vault::unwrapped_secret_id(response, unwrapped_secret_id_);
    }
    return std::string(reinterpret_cast<const char*>(unwrapped_secret_id_.data()), unwrapped_secret_id_.size());
}

long VaultKeyProvider::login_with(const std::string& mount, json& body, json& response)
{
    return exchange(Method::Post, "auth/" + mount + "/login", &body, nullptr, response);
}

void VaultKeyProvider::check_key_name(const std::string& kek_ref)
{
    if (kek_ref.empty() || kek_ref.find_first_of("/?#% ") != std::string::npos)
        throw Error(ErrorCode::InvalidArgument, "the KEK reference is not a Vault Transit key name",
                    {}, "Pass the Transit key's name as kek, for example kek => 'pgphi-kek'.");
}

void VaultKeyProvider::forget_token()
{
    wipe(token_);
    token_.clear();
    token_ttl_ = 0;
    token_obtained_ = 0;
}

long VaultKeyProvider::token_seconds_left(std::time_t now) const
{
    if (token_.empty() || token_ttl_ <= 0)
        return -1;
    return token_ttl_ - static_cast<long>(now - token_obtained_);
}

long VaultKeyProvider::exchange(Method method, const std::string& path, const json* body, const std::string* token,
                                json& out, HttpResponse* raw)
{
    HttpRequest request;
    request.method = method == Method::Get ? "GET" : method == Method::Delete ? "DELETE" : "POST";
    request.url = settings_.address + "/v1/" + path;
    // Vault Agent and Proxy listeners with require_request_header refuse
    // requests without it (an SSRF guard); Vault itself ignores it.
    request.headers.emplace_back("X-Vault-Request", "true");
    if (token)
        request.headers.emplace_back("X-Vault-Token", *token);
    if (!settings_.vault_namespace.empty())
        request.headers.emplace_back("X-Vault-Namespace", settings_.vault_namespace);
    if (body) {
        request.headers.emplace_back("Content-Type", "application/json");
        request.body = body->dump();
    }
    HttpResponse response = http_.send(request);
    if (response.status == 307 || response.status == 308) {
        // An HA standby sends clients to the active node. Followed once: a
        // second redirect means the cluster has no reachable active node.
        std::string location = response.header("location");
        std::string scheme = settings_.address.substr(0, settings_.address.find("://") + 3);
        if (location.rfind("https://", 0) != 0 && location.rfind(scheme, 0) != 0)
            throw Error(ErrorCode::KeyManagerUnavailable,
                        "Vault redirected to an address that is not https (HTTP " + std::to_string(response.status) + ")",
                        "A standby sent pgphi to its active node's api_addr; pgphi follows only https addresses.");
        request.url = location;
        response = http_.send(request);
        if (response.status >= 300 && response.status < 400)
            throw Error(ErrorCode::KeyManagerUnavailable,
                        "Vault redirected again after following a redirect to the active node (HTTP " +
                            std::to_string(response.status) + ")",
                        "The Vault cluster has no active node that answers; check its HA status.");
    }
    out = vault::parse_body(response.body);
    long status = response.status;
    if (raw)
        *raw = std::move(response);
    return status;
}

bool VaultKeyProvider::token_still_valid()
{
    json response;
    try {
        return exchange(Method::Get, "auth/token/lookup-self", nullptr, &token_, response) == 200;
    } catch (const Error&) {
        return false;
    }
}

void VaultKeyProvider::login(std::time_t now)
{
    forget_token();
    if (settings_.auth_method == "token") {
        token_ = read_secret_text(settings_.token_file, "Vault token file");
        token_obtained_ = now;
        // Its lease, so that a renewable token is renewed before it expires
        // (and the file read again when it cannot be: Vault Agent replaces it).
        json response;
        vault::TokenLease lease;
        if (exchange(Method::Get, "auth/token/lookup-self", nullptr, &token_, response) == 200 &&
            vault::looked_up_lease(response, lease)) {
            token_ttl_ = lease.ttl_seconds;
            token_renewable_ = lease.renewable;
        }
        return;
    }
    const std::string& method = settings_.auth_method;
    json credentials;
    const char* secret_field = nullptr; // wiped after the login
    std::string mount = settings_.auth_mount;
    const char* label = "AppRole";
    if (method == "approle") {
        std::string secret_id = approle_secret_id();
        WipeOnExit wipe_secret_id(secret_id);
        credentials = {{"role_id", read_secret_text(settings_.approle_role_id_file, "Vault AppRole role id file")},
                       {"secret_id", secret_id}};
        secret_field = "secret_id";
        mount = settings_.approle_mount;
    } else if (method == "kubernetes" || method == "jwt") {
        // Read at each login: the kubelet rotates projected tokens.
        std::string jwt = read_identity_token_file(settings_.jwt_file, method == "kubernetes"
                                                                           ? "Kubernetes service account token file"
                                                                           : "Vault JWT file");
        WipeOnExit wipe_jwt(jwt);
        credentials = {{"role", settings_.auth_role}, {"jwt", jwt}};
        secret_field = "jwt";
        label = method == "kubernetes" ? "Kubernetes" : "JWT";
    } else { // cert: the client certificate of the TLS connection is the credential
        credentials = json::object();
        if (!settings_.auth_role.empty())
            credentials["name"] = settings_.auth_role;
        label = "TLS certificate";
    }
    json response;
    long status = 0;
    try {
        status = login_with(mount, credentials, response);
    } catch (...) {
        if (secret_field)
            wipe(credentials[secret_field].get_ref<std::string&>());
        throw;
    }
    if (secret_field)
        wipe(credentials[secret_field].get_ref<std::string&>());
    if (status != 200 || !response.contains("auth") || !response["auth"].is_object()) {
        std::string reason = vault::first_error(response);
        std::string text = std::string("Vault ") + label + " login failed (HTTP " + std::to_string(status) + ")" +
                           (reason.empty() ? "" : ": " + reason);
        // An unwrapped secret id Vault no longer takes (used up, expired) is
        // dropped: the next login needs a new wrapping token in the file.
        if (method == "approle" && !settings_.approle_wrapped_secret_id_file.empty() && status == 400)
            unwrapped_secret_id_.clear();
        // A sealed, overloaded or failing Vault is unavailable, not a denial.
        throw Error(status == 429 || status >= 500 ? ErrorCode::KeyManagerUnavailable : ErrorCode::KeyManagerDenied,
                    text);
    }
    vault::TokenLease lease = vault::login_lease(response, token_);
    token_ttl_ = lease.ttl_seconds;
    token_renewable_ = lease.renewable;
    token_obtained_ = now;
}

bool VaultKeyProvider::renew(std::time_t now)
{
    json response;
    json body = json::object();
    long status = exchange(Method::Post, "auth/token/renew-self", &body, &token_, response);
    vault::TokenLease lease{token_ttl_, token_renewable_};
    if (status != 200 || !vault::renewed_lease(response, lease))
        return false;
    token_ttl_ = lease.ttl_seconds;
    token_renewable_ = lease.renewable;
    token_obtained_ = now;
    return true;
}

void VaultKeyProvider::ensure_token(std::time_t now)
{
    if (token_.empty()) {
        login(now);
        return;
    }
    // Renew a token once two thirds of its lease have passed; log in again
    // (for a token file: read it again) when it cannot be renewed (not
    // renewable, or past its max TTL).
    if (token_ttl_ > 0 && now - token_obtained_ >= token_ttl_ * 2 / 3) {
        if (!token_renewable_ || !renew(now) || token_ttl_ <= 0)
            login(now);
    }
}

json VaultKeyProvider::call(Method method, const std::string& path, const json& body)
{
    json result;
    Error last_error(ErrorCode::KeyManagerUnavailable, "Vault did not answer");
    bool logged_in_again = false;

    bool done = with_retries(settings_.retry, [&](int) {
        long status = 0;
        HttpResponse raw;
        try {
            ensure_token(std::time(nullptr));
            status = exchange(method, path, method == Method::Post ? &body : nullptr, &token_, result, &raw);
        } catch (const Error& e) {
            if (e.code() != ErrorCode::KeyManagerUnavailable)
                throw;
            last_error = e;
            return false;
        }
        if (status >= 200 && status < 300)
            return true;

        std::string reason = vault::first_error(result);
        std::string warnings = vault::warnings(result);
        std::string text = "Vault " + path + " returned HTTP " + std::to_string(status) +
                           (reason.empty() ? "" : ": " + reason) +
                           (warnings.empty() ? "" : " (warnings: " + warnings + ")");
        if (status == 403) {
            // An expired or revoked token is replaced once. A token Vault
            // still accepts was refused by policy: logging in again would
            // only spend a use of the AppRole secret id.
            if (!logged_in_again && !token_still_valid()) {
                logged_in_again = true;
                forget_token();
                last_error = Error(ErrorCode::KeyManagerDenied, "permission denied by " + text);
                return false;
            }
            throw Error(ErrorCode::KeyManagerDenied, "permission denied by " + text,
                        "Check the token's or AppRole's policy for this Transit key.");
        }
        long retry_after = raw.retry_after_seconds();
        if (status == 429 || status == 412 || status == 500 || status == 502 || status == 504) {
            // 429: a rate-limit quota; 412: a performance standby without the
            // state of an earlier write yet. Both pass: retried, after
            // Retry-After when Vault gives one.
            if (retry_after >= 0)
                request_retry_delay(std::chrono::seconds(retry_after));
            last_error = Error(ErrorCode::KeyManagerUnavailable, text, "Vault kept failing after retries.");
            return false;
        }
        if (status == 503) {
            // Sealed, or a standby that cannot serve: unavailable, and said so.
            last_error = Error(ErrorCode::KeyManagerUnavailable, text,
                               reason.find("sealed") != std::string::npos
                                   ? "Vault is sealed: it must be unsealed before pgphi can use its keys."
                                   : "Vault is not serving requests (sealed, standby or in maintenance).");
            return false;
        }
        if (status == 423)
            throw Error(ErrorCode::KeyManagerUnavailable, text,
                        "The Vault namespace is locked by an administrator (sys/namespaces/api-lock); "
                        "pgphi cannot use its keys until it is unlocked.");
        if (status > 500)
            throw Error(ErrorCode::KeyManagerUnavailable, text);
        if (reason.find("not found") != std::string::npos || status == 404)
            throw Error(ErrorCode::KeyNotFound, text);
        if (status == 400 && (path.find("/decrypt/") != std::string::npos || path.find("/rewrap/") != std::string::npos))
            throw Error(ErrorCode::WrappedDekInvalid, "Vault could not unwrap the DEK: " + text,
                        "The wrapped DEK was altered, or its Transit key version is below "
                        "min_decryption_version.");
        throw Error(ErrorCode::ProviderError, text);
    });
    if (!done)
        throw last_error;
    return result;
}

WrappedDek VaultKeyProvider::wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding)
{
    check_key_name(kek_ref);
    json request = {{"plaintext", base64_encode(ByteView(dek.data(), dek.size()))},
                    {"associated_data", associated_data(binding)}};
    WipeOnExit wipe_plaintext(request["plaintext"].get_ref<std::string&>());
    json response = call(Method::Post, settings_.mount + "/encrypt/" + kek_ref, request);
    WrappedDek wrapped = vault::wrapped_dek(response);
    wrapped.blob.insert(wrapped.blob.begin(), kBoundMarker.begin(), kBoundMarker.end());
    return wrapped;
}

SecureBytes VaultKeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    check_key_name(kek_ref);
    StoredDek stored = stored_dek(wrapped);
    json request = {{"ciphertext", stored.ciphertext}};
    if (stored.bound)
        request["associated_data"] = associated_data(binding);
    else if (!settings_.accept_unbound_deks)
        throw Error(ErrorCode::WrappedDekInvalid,
                    "wrapped DEK is not bound to its pgphi key, and pgphi.vault_accept_unbound_deks is off",
                    "DEKs that pgphi 0.2.0 created with Transit's datakey are bound to no key. Turn the "
                    "setting on, run pgphi.rewrap_keys() to bind every one, then turn it off again.");
    json response = call(Method::Post, settings_.mount + "/decrypt/" + kek_ref, request);
    return vault::unwrapped_dek(response);
}

// Transit's rewrap takes no associated_data (hashicorp/vault#31791): the key
// broker unwraps and wraps again, and the DEK is in its memory only for that.
// This also binds a DEK from before binding existed.
WrappedDek VaultKeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    SecureBytes dek = unwrap(kek_ref, wrapped, binding);
    return wrap(kek_ref, dek, binding);
}

bool VaultKeyProvider::transit_key_exists(const std::string& kek_ref)
{
    try {
        call(Method::Get, settings_.mount + "/keys/" + kek_ref, json::object());
        return true;
    } catch (const Error& e) {
        if (e.code() != ErrorCode::KeyNotFound)
            throw;
        // A missing mount or namespace also answers 404 ("no handler for
        // route"): that says nothing of the key, and must not pass for a key
        // already deleted.
        if (std::string(e.what()).find("no handler") != std::string::npos)
            throw Error(ErrorCode::ConfigError, "Vault has no Transit mount at pgphi.vault_mount", e.what(),
                        "Check pgphi.vault_mount and pgphi.vault_namespace.");
        return false;
    }
}

std::string VaultKeyProvider::create_dedicated_kek(const std::string& kek_name, const std::string&)
{
    check_key_name(kek_name);
    if (transit_key_exists(kek_name))
        throw Error(ErrorCode::InvalidArgument, "a Transit key of that name already exists",
                    "A dedicated KEK is made for one pgphi key; an existing Transit key may wrap other data.",
                    "Omit kek, and pgphi names a new Transit key pgphi-dedicated-<key>-<random>.");
    call(Method::Post, settings_.mount + "/keys/" + kek_name, {{"type", "aes256-gcm96"}});
    return kek_name;
}

std::string VaultKeyProvider::delete_dedicated_kek(const std::string& kek_ref)
{
    check_key_name(kek_ref);
    if (!transit_key_exists(kek_ref))
        return "the Vault Transit key was already deleted";
    call(Method::Post, settings_.mount + "/keys/" + kek_ref + "/config", {{"deletion_allowed", true}});
    try {
        call(Method::Delete, settings_.mount + "/keys/" + kek_ref, json::object());
    } catch (...) {
        // The destruction rolls back: leave the key as undeletable as it was.
        try {
            call(Method::Post, settings_.mount + "/keys/" + kek_ref + "/config", {{"deletion_allowed", false}});
        } catch (...) {
        }
        throw;
    }
    return "the Vault Transit key was deleted";
}

KekDescription VaultKeyProvider::describe(const std::string& kek_ref)
{
    check_key_name(kek_ref);
    json response = call(Method::Get, settings_.mount + "/keys/" + kek_ref, json::object());
    return KekDescription{name(), kek_ref, vault::latest_version(response)};
}

std::string VaultKeyProvider::audit_mac(const std::string& key_ref, ByteView message)
{
    check_key_name(key_ref);
    json response = call(Method::Post, settings_.mount + "/hmac/" + key_ref + "/sha2-256",
                         {{"input", base64_encode(message)}});
    const json* data = response.is_object() && response.contains("data") ? &response["data"] : nullptr;
    if (!data || !data->is_object() || !data->contains("hmac") || !(*data)["hmac"].is_string() ||
        (*data)["hmac"].get_ref<const std::string&>().rfind("vault:v", 0) != 0)
        throw Error(ErrorCode::ProviderError, "Vault hmac response has no HMAC");
    return (*data)["hmac"].get<std::string>();
}

bool VaultKeyProvider::verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac)
{
    check_key_name(key_ref);
    if (mac.rfind("vault:v", 0) != 0)
        return false; // not a Transit HMAC at all
    json response;
    try {
        response = call(Method::Post, settings_.mount + "/verify/" + key_ref + "/sha2-256",
                        {{"input", base64_encode(message)}, {"hmac", mac}});
    } catch (const Error& e) {
        // Vault answers 400 to an HMAC it cannot parse: that is no valid HMAC.
        if (e.code() == ErrorCode::ProviderError)
            return false;
        throw;
    }
    const json* data = response.is_object() && response.contains("data") ? &response["data"] : nullptr;
    if (!data || !data->is_object() || !data->contains("valid") || !(*data)["valid"].is_boolean())
        throw Error(ErrorCode::ProviderError, "Vault verify response has no validity");
    return (*data)["valid"].get<bool>();
}

} // namespace pgphi
