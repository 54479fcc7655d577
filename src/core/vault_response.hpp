// What pgphi reads out of HashiCorp Vault's JSON answers, apart from the
// HTTP exchange, so each parser can be tested and fuzzed without a server
// (test/fuzz/vault_response_fuzz.cpp). The answers come over the network and
// nothing in them is trusted.
#pragma once

#include <string>

#include <nlohmann/json_fwd.hpp>

#include "key_provider.hpp"
#include "secure_bytes.hpp"

namespace pgphi::vault {

// A body as a JSON object. An empty body, or one that is not a JSON object,
// is an empty object: the HTTP status then says what happened.
nlohmann::json parse_body(const std::string& body);

// The first of Vault's "errors" strings, or "".
std::string first_error(const nlohmann::json& doc);

// Vault's "warnings", joined with "; " ("" when none): logged with failures.
std::string warnings(const nlohmann::json& doc);

// The data.ciphertext of datakey/wrapped, encrypt and rewrap answers, with
// the Transit key version ("vault:v3:..." -> "v3") that wrapped it.
WrappedDek wrapped_dek(const nlohmann::json& response);

// The data.plaintext of a decrypt answer as a DEK; the base64 text in the
// response is wiped.
SecureBytes unwrapped_dek(nlohmann::json& response);

// "v<latest_version>" from a keys/<name> answer.
std::string latest_version(const nlohmann::json& response);

struct TokenLease {
    long ttl_seconds = 0; // 0: no expiry known
    bool renewable = false;
};

// An AppRole login answer: moves auth.client_token into `token`, wiping the
// response's copy, and returns the token's lease.
TokenLease login_lease(nlohmann::json& response, std::string& token);

// A sys/wrapping/unwrap answer that wrapped an AppRole secret id: moves
// data.secret_id into `secret_id`, wiping the response's copy.
// ProviderError when there is none or it is unfit for a request body.
void unwrapped_secret_id(nlohmann::json& response, SecureBytes& secret_id);

// A renew-self answer: updates `lease`; false when the answer holds none.
bool renewed_lease(const nlohmann::json& response, TokenLease& lease);

} // namespace pgphi::vault
