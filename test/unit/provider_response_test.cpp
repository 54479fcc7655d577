// The parsers of Vault's, AWS KMS's and the metadata service's answers, on
// good answers and on the malformed ones the fuzz targets (test/fuzz) found
// mishandled: each malformed answer is a clear pgphi::Error, never another
// exception (which users would see as an internal error), and a DEK or token
// in a refused answer is wiped all the same.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "aws_credentials.hpp"
#include "encoding.hpp"
#include "error.hpp"
#include "http_client.hpp"
#include "kms_response.hpp"
#include "vault_response.hpp"
#include "refusal.hpp"

using namespace pgphi;
using pgphi::test_support::refusal;
using pgphi::test_support::refusal_text;
using nlohmann::json;

namespace {

bool wiped(const std::string& s) { return s.find_first_not_of('\0') == std::string::npos; }

std::string dek_base64(size_t size)
{
    std::string bytes(size, '\x5a');
    return base64_encode(ByteView(bytes));
}

} // namespace

TEST(VaultResponse, ReadsEachAnswer)
{
    WrappedDek wrapped = vault::wrapped_dek(vault::parse_body(R"({"data":{"ciphertext":"vault:v12:AAAA"}})"));
    EXPECT_EQ(std::string(wrapped.blob.begin(), wrapped.blob.end()), "vault:v12:AAAA");
    EXPECT_EQ(wrapped.kek_version, "v12");

    json decrypt = vault::parse_body(json{{"data", {{"plaintext", dek_base64(32)}}}}.dump());
    EXPECT_EQ(vault::unwrapped_dek(decrypt).size(), 32u);
    EXPECT_TRUE(wiped(decrypt["data"]["plaintext"].get<std::string>()));

    EXPECT_EQ(vault::latest_version(vault::parse_body(R"({"data":{"latest_version":3}})")), "v3");

    json login = vault::parse_body(R"({"auth":{"client_token":"t-1","lease_duration":60,"renewable":true}})");
    std::string token;
    vault::TokenLease lease = vault::login_lease(login, token);
    EXPECT_EQ(token, "t-1");
    EXPECT_EQ(lease.ttl_seconds, 60);
    EXPECT_TRUE(lease.renewable);
    EXPECT_TRUE(wiped(login["auth"]["client_token"].get<std::string>()));

    EXPECT_TRUE(vault::renewed_lease(vault::parse_body(R"({"auth":{"lease_duration":90}})"), lease));
    EXPECT_EQ(lease.ttl_seconds, 90);
    EXPECT_FALSE(vault::renewed_lease(vault::parse_body("{}"), lease));
    EXPECT_EQ(vault::first_error(vault::parse_body(R"({"errors":["permission denied"]})")), "permission denied");
}

TEST(VaultResponse, MalformedAnswersAreProviderErrors)
{
    // Answers that are JSON but not objects (found by the fuzzer: nlohmann's
    // value() threw a type_error).
    for (const char* body : {R"("a string")", "[1,2]", "7", "null"})
        EXPECT_EQ(refusal([&] { vault::wrapped_dek(vault::parse_body(body)); }), ErrorCode::ProviderError) << body;
    EXPECT_EQ(refusal([&] { vault::latest_version(vault::parse_body(R"({"data":{"latest_version":"3"}})")); }),
              ErrorCode::ProviderError);
    EXPECT_EQ(refusal([&] { vault::latest_version(vault::parse_body(R"({"data":{"latest_version":1e300}})")); }),
              ErrorCode::ProviderError);
    for (const char* ciphertext : {"vault:v", "vault:v:AAAA", "vault:vx:AAAA", "vault:v1:", "vault:v1"})
        EXPECT_EQ(refusal([&] { vault::wrapped_dek(json{{"data", {{"ciphertext", ciphertext}}}}); }),
                  ErrorCode::ProviderError)
            << ciphertext;

    // A login whose token or lease has the wrong type (found by the fuzzer).
    std::string token;
    json login = vault::parse_body(R"({"auth":{"client_token":true}})");
    EXPECT_EQ(refusal([&] { vault::login_lease(login, token); }), ErrorCode::KeyManagerDenied);
    login = vault::parse_body(R"({"auth":{"client_token":"t-1","lease_duration":"1h"}})");
    EXPECT_EQ(refusal([&] { vault::login_lease(login, token); }), ErrorCode::ProviderError);
    EXPECT_TRUE(wiped(login["auth"]["client_token"].get<std::string>()));
    // A token with a line break would add a header to every later request.
    login = vault::parse_body(R"({"auth":{"client_token":"t-1\r\nX-Other: 1"}})");
    EXPECT_EQ(refusal([&] { vault::login_lease(login, token); }), ErrorCode::ProviderError);
    // A lease too long to add to a time is capped.
    login = vault::parse_body(R"({"auth":{"client_token":"t-1","lease_duration":18446744073709551615}})");
    EXPECT_LE(vault::login_lease(login, token).ttl_seconds, 10L * 365 * 24 * 3600);
}

TEST(VaultResponse, RefusedDekIsWipedAllTheSame)
{
    // Found by the fuzzer: base64 that did not decode was left in the answer.
    for (const std::string& text : {std::string("not base64!"), dek_base64(16)}) {
        json decrypt = json{{"data", {{"plaintext", text}}}};
        EXPECT_NE(refusal([&] { vault::unwrapped_dek(decrypt); }), ErrorCode::Internal);
        EXPECT_TRUE(wiped(decrypt["data"]["plaintext"].get<std::string>())) << text;
    }
}

TEST(KmsResponse, ReadsEachAnswer)
{
    json generated = kms::parse_reply(R"({"CiphertextBlob":"AQID","KeyId":"arn:k"})");
    EXPECT_EQ(kms::ciphertext_blob(generated), (std::vector<uint8_t>{1, 2, 3}));
    EXPECT_EQ(kms::key_id(generated, "fallback"), "arn:k");
    EXPECT_EQ(kms::key_id(json::object(), "fallback"), "fallback");

    json decrypt = json{{"Plaintext", dek_base64(32)}};
    EXPECT_EQ(kms::unwrapped_dek(decrypt).size(), 32u);
    EXPECT_TRUE(wiped(decrypt["Plaintext"].get<std::string>()));

    EXPECT_EQ(kms::described_arn(json::parse(R"({"KeyMetadata":{"Arn":"arn:k","KeyState":"Enabled"}})"), "f"),
              "arn:k");
    EXPECT_EQ(refusal([&] { kms::described_arn(json::parse(R"({"KeyMetadata":{"KeyState":"Disabled"}})"), "f"); }),
              ErrorCode::KeyManagerKeyDisabled);

    kms::ErrorReply reply = kms::parse_error(R"({"__type":"com.amazonaws.kms#DisabledException","message":"off"})");
    EXPECT_EQ(reply.type, "DisabledException");
    EXPECT_EQ(reply.message, "off");
    bool retry = true;
    EXPECT_EQ(kms::error_for(reply, 400, retry).code(), ErrorCode::KeyManagerKeyDisabled);
    EXPECT_FALSE(retry);
    EXPECT_EQ(kms::error_for(kms::parse_error("<html>"), 503, retry).code(), ErrorCode::KeyManagerUnavailable);
    EXPECT_TRUE(retry);
    EXPECT_TRUE(kms::credentials_refused(kms::parse_error(R"({"__type":"ExpiredTokenException"})")));
}

// The KEK version names the key material, which a KMS key rotation changes,
// so that a rotation shows in key_versions; Decrypt and ReEncrypt go on
// naming the key's ARN.
TEST(KmsResponse, ScheduledDeletionIsToldWithItsDate)
{
    EXPECT_EQ(kms::scheduled_deletion(json::parse(
                  R"({"KeyId":"arn:k","DeletionDate":1798761600.5,"KeyState":"PendingDeletion","PendingWindowInDays":30})")),
              "AWS KMS deletes the key on 2027-01-01T00:00:00Z (after a waiting period of 30 days)");
    EXPECT_EQ(kms::scheduled_deletion(json::parse(R"({"DeletionDate":1798761600})")),
              "AWS KMS deletes the key on 2027-01-01T00:00:00Z");
    for (const char* bad : {R"({})", R"({"DeletionDate":"2027-01-01"})", R"({"DeletionDate":-1})"})
        EXPECT_EQ(refusal([&] { kms::scheduled_deletion(json::parse(bad)); }), ErrorCode::ProviderError) << bad;
    EXPECT_EQ(kms::key_state(json::parse(R"({"KeyMetadata":{"KeyState":"PendingDeletion"}})")), "PendingDeletion");
    EXPECT_EQ(kms::key_state(json::parse(R"({"KeyMetadata":"x"})")), "");
}

TEST(KmsResponse, KekVersionNamesTheKeyMaterial)
{
    const std::string material(64, 'a');
    json generated = {{"KeyId", "arn:aws:kms:us-east-1:1:key/k"}, {"KeyMaterialId", material}};
    EXPECT_EQ(kms::kek_version(generated, "alias/x", "KeyMaterialId"), "arn:aws:kms:us-east-1:1:key/k#" + material);
    json reencrypted = {{"KeyId", "arn:aws:kms:us-east-1:1:key/k2"}, {"SourceKeyMaterialId", material},
                        {"DestinationKeyMaterialId", std::string(64, 'b')}};
    EXPECT_EQ(kms::kek_version(reencrypted, "k2", "DestinationKeyMaterialId"),
              "arn:aws:kms:us-east-1:1:key/k2#" + std::string(64, 'b'));
    // Encrypt's answer (and an older KMS) names no material: the ARN alone.
    EXPECT_EQ(kms::kek_version(json{{"KeyId", "arn:k"}}, "f", "KeyMaterialId"), "arn:k");
    EXPECT_EQ(kms::arn_of_kek_version("arn:aws:kms:us-east-1:1:key/k#" + material), "arn:aws:kms:us-east-1:1:key/k");
    EXPECT_EQ(kms::arn_of_kek_version("arn:aws:kms:us-east-1:1:key/k"), "arn:aws:kms:us-east-1:1:key/k");
    for (const json& bad : {json("ABC"), json(std::string(63, 'a')), json(std::string(64, 'A')), json(7)})
        EXPECT_EQ(refusal([&] { kms::kek_version(json{{"KeyId", "arn:k"}, {"KeyMaterialId", bad}}, "f", "KeyMaterialId"); }),
                  ErrorCode::ProviderError);
}

TEST(VaultResponses, LookupSelfGivesTheLeaseOfATokenFromAFile)
{
    vault::TokenLease lease;
    EXPECT_TRUE(vault::looked_up_lease(json::parse(R"({"data":{"ttl":2764,"renewable":true}})"), lease));
    EXPECT_EQ(lease.ttl_seconds, 2764);
    EXPECT_TRUE(lease.renewable);
    // A root or periodic-less token: no expiry, not renewable.
    EXPECT_TRUE(vault::looked_up_lease(json::parse(R"({"data":{"ttl":0,"renewable":false}})"), lease));
    EXPECT_EQ(lease.ttl_seconds, 0);
    EXPECT_FALSE(lease.renewable);
    EXPECT_FALSE(vault::looked_up_lease(json::parse(R"({"data":{}})"), lease));
    EXPECT_FALSE(vault::looked_up_lease(json::parse(R"({"auth":null})"), lease));
    EXPECT_EQ(refusal([&] { vault::looked_up_lease(json::parse(R"({"data":{"ttl":"x"}})"), lease); }),
              ErrorCode::ProviderError);
}

TEST(KmsResponse, MalformedAnswersAreProviderErrors)
{
    // Found by the fuzzer: an answer that is JSON but not an object.
    EXPECT_EQ(refusal([&] { kms::parse_reply(R"("{Ciphertext{B")"); }), ErrorCode::ProviderError);
    EXPECT_EQ(refusal([&] { kms::parse_reply("not json"); }), ErrorCode::ProviderError);
    EXPECT_EQ(refusal([&] { kms::key_id(json{{"KeyId", 7}}, "f"); }), ErrorCode::ProviderError);
    EXPECT_EQ(refusal([&] { kms::described_arn(json{{"KeyMetadata", "x"}}, "f"); }), ErrorCode::ProviderError);
    EXPECT_EQ(refusal([&] { kms::described_arn(json{{"KeyMetadata", {{"KeyState", 1}}}}, "f"); }),
              ErrorCode::ProviderError);
    EXPECT_EQ(refusal([&] { kms::ciphertext_blob(json{{"CiphertextBlob", ""}}); }), ErrorCode::ProviderError);
    // Error answers with fields of the wrong type still give an error.
    kms::ErrorReply reply = kms::parse_error(R"({"__type":4,"message":{},"Message":"m"})");
    EXPECT_EQ(reply.type, "");
    EXPECT_EQ(reply.message, "m");

    // Found by the fuzzer: the DEK's base64 was left in the answer when refused.
    json decrypt = json{{"Plaintext", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXG!kaGxwdHg=="}};
    EXPECT_EQ(refusal([&] { kms::unwrapped_dek(decrypt); }), ErrorCode::ProviderError);
    EXPECT_TRUE(wiped(decrypt["Plaintext"].get<std::string>()));
}

TEST(VaultResponses, UnwrappedSecretIdMovesOutOfTheAnswer)
{
    json answer = json::parse(R"({"data": {"secret_id": "5c1e-secret"}, "wrap_info": null})");
    SecureBytes secret_id;
    vault::unwrapped_secret_id(answer, secret_id);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(secret_id.data()), secret_id.size()), "5c1e-secret");
    EXPECT_TRUE(wiped(answer["data"]["secret_id"].get<std::string>()));
    for (const char* body : {R"({"data": {"secret_id": ""}})", R"({"data": {"secret_id": 7}})",
                             R"({"data": {"token": "x"}})", R"({"data": null})", "{}"}) {
        json bad = json::parse(body);
        EXPECT_EQ(refusal([&] { vault::unwrapped_secret_id(bad, secret_id); }), ErrorCode::ProviderError) << body;
    }
    json line_break = json::parse(R"({"data": {"secret_id": "a\nX-Vault-Token: b"}})");
    EXPECT_EQ(refusal([&] { vault::unwrapped_secret_id(line_break, secret_id); }), ErrorCode::ProviderError);
    EXPECT_TRUE(wiped(line_break["data"]["secret_id"].get<std::string>()));
}

TEST(MetadataService, ParsesAndChecksWhatGoesIntoTheNextRequest)
{
    EXPECT_EQ(aws::imds_role_name("pgphi-db-role\n"), "pgphi-db-role");
    EXPECT_EQ(refusal([] { aws::imds_role_name("\n"); }), ErrorCode::KeyManagerDenied);
    // Found by the fuzzer in the first version of this check: NUL bytes.
    for (const std::string& bad : {std::string("../../user-data"), std::string("role?x=1"),
                                   std::string("pgphi-d\0\0dle", 12), std::string(65, 'r')})
        EXPECT_EQ(refusal([&] { aws::imds_role_name(bad); }), ErrorCode::ProviderError);

    EXPECT_EQ(aws::imds_session_token("AQAEAFake-token=="), "AQAEAFake-token==");
    EXPECT_EQ(refusal([] { aws::imds_session_token("a\r\nX-Other: 1"); }), ErrorCode::ProviderError);

    std::time_t expires_at = 0;
    sigv4::Credentials credentials = aws::imds_credentials(
        R"({"AccessKeyId":"ID1","SecretAccessKey":"S1","Token":"T1","Expiration":"2030-01-01T00:00:00Z"})",
        1700000000, expires_at);
    EXPECT_EQ(credentials.access_key_id, "ID1");
    EXPECT_EQ(credentials.session_token, "T1");
    EXPECT_EQ(expires_at, 1893456000);
    for (const char* body : {R"({"AccessKeyId":1,"SecretAccessKey":"S"})", R"({"AccessKeyId":"","SecretAccessKey":"S"})",
                             R"({"AccessKeyId":"I","SecretAccessKey":"S","Token":[]})", "[]", "{"})
        EXPECT_EQ(refusal([&] { aws::imds_credentials(body, 1700000000, expires_at); }), ErrorCode::ProviderError)
            << body;
}

TEST(HttpClient, RefusesHeaderValuesWithLineBreaks)
{
    HttpClient client("Vault", TlsSettings{}, HttpTimeouts{}, PlainHttp{true, false});
    HttpRequest request;
    request.url = "http://127.0.0.1:1/";
    request.headers.emplace_back("X-Vault-Token", "t-1\nX-Other: 1");
    EXPECT_EQ(refusal([&] { client.send(request); }), ErrorCode::ConfigError);
}
