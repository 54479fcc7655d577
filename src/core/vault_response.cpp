#include "vault_response.hpp"

#include <algorithm>
#include <cctype>

#include <nlohmann/json.hpp>

#include "encoding.hpp"
#include "error.hpp"

namespace pgphi::vault {

using nlohmann::json;

namespace {

// Longer leases are capped: the renewal arithmetic must not overflow, and
// renewing once a decade is as good as never.
constexpr long kMaxLeaseSeconds = 10L * 365 * 24 * 3600;

// doc[name] when doc is an object that has it, else nullptr. (nlohmann's
// value() and operator[] throw or assert on other types.)
const json* member(const json& doc, const char* name)
{
    if (!doc.is_object())
        return nullptr;
    auto it = doc.find(name);
    return it == doc.end() ? nullptr : &*it;
}

const json& data_of(const json& response)
{
    static const json empty = json::object();
    const json* data = member(response, "data");
    return data && data->is_object() ? *data : empty;
}

bool all_digits(const std::string& s, size_t begin, size_t end)
{
    if (begin >= end)
        return false;
    for (size_t i = begin; i < end; ++i)
        if (!std::isdigit(static_cast<unsigned char>(s[i])))
            return false;
    return true;
}

// A token goes into an HTTP header: visible ASCII only.
bool is_header_safe(const std::string& s)
{
    for (char c : s)
        if (c < 0x21 || c > 0x7e)
            return false;
    return !s.empty();
}

// A lease in seconds from an optional field; `fallback` when absent.
long lease_seconds(const json& auth, long fallback)
{
    const json* value = member(auth, "lease_duration");
    if (!value)
        return fallback;
    if (!value->is_number_integer())
        throw Error(ErrorCode::ProviderError, "Vault returned a lease_duration that is not a whole number");
    if (value->is_number_unsigned())
        return static_cast<long>(std::min<json::number_unsigned_t>(value->get<json::number_unsigned_t>(),
                                                                    kMaxLeaseSeconds));
    long seconds = static_cast<long>(std::max<json::number_integer_t>(
        std::min<json::number_integer_t>(value->get<json::number_integer_t>(), kMaxLeaseSeconds), 0));
    return seconds;
}

bool renewable_of(const json& auth)
{
    const json* value = member(auth, "renewable");
    if (!value)
        return false;
    if (!value->is_boolean())
        throw Error(ErrorCode::ProviderError, "Vault returned a renewable flag that is not true or false");
    return value->get<bool>();
}

} // namespace

json parse_body(const std::string& body)
{
    json doc = body.empty() ? json::object() : json::parse(body, nullptr, false);
    // Every answer Vault gives is an object; anything else tells nothing.
    if (doc.is_discarded() || !doc.is_object())
        doc = json::object();
    return doc;
}

namespace {

// Vault's multierror text ("1 error occurred:\n\t* permission denied\n\n")
// on one line: whitespace runs become one space, the count preamble goes.
std::string one_line(const std::string& text)
{
    std::string out;
    for (char c : text) {
        bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
        if (space) {
            if (!out.empty() && out.back() != ' ')
                out += ' ';
        } else if (static_cast<unsigned char>(c) >= 0x20) {
            out += c;
        }
    }
    while (!out.empty() && out.back() == ' ')
        out.pop_back();
    size_t preamble = out.find("occurred: * ");
    if (preamble != std::string::npos && preamble < 24)
        out.erase(0, preamble + 12);
    return out.size() > 300 ? out.substr(0, 300) + "..." : out;
}

} // namespace

std::string first_error(const json& doc)
{
    const json* errors = member(doc, "errors");
    if (errors && errors->is_array() && !errors->empty() && (*errors)[0].is_string())
        return one_line((*errors)[0].get<std::string>());
    return {};
}

std::string warnings(const json& doc)
{
    const json* list = member(doc, "warnings");
    std::string out;
    if (list && list->is_array())
        for (const json& warning : *list)
            if (warning.is_string())
                out += (out.empty() ? "" : "; ") + one_line(warning.get<std::string>());
    return out.size() > 300 ? out.substr(0, 300) + "..." : out;
}

WrappedDek wrapped_dek(const json& response)
{
    const json* ciphertext = member(data_of(response), "ciphertext");
    if (!ciphertext || !ciphertext->is_string())
        throw Error(ErrorCode::ProviderError, "Vault response has no ciphertext");
    // "vault:v3:<base64>": the Transit key version that wrapped the DEK is v3.
    const std::string& text = ciphertext->get_ref<const std::string&>();
    size_t end = text.find(':', 7);
    if (text.rfind("vault:v", 0) != 0 || end == std::string::npos || !all_digits(text, 7, end) ||
        end + 1 == text.size())
        throw Error(ErrorCode::ProviderError, "Vault returned a ciphertext that is not vault:vN:<ciphertext>");
    return WrappedDek{std::vector<uint8_t>(text.begin(), text.end()), text.substr(6, end - 6)};
}

SecureBytes unwrapped_dek(json& response)
{
    const json* found = member(data_of(response), "plaintext");
    if (!found || !found->is_string())
        throw Error(ErrorCode::ProviderError, "Vault decrypt response has no plaintext");
    // The base64 text is the DEK: wiped whether or not it decodes.
    std::string& plaintext = response["data"]["plaintext"].get_ref<std::string&>();
    WipeOnExit wipe_text(plaintext);
    SecureBytes dek = base64_decode(plaintext);
    if (dek.size() != KeyProvider::kDekSize)
        throw Error(ErrorCode::WrappedDekInvalid, "Vault unwrapped a DEK of the wrong size");
    return dek;
}

std::string latest_version(const json& response)
{
    const json* version = member(data_of(response), "latest_version");
    if (!version || !version->is_number_unsigned() || version->get<json::number_unsigned_t>() == 0)
        throw Error(ErrorCode::ProviderError, "Vault's description of the Transit key has no latest_version");
    return "v" + std::to_string(version->get<json::number_unsigned_t>());
}

TokenLease login_lease(json& response, std::string& token)
{
    const json* auth = member(response, "auth");
    const json* client_token = auth ? member(*auth, "client_token") : nullptr;
    if (!client_token || !client_token->is_string() || client_token->get_ref<const std::string&>().empty())
        throw Error(ErrorCode::KeyManagerDenied, "Vault AppRole login returned no token");
    // The token moves out of the answer, which is then wiped, on every path.
    std::string& text = response["auth"]["client_token"].get_ref<std::string&>();
    WipeOnExit wipe_text(text);
    if (!is_header_safe(text))
        throw Error(ErrorCode::ProviderError, "Vault AppRole login returned a malformed token");
    TokenLease lease;
    lease.ttl_seconds = lease_seconds(*auth, 0);
    lease.renewable = renewable_of(*auth);
    token = text;
    return lease;
}

void unwrapped_secret_id(json& response, SecureBytes& secret_id)
{
    const json* found = member(data_of(response), "secret_id");
    if (!found || !found->is_string())
        throw Error(ErrorCode::ProviderError, "the response-wrapped secret has no secret_id",
                    "The wrapping token must wrap an AppRole secret id (auth/<approle>/role/<role>/secret-id "
                    "with -wrap-ttl).");
    std::string& text = response["data"]["secret_id"].get_ref<std::string&>();
    WipeOnExit wipe_text(text);
    if (text.empty() || text.size() > 1024 || !is_header_safe(text))
        throw Error(ErrorCode::ProviderError, "the response-wrapped secret_id is malformed");
    secret_id = SecureBytes(reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

bool renewed_lease(const json& response, TokenLease& lease)
{
    const json* auth = member(response, "auth");
    if (!auth || !auth->is_object())
        return false;
    TokenLease renewed;
    renewed.ttl_seconds = lease_seconds(*auth, lease.ttl_seconds);
    renewed.renewable = renewable_of(*auth);
    lease = renewed;
    return true;
}

} // namespace pgphi::vault
