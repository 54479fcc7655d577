#include "shared/postgres.hpp"

extern "C" {
#include "utils/guc.h"
}

#include "shared/settings.hpp"

namespace pgphi::pg {

char* local_kek_file;
char* vault_addr;
char* vault_mount;
char* vault_namespace;
char* vault_token_file;
char* vault_approle_role_id_file;
char* vault_approle_secret_id_file;
char* vault_approle_mount;
char* vault_ca_file;
char* vault_client_cert;
char* vault_client_key;
char* aws_region;
char* aws_kms_endpoint;
char* aws_credentials_file;
char* aws_profile;
bool aws_use_environment;
bool aws_use_fips_endpoint;
bool vault_accept_unbound_deks;
bool aws_use_dualstack_endpoint;
char* provider_proxy;
char* provider_proxy_ca_file;
char* aws_imds_endpoint;
char* aws_config_file;
char* aws_sts_endpoint;
char* aws_role_arn;
char* aws_role_session_name;
char* aws_web_identity_token_file;
char* aws_container_credentials_uri;
char* aws_container_authorization_token_file;
char* vault_auth_method;
char* vault_auth_mount;
char* vault_auth_role;
char* vault_jwt_file;
char* vault_approle_wrapped_secret_id_file;
char* aws_ca_file;
char* aws_client_cert;
char* aws_client_key;
char* kmip_host;
int kmip_port;
char* kmip_client_cert;
char* kmip_client_key;
char* kmip_ca;
char* pkcs11_module;
char* pkcs11_token_label;
int pkcs11_slot;
char* pkcs11_pin_file;
char* pkcs11_mechanism;
int provider_connect_timeout_ms;
int provider_timeout_ms;
int provider_max_retries;
int aws_kms_deletion_window_days;
bool allow_insecure_http_loopback;
int cache_size;
int cache_ttl_s;
int key_manager_grace_s;
int key_wait_timeout_ms;
int dek_rotation_threshold;

namespace {

struct StringSetting {
    const char* name;
    char** variable;
    const char* default_value;
    const char* description;
};

const StringSetting kStringSettings[] = {
    {"pgphi.local_kek_file", &local_kek_file, "pgphi_local.kek",
     "File holding the local key provider's KEK (development only); relative to the data directory."},
    {"pgphi.vault_addr", &vault_addr, "", "HashiCorp Vault address, e.g. https://vault.example:8200."},
    {"pgphi.vault_mount", &vault_mount, "transit", "Mount path of Vault's Transit secrets engine."},
    {"pgphi.vault_namespace", &vault_namespace, "", "Vault namespace (X-Vault-Namespace), if any."},
    {"pgphi.vault_token_file", &vault_token_file, "", "File holding a Vault token."},
    {"pgphi.vault_approle_role_id_file", &vault_approle_role_id_file, "", "File holding the Vault AppRole role id."},
    {"pgphi.vault_approle_secret_id_file", &vault_approle_secret_id_file, "",
     "File holding the Vault AppRole secret id."},
    {"pgphi.vault_approle_mount", &vault_approle_mount, "approle", "Mount path of Vault's AppRole auth method."},
    {"pgphi.vault_auth_method", &vault_auth_method, "",
     "How pgphi logs in to Vault: token, approle, kubernetes, jwt or cert; empty: token file, else AppRole."},
    {"pgphi.vault_auth_mount", &vault_auth_mount, "",
     "Mount path of the Kubernetes, JWT or cert auth method; empty: the method's name."},
    {"pgphi.vault_auth_role", &vault_auth_role, "",
     "Role of the Kubernetes or JWT auth method (for cert: the certificate role's name, optional)."},
    {"pgphi.vault_jwt_file", &vault_jwt_file, "",
     "Token file for Kubernetes or JWT auth, read at each login; kubernetes default: the service account token."},
    {"pgphi.vault_approle_wrapped_secret_id_file", &vault_approle_wrapped_secret_id_file, "",
     "File holding a response-wrapping token whose secret is the AppRole secret id (single use)."},
    {"pgphi.vault_ca_file", &vault_ca_file, "", "CA bundle that signs Vault's certificate (default: system store)."},
    {"pgphi.vault_client_cert", &vault_client_cert, "", "Client certificate for mutual TLS with Vault."},
    {"pgphi.vault_client_key", &vault_client_key, "", "Client key for mutual TLS with Vault."},
    {"pgphi.aws_region", &aws_region, "", "AWS region of the KMS keys."},
    {"pgphi.aws_kms_endpoint", &aws_kms_endpoint, "",
     "KMS endpoint override (VPC endpoint); default: the region's endpoint in its AWS partition."},
    {"pgphi.provider_proxy", &provider_proxy, "",
     "Outbound proxy for Vault and AWS KMS (http://host:port or https://host:port, CONNECT); empty: direct."},
    {"pgphi.provider_proxy_ca_file", &provider_proxy_ca_file, "",
     "CA bundle that signs an https:// proxy's certificate (default: system store)."},
    {"pgphi.aws_credentials_file", &aws_credentials_file, "", "Shared-credentials-style file with AWS keys."},
    {"pgphi.aws_profile", &aws_profile, "default", "Profile to read from pgphi.aws_credentials_file."},
    {"pgphi.aws_imds_endpoint", &aws_imds_endpoint, "",
     "EC2 instance metadata service for role credentials, e.g. http://169.254.169.254; empty: not used."},
    {"pgphi.aws_config_file", &aws_config_file, "",
     "Shared AWS config file ([profile name] sections: role_arn, source_profile, web_identity_token_file ...)."},
    {"pgphi.aws_sts_endpoint", &aws_sts_endpoint, "",
     "AWS STS endpoint for assuming roles; default: the region's STS endpoint in its AWS partition."},
    {"pgphi.aws_role_arn", &aws_role_arn, "", "IAM role to assume with pgphi.aws_web_identity_token_file."},
    {"pgphi.aws_role_session_name", &aws_role_session_name, "",
     "Session name for the roles pgphi assumes; default: pgphi-<time>."},
    {"pgphi.aws_web_identity_token_file", &aws_web_identity_token_file, "",
     "Web identity (OIDC) token file for STS AssumeRoleWithWebIdentity, e.g. EKS IRSA's; read at each refresh."},
    {"pgphi.aws_container_credentials_uri", &aws_container_credentials_uri, "",
     "Container credentials endpoint (ECS, EKS Pod Identity), e.g. http://169.254.170.23/v1/credentials."},
    {"pgphi.aws_container_authorization_token_file", &aws_container_authorization_token_file, "",
     "File holding the container credentials endpoint's authorization token; read at each refresh."},
    {"pgphi.aws_ca_file", &aws_ca_file, "", "CA bundle that signs the KMS endpoint's certificate."},
    {"pgphi.aws_client_cert", &aws_client_cert, "", "Client certificate for mutual TLS with the KMS endpoint."},
    {"pgphi.aws_client_key", &aws_client_key, "", "Client key for mutual TLS with the KMS endpoint."},
    {"pgphi.kmip_host", &kmip_host, "", "KMIP server's host name or address; empty: no KMIP provider."},
    {"pgphi.kmip_client_cert", &kmip_client_cert, "", "Client certificate (PEM) pgphi presents to the KMIP server."},
    {"pgphi.kmip_client_key", &kmip_client_key, "",
     "Client key (PEM) for the KMIP server; a file of the server account, mode 0600."},
    {"pgphi.kmip_ca", &kmip_ca, "", "CA bundle that signs the KMIP server's certificate (default: system store)."},
    {"pgphi.pkcs11_module", &pkcs11_module, "",
     "Path of the PKCS#11 module (the HSM vendor's library), loaded by the pkcs11 key broker only."},
    {"pgphi.pkcs11_token_label", &pkcs11_token_label, "", "Label of the PKCS#11 token that holds the KEKs."},
    {"pgphi.pkcs11_pin_file", &pkcs11_pin_file, "", "File holding the PKCS#11 user PIN (mode 0600)."},
    {"pgphi.pkcs11_mechanism", &pkcs11_mechanism, "auto",
     "How DEKs are wrapped on the token: auto (CKM_AES_GCM if the token has it), aes_gcm or aes_key_wrap_pad."},
};

void define_string(const StringSetting& s)
{
    DefineCustomStringVariable(s.name, s.description, nullptr, s.variable, s.default_value, PGC_SIGHUP,
                               GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
}

} // namespace

char* test_fault_setting = nullptr;

bool test_fault_is(const char* name) { return test_fault_setting && strcmp(test_fault_setting, name) == 0; }

void define_settings()
{
    for (const StringSetting& setting : kStringSettings)
        define_string(setting);

    DefineCustomBoolVariable("pgphi.aws_use_environment",
                             "Take AWS credentials from the server's environment (AWS_ACCESS_KEY_ID, ...).",
                             nullptr, &aws_use_environment, true, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr,
                             nullptr, nullptr);
    DefineCustomIntVariable("pgphi.kmip_port", "TCP port of the KMIP server.", nullptr, &kmip_port, 5696, 1,
                            65535, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.pkcs11_slot",
                            "PKCS#11 slot id of the token, used when pgphi.pkcs11_token_label is empty (-1: none).",
                            nullptr, &pkcs11_slot, -1, -1, INT_MAX, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr,
                            nullptr);
    DefineCustomBoolVariable("pgphi.vault_accept_unbound_deks",
                             "Unwrap Vault DEKs that pgphi 0.2.0 wrapped without binding them to their key.",
                             "Turn off once pgphi.rewrap_keys() has bound every Vault DEK.",
                             &vault_accept_unbound_deks, true, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr,
                             nullptr);
    DefineCustomBoolVariable("pgphi.aws_use_fips_endpoint",
                             "Use the region's FIPS 140 KMS endpoint (kms-fips.<region>...).", nullptr,
                             &aws_use_fips_endpoint, false, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
    DefineCustomBoolVariable("pgphi.aws_use_dualstack_endpoint",
                             "Use the region's dual-stack (IPv4 and IPv6) KMS endpoint.", nullptr,
                             &aws_use_dualstack_endpoint, false, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr,
                             nullptr);
    DefineCustomIntVariable("pgphi.provider_connect_timeout", "Time limit for connecting to a key manager.",
                            nullptr, &provider_connect_timeout_ms, 2000, 100, 60000, PGC_SIGHUP,
                            GUC_UNIT_MS | GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.provider_timeout", "Time limit for one request to a key manager.", nullptr,
                            &provider_timeout_ms, 5000, 100, 300000, PGC_SIGHUP, GUC_UNIT_MS | GUC_SUPERUSER_ONLY,
                            nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.aws_kms_deletion_window",
                            "Days AWS KMS waits before deleting a dedicated KEK whose key was destroyed.",
                            "KMS allows 7 to 30; until then the deletion can be cancelled in KMS.",
                            &aws_kms_deletion_window_days, 30, 7, 30, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr,
                            nullptr, nullptr);
    DefineCustomIntVariable("pgphi.provider_max_retries",
                            "Retries after throttling or a transient key manager failure (never after a denial).",
                            nullptr, &provider_max_retries, 2, 0, 10, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr,
                            nullptr, nullptr);
    DefineCustomBoolVariable("pgphi.allow_insecure_http_loopback",
                             "Allow plain http to key managers on loopback addresses. For tests only.", nullptr,
                             &allow_insecure_http_loopback, false, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr,
                             nullptr, nullptr);

    DefineCustomIntVariable("pgphi.cache_size", "Number of DEKs the shared cache holds.",
                            "Each entry takes about 2.5 kB of shared memory.", &cache_size, 1024, 16, 1 << 20,
                            PGC_POSTMASTER, 0, nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.cache_ttl",
                            "How long a cached DEK is used before the key manager is asked again.",
                            "Bounds how long a revoked or disabled KEK keeps working. Keys in use are "
                            "re-validated before they expire.",
                            &cache_ttl_s, 300, 1, 86400, PGC_SIGHUP, GUC_UNIT_S, nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.key_manager_grace",
                            "How long cached DEKs keep working past their TTL while the key manager is unreachable.",
                            "An explicit denial ends it at once.", &key_manager_grace_s, 600, 0, 7 * 86400,
                            PGC_SIGHUP, GUC_UNIT_S, nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.key_wait_timeout", "How long a session waits for the key broker.", nullptr,
                            &key_wait_timeout_ms, 10000, 100, 600000, PGC_SUSET, GUC_UNIT_MS, nullptr, nullptr,
                            nullptr);

    DefineCustomIntVariable("pgphi.dek_rotation_threshold",
                            "Values a DEK version encrypts before pgphi rotates the key by itself.",
                            "Random 96-bit nonces make 2^32 values per DEK the limit; the default is a "
                            "quarter of it, and encryption stops at four times this setting.",
                            &dek_rotation_threshold, 1 << 30, 100, INT_MAX, PGC_SIGHUP, 0, nullptr, nullptr,
                            nullptr);

    // Test-only: faults the test suite injects into the key brokers and
    // sessions (TAP 022).
    // Off ('') by default, hidden from SHOW ALL and the sample file, and
    // settable only by a superuser in the server's configuration. Each fault
    // fires once (broker_digest: once in each broker), and again only after
    // the setting was cleared:
    //   broker_digest     the next SHA-256 of a request in the broker throws,
    //                     as it does when OpenSSL cannot allocate
    //   error_under_lock  an ERROR while the broker holds its lock
    //   usage_full        (in sessions) every key version not yet counted
    //                     finds the table of seal counts full
    //   reservation_stall the broker starts no seal reservation worker, as
    //                     when every worker slot is taken (while set)
    DefineCustomStringVariable("pgphi.test_fault", "Test-only: a fault to inject into the pgphi key broker.",
                               nullptr, &test_fault_setting, "", PGC_SIGHUP,
                               GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE, nullptr, nullptr,
                               nullptr);
}

void reserve_setting_prefix() { MarkGUCPrefixReserved("pgphi"); }

} // namespace pgphi::pg
