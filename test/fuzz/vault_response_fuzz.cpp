// libFuzzer target for the parsers of HashiCorp Vault's answers
// (src/core/vault_response.cpp): each input is one HTTP body, given to every
// parser in turn, as each of datakey/wrapped, decrypt, rewrap, keys/<name>,
// AppRole login, token renewal and sys/wrapping/unwrap. Every parser returns or refuses with a
// pgphi::Error; a DEK or token taken out of an answer is wiped there, even
// when the answer is refused.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_support.hpp"
#include "vault_response.hpp"

using namespace pgphi;
using nlohmann::json;

namespace {

// The string at doc[outer][inner], or nullptr.
const std::string* field(const json& doc, const char* outer, const char* inner)
{
    if (!doc.is_object() || !doc.contains(outer) || !doc[outer].is_object() || !doc[outer].contains(inner) ||
        !doc[outer][inner].is_string())
        return nullptr;
    return &doc[outer][inner].get_ref<const std::string&>();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const std::string body(reinterpret_cast<const char*>(data), size);
    json doc;
    fuzz::refuses_cleanly("parse_body", {}, [&] { doc = vault::parse_body(body); });
    fuzz::refuses_cleanly("first_error", {}, [&] { vault::first_error(doc); });

    // datakey/wrapped, encrypt, rewrap
    WrappedDek wrapped;
    if (fuzz::refuses_cleanly("wrapped_dek", {ErrorCode::ProviderError}, [&] { wrapped = vault::wrapped_dek(doc); })) {
        std::string text(wrapped.blob.begin(), wrapped.blob.end());
        fuzz::require(text.rfind("vault:v", 0) == 0, "wrapped_dek", "accepted a ciphertext without vault:v");
        fuzz::require(wrapped.kek_version.size() > 1 && wrapped.kek_version[0] == 'v', "wrapped_dek",
                      "Transit key version is not vN");
    }

    // decrypt: the base64 DEK is wiped from the answer whatever happens.
    json decrypt = doc;
    SecureBytes dek;
    bool had_plaintext = field(decrypt, "data", "plaintext") != nullptr;
    if (fuzz::refuses_cleanly("unwrapped_dek", {ErrorCode::ProviderError, ErrorCode::WrappedDekInvalid},
                              [&] { dek = vault::unwrapped_dek(decrypt); }))
        fuzz::require(dek.size() == 32, "unwrapped_dek", "returned a DEK that is not 32 bytes");
    if (had_plaintext) {
        const std::string* left = field(decrypt, "data", "plaintext");
        fuzz::require(left && fuzz::wiped(*left), "unwrapped_dek", "left the DEK's base64 in the answer");
    }

    // keys/<name>
    std::string version;
    if (fuzz::refuses_cleanly("latest_version", {ErrorCode::ProviderError},
                              [&] { version = vault::latest_version(doc); }))
        fuzz::require(version.size() > 1 && version[0] == 'v', "latest_version", "version is not vN");

    // AppRole login: the token moves out of the answer.
    json login = doc;
    std::string token;
    bool had_token = field(login, "auth", "client_token") != nullptr;
    vault::TokenLease lease;
    if (fuzz::refuses_cleanly("login_lease", {ErrorCode::ProviderError, ErrorCode::KeyManagerDenied},
                              [&] { lease = vault::login_lease(login, token); })) {
        fuzz::require(fuzz::header_safe(token), "login_lease", "accepted a token unfit for a header");
        fuzz::require(lease.ttl_seconds >= 0, "login_lease", "negative lease");
    }
    if (had_token) {
        const std::string* left = field(login, "auth", "client_token");
        fuzz::require(left && fuzz::wiped(*left), "login_lease", "left the token in the answer");
    }

    // sys/wrapping/unwrap of a response-wrapped AppRole secret id
    json unwrap = doc;
    bool had_secret_id = field(unwrap, "data", "secret_id") != nullptr;
    SecureBytes secret_id;
    if (fuzz::refuses_cleanly("unwrapped_secret_id", {ErrorCode::ProviderError},
                              [&] { vault::unwrapped_secret_id(unwrap, secret_id); }))
        fuzz::require(!secret_id.empty() &&
                          fuzz::header_safe(std::string(reinterpret_cast<const char*>(secret_id.data()), secret_id.size())),
                      "unwrapped_secret_id", "accepted a secret id unfit for a request");
    if (had_secret_id) {
        const std::string* left = field(unwrap, "data", "secret_id");
        fuzz::require(left && fuzz::wiped(*left), "unwrapped_secret_id", "left the secret id in the answer");
    }

    // renew-self
    vault::TokenLease renewed{3600, true};
    if (fuzz::refuses_cleanly("renewed_lease", {ErrorCode::ProviderError},
                              [&] { vault::renewed_lease(doc, renewed); }))
        fuzz::require(renewed.ttl_seconds >= 0, "renewed_lease", "negative lease");
    return 0;
}
