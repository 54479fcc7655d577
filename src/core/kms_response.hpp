// What pgphi reads out of AWS KMS's JSON 1.1 answers, apart from the signed
// HTTP exchange, so each parser can be tested and fuzzed without a server
// (test/fuzz/kms_response_fuzz.cpp). The answers come over the network and
// nothing in them is trusted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "error.hpp"
#include "secure_bytes.hpp"

namespace pgphi::kms {

// A successful (HTTP 200) answer; ProviderError when it is not a JSON object.
nlohmann::json parse_reply(const std::string& body);

// The error type (without its "namespace#" prefix) and message of an error
// answer; both empty when the body says nothing usable.
struct ErrorReply {
    std::string type;
    std::string message;
};
ErrorReply parse_error(const std::string& body);

// What pgphi reports for an error answer; `retry` says whether another
// attempt may succeed.
Error error_for(const ErrorReply& reply, long status, bool& retry);

// Whether the error says the request's credentials were refused, so that
// fetching them again may help (they expired or were rotated).
bool credentials_refused(const ErrorReply& reply);

// The CiphertextBlob of GenerateDataKeyWithoutPlaintext, Encrypt and
// ReEncrypt answers.
std::vector<uint8_t> ciphertext_blob(const nlohmann::json& response);

// The Plaintext of a Decrypt answer as a DEK; the base64 text in the
// response is wiped.
SecureBytes unwrapped_dek(nlohmann::json& response);

// The KeyId of an answer (the key's ARN), or `fallback` when it has none.
std::string key_id(const nlohmann::json& response, const std::string& fallback);

// The KEK version pgphi records for a DEK KMS wrapped: the key's ARN (the
// answer's KeyId, else `fallback`), then "#" and the key material id that
// `material_field` names (KeyMaterialId, DestinationKeyMaterialId), which a
// rotation of the KMS key changes. Without that field (Encrypt's answer, an
// older KMS), the ARN alone. ProviderError when the field is not 64 hex digits.
std::string kek_version(const nlohmann::json& response, const std::string& fallback, const char* material_field);

// The key ARN of a recorded KEK version ("<arn>#<material id>" or "<arn>").
std::string arn_of_kek_version(const std::string& kek_version);

// The ARN of a DescribeKey answer (`fallback` when it has none); a key that
// is not Enabled is refused (KeyManagerKeyDisabled).
std::string described_arn(const nlohmann::json& response, const std::string& fallback);

// The KeyState of a DescribeKey answer ("" when it has none).
std::string key_state(const nlohmann::json& response);

// A ScheduleKeyDeletion answer, as the sentence pgphi records: when KMS
// deletes the key and the waiting period. ProviderError without a
// DeletionDate.
std::string scheduled_deletion(const nlohmann::json& response);

} // namespace pgphi::kms
