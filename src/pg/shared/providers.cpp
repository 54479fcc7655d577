#include "shared/postgres.hpp"

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include "core/error.hpp"
#include "core/kmip_provider.hpp"
#include "core/kms_provider.hpp"
#include "core/local_provider.hpp"
#include "core/pkcs11_provider.hpp"
#include "core/vault_provider.hpp"
#include "shared/providers.hpp"
#include "shared/settings.hpp"

namespace pgphi::pg {

namespace {

std::string str(const char* setting) { return setting ? setting : ""; }

HttpTimeouts timeouts()
{
    return HttpTimeouts{std::chrono::milliseconds(provider_connect_timeout_ms),
                        std::chrono::milliseconds(provider_timeout_ms)};
}

RetryPolicy retry_policy()
{
    RetryPolicy policy; // the SDKs' standard mode: 1 s base, 20 s cap
    policy.max_attempts = 1 + provider_max_retries;
    return policy;
}

// Every setting a provider is built from; a change means rebuilding.
std::string configuration_fingerprint()
{
    std::string all;
    for (const char* s : {local_kek_file, vault_addr, vault_mount, vault_namespace, vault_token_file,
                          vault_approle_role_id_file, vault_approle_secret_id_file, vault_approle_mount,
                          vault_ca_file, vault_client_cert, vault_client_key, aws_region, aws_kms_endpoint,
                          aws_credentials_file, aws_profile, aws_imds_endpoint, aws_ca_file, aws_client_cert,
                          aws_client_key, kmip_host, kmip_client_cert, kmip_client_key, kmip_ca, pkcs11_module,
                          pkcs11_token_label, pkcs11_pin_file, pkcs11_mechanism, provider_proxy,
                          provider_proxy_ca_file, aws_config_file, aws_sts_endpoint, aws_role_arn,
                          aws_role_session_name, aws_web_identity_token_file, aws_container_credentials_uri,
                          aws_container_authorization_token_file, vault_auth_method, vault_auth_mount,
                          vault_auth_role, vault_jwt_file, vault_approle_wrapped_secret_id_file})
        all += str(s) + '\n';
    all += std::to_string(kmip_port) + ',' + std::to_string(pkcs11_slot) + ',';
    all += std::to_string(aws_use_fips_endpoint) + std::to_string(aws_use_dualstack_endpoint);
    all += std::to_string(vault_accept_unbound_deks) + ',' + std::to_string(aws_kms_deletion_window_days);
    all += std::to_string(aws_use_environment) + std::to_string(provider_connect_timeout_ms) + ',' +
           std::to_string(provider_timeout_ms) + ',' + std::to_string(provider_max_retries) + ',' +
           std::to_string(allow_insecure_http_loopback) + ',' + std::to_string(pkcs11_slot);
    return all;
}

std::unique_ptr<KeyProvider> build(std::string_view name)
{
    if (name == "local")
        return std::make_unique<LocalKeyProvider>(str(local_kek_file));
    if (name == "vault") {
        VaultSettings settings;
        settings.address = str(vault_addr);
        settings.mount = str(vault_mount);
        settings.vault_namespace = str(vault_namespace);
        settings.token_file = str(vault_token_file);
        settings.approle_role_id_file = str(vault_approle_role_id_file);
        settings.approle_secret_id_file = str(vault_approle_secret_id_file);
        settings.approle_mount = str(vault_approle_mount);
        settings.approle_wrapped_secret_id_file = str(vault_approle_wrapped_secret_id_file);
        settings.auth_method = str(vault_auth_method);
        settings.auth_mount = str(vault_auth_mount);
        settings.auth_role = str(vault_auth_role);
        settings.jwt_file = str(vault_jwt_file);
        settings.tls = TlsSettings{str(vault_ca_file), str(vault_client_cert), str(vault_client_key)};
        settings.timeouts = timeouts();
        settings.retry = retry_policy();
        settings.allow_http_loopback = allow_insecure_http_loopback;
        settings.proxy = ProxySettings{str(provider_proxy), str(provider_proxy_ca_file)};
        settings.accept_unbound_deks = vault_accept_unbound_deks;
        return std::make_unique<VaultKeyProvider>(std::move(settings));
    }
    if (name == "aws_kms") {
        KmsSettings settings;
        settings.region = str(aws_region);
        settings.endpoint = str(aws_kms_endpoint);
        settings.use_fips = aws_use_fips_endpoint;
        settings.use_dualstack = aws_use_dualstack_endpoint;
        settings.proxy = ProxySettings{str(provider_proxy), str(provider_proxy_ca_file)};
        settings.tls = TlsSettings{str(aws_ca_file), str(aws_client_cert), str(aws_client_key)};
        settings.timeouts = timeouts();
        settings.retry = retry_policy();
        settings.allow_http_loopback = allow_insecure_http_loopback;
        settings.credentials.use_environment = aws_use_environment;
        settings.credentials.credentials_file = str(aws_credentials_file);
        settings.credentials.profile = str(aws_profile);
        settings.credentials.imds_endpoint = str(aws_imds_endpoint);
        settings.credentials.allow_http_loopback = allow_insecure_http_loopback;
        settings.credentials.config_file = str(aws_config_file);
        settings.credentials.region = settings.region;
        settings.credentials.sts_endpoint = str(aws_sts_endpoint);
        if (settings.credentials.sts_endpoint.empty() && !settings.region.empty())
            settings.credentials.sts_endpoint =
                aws_default_endpoint("sts", settings.region, aws_use_fips_endpoint, aws_use_dualstack_endpoint);
        settings.credentials.role_arn = str(aws_role_arn);
        settings.credentials.role_session_name = str(aws_role_session_name);
        settings.credentials.web_identity_token_file = str(aws_web_identity_token_file);
        settings.credentials.container_credentials_uri = str(aws_container_credentials_uri);
        settings.credentials.container_authorization_token_file = str(aws_container_authorization_token_file);
        settings.credentials.tls = settings.tls;
        settings.credentials.proxy = settings.proxy;
        settings.credentials.timeouts = timeouts();
        settings.deletion_window_days = aws_kms_deletion_window_days;
        return std::make_unique<KmsKeyProvider>(std::move(settings));
    }
    if (name == "kmip") {
        KmipSettings settings;
        settings.client.host = str(kmip_host);
        settings.client.port = kmip_port;
        settings.client.tls = TlsSettings{str(kmip_ca), str(kmip_client_cert), str(kmip_client_key)};
        settings.client.timeouts = timeouts();
        settings.retry = retry_policy();
        return std::make_unique<KmipKeyProvider>(std::move(settings));
    }
    if (name == "pkcs11") {
        // The module is loaded and initialised in a key broker only: never
        // in the postmaster, whose children would inherit its state.
        if (!IsUnderPostmaster)
            throw Error(ErrorCode::Internal, "the PKCS#11 module is never loaded in the postmaster");
        Pkcs11Settings settings;
        settings.module_path = str(pkcs11_module);
        settings.token_label = str(pkcs11_token_label);
        settings.slot_id = pkcs11_slot;
        settings.pin_file = str(pkcs11_pin_file);
        settings.mechanism = str(pkcs11_mechanism);
        if (settings.mechanism != "auto" && settings.mechanism != "aes_gcm" && settings.mechanism != "aes_key_wrap_pad")
            throw Error(ErrorCode::ConfigError, "pgphi.pkcs11_mechanism must be auto, aes_gcm or aes_key_wrap_pad");
        return std::make_unique<Pkcs11KeyProvider>(std::move(settings));
    }
    throw Error(ErrorCode::InvalidArgument, "unknown pgphi key provider", {},
                "Available providers: local, vault, aws_kms, kmip, pkcs11.");
}

std::string g_fingerprint;
std::map<std::string, std::unique_ptr<KeyProvider>, std::less<>> g_providers;

} // namespace

KeyProvider& provider_named(std::string_view name)
{
    std::string fingerprint = configuration_fingerprint();
    if (fingerprint != g_fingerprint) {
        g_providers.clear();
        g_fingerprint = fingerprint;
    }
    auto it = g_providers.find(name);
    if (it == g_providers.end())
        it = g_providers.emplace(std::string(name), build(name)).first;
    return *it->second;
}

} // namespace pgphi::pg
