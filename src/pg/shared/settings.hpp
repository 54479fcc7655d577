// pgphi's configuration parameters (GUCs), defined in _PG_init. Every one is
// reloadable (SIGHUP) and superuser-only: hidden from pg_settings and SHOW for
// everyone else, since they say where secrets live.
#pragma once

namespace pgphi::pg {

// Local provider
extern char* local_kek_file;

// HashiCorp Vault Transit provider
extern char* vault_addr;
extern char* vault_mount;
extern char* vault_namespace;
extern char* vault_token_file;
extern char* vault_approle_role_id_file;
extern char* vault_approle_secret_id_file;
extern char* vault_approle_mount;
extern char* vault_auth_method;
extern char* vault_auth_mount;
extern char* vault_auth_role;
extern char* vault_jwt_file;
extern char* vault_approle_wrapped_secret_id_file;
extern char* vault_ca_file;
extern char* vault_client_cert;
extern char* vault_client_key;

// AWS KMS provider
extern char* aws_region;
extern char* aws_kms_endpoint;
extern char* aws_credentials_file;
extern char* aws_profile;
extern bool aws_use_environment;
extern bool aws_use_fips_endpoint;
extern bool vault_accept_unbound_deks;
extern bool aws_use_dualstack_endpoint;
extern char* provider_proxy;
extern char* provider_proxy_ca_file;
extern char* aws_imds_endpoint;
extern char* aws_config_file;
extern char* aws_sts_endpoint;
extern char* aws_role_arn;
extern char* aws_role_session_name;
extern char* aws_web_identity_token_file;
extern char* aws_container_credentials_uri;
extern char* aws_container_authorization_token_file;
extern char* aws_ca_file;
extern char* aws_client_cert;
extern char* aws_client_key;
extern char* kmip_host;
extern int kmip_port;
extern char* kmip_client_cert;
extern char* kmip_client_key;
extern char* kmip_ca;

// PKCS#11 provider (an HSM or token through its vendor's module)
extern char* pkcs11_module;
extern char* pkcs11_token_label;
extern int pkcs11_slot;
extern char* pkcs11_pin_file;
extern char* pkcs11_mechanism;

// All remote providers
extern int provider_connect_timeout_ms;
extern int provider_timeout_ms;
extern int provider_max_retries;
extern int aws_kms_deletion_window_days;
extern bool allow_insecure_http_loopback;

// Key broker and shared DEK cache
extern int cache_size;              // slots; fixed at server start
extern int cache_ttl_s;             // a DEK is re-validated with the key manager this often
extern int key_manager_grace_s;     // how long cached DEKs outlive an unreachable key manager
extern int key_wait_timeout_ms;     // how long a session waits for the broker
extern int dek_rotation_threshold;  // values a DEK version seals before it is rotated

// Test-only: a fault the test suite injects (pgphi.test_fault; the list is
// in settings.cpp). Empty in production.
extern char* test_fault_setting;
bool test_fault_is(const char* name);

void define_settings();
// Last in _PG_init, once every module has defined its settings: from then on
// an unknown pgphi.* name is refused. (Called earlier, it would remove the
// server configuration's values of the settings defined after it, which
// then took effect only at the first reload.)
void reserve_setting_prefix();

} // namespace pgphi::pg
