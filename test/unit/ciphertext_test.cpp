// The ciphertext format and DataKey: round trips of both algorithms, and that
// every kind of damage to a value is refused with its own error and never
// yields plaintext.
#include <gtest/gtest.h>

#include <functional>
#include <set>
#include <string>
#include <vector>

#include "ciphertext_format.hpp"
#include "data_key.hpp"
#include "error.hpp"
#include "secure_bytes.hpp"
#include "test_util.hpp"

using namespace pgphi;
using pgphi::test::to_hex;

namespace {

std::vector<uint8_t> seal(DataKey& key, NonceSource& nonces, const std::string& plaintext,
                          const std::string& context = "")
{
    std::vector<uint8_t> out(format::sealed_size(plaintext.size()));
    key.seal(nonces, ByteView(plaintext), ByteView(context), out.data());
    return out;
}

std::vector<uint8_t> seal_deterministic(DataKey& key, const std::string& plaintext, const std::string& context = "")
{
    std::vector<uint8_t> out(format::deterministic_sealed_size(plaintext.size()));
    key.seal_deterministic(ByteView(plaintext), ByteView(context), out.data());
    return out;
}

// Parses and opens; returns the plaintext or throws pgphi::Error.
std::string open(DataKey& key, const std::vector<uint8_t>& value, const std::string& context = "")
{
    format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
    std::string out(parsed.ciphertext.size, '\0');
    key.open(parsed, ByteView(context), reinterpret_cast<uint8_t*>(out.data()));
    out.resize(parsed.plaintext_size());
    return out;
}

ErrorCode error_of(DataKey& key, const std::vector<uint8_t>& value, const std::string& context = "")
{
    try {
        open(key, value, context);
    } catch (const Error& e) {
        return e.code();
    }
    ADD_FAILURE() << "expected an error";
    return ErrorCode::Internal;
}

class CiphertextTest : public ::testing::Test {
protected:
    SecureBytes dek = SecureBytes::random(32);
    DataKey key{format::KeyRef{42, 3}, "ssn_key", dek};
    NonceSource nonces;
};

} // namespace

TEST_F(CiphertextTest, RoundTripsValuesOfEverySize)
{
    for (size_t n : {0, 1, 9, 15, 16, 17, 255, 4096, 65536}) {
        std::string plaintext(n, 'x');
        for (size_t i = 0; i < n; ++i)
            plaintext[i] = static_cast<char>(i * 31 + 7);
        auto value = seal(key, nonces, plaintext);
        EXPECT_EQ(value.size(), n + format::kGcmOverhead);
        EXPECT_EQ(open(key, value), plaintext);
    }
}

TEST_F(CiphertextTest, HeaderDescribesTheKey)
{
    auto value = seal(key, nonces, "123-45-6789");
    format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
    EXPECT_EQ(parsed.format_version, 1);
    EXPECT_EQ(parsed.algorithm, format::Algorithm::Aes256Gcm);
    EXPECT_EQ(parsed.key.key_id, 42u);
    EXPECT_EQ(parsed.key.version, 3u);
    EXPECT_EQ(parsed.ciphertext.size, 11u);
}

TEST_F(CiphertextTest, EqualPlaintextsGiveDifferentCiphertexts)
{
    std::set<std::vector<uint8_t>> seen;
    for (int i = 0; i < 1000; ++i)
        seen.insert(seal(key, nonces, "same"));
    EXPECT_EQ(seen.size(), 1000u);
}

TEST_F(CiphertextTest, ContextIsBound)
{
    auto value = seal(key, nonces, "Type 2 Diabetes", "patient:17");
    EXPECT_EQ(open(key, value, "patient:17"), "Type 2 Diabetes");
    EXPECT_EQ(error_of(key, value, "patient:18"), ErrorCode::AuthenticationFailed);
    EXPECT_EQ(error_of(key, value, ""), ErrorCode::AuthenticationFailed);
}

TEST_F(CiphertextTest, AnotherKeyCannotOpen)
{
    SecureBytes other_dek = SecureBytes::random(32);
    DataKey other{format::KeyRef{42, 3}, "ssn_key", other_dek};
    EXPECT_EQ(error_of(other, seal(key, nonces, "secret")), ErrorCode::AuthenticationFailed);
}

TEST_F(CiphertextTest, EveryFlippedBitIsRefused)
{
    auto value = seal(key, nonces, "123-45-6789");
    for (size_t bit = 0; bit < value.size() * 8; ++bit) {
        auto damaged = value;
        damaged[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
        ErrorCode code = error_of(key, damaged);
        size_t byte = bit / 8;
        if (byte == 0)
            EXPECT_EQ(code, ErrorCode::NotCiphertext) << "bit " << bit;
        else if (byte == 1)
            EXPECT_EQ(code, ErrorCode::UnsupportedVersion) << "bit " << bit;
        else if (byte == 2)
            EXPECT_EQ(code, ErrorCode::UnknownAlgorithm) << "bit " << bit;
        else
            // Key reference, nonce, body and tag are all authenticated.
            EXPECT_EQ(code, ErrorCode::AuthenticationFailed) << "bit " << bit;
    }
}

TEST_F(CiphertextTest, EveryTruncationIsRefused)
{
    auto value = seal(key, nonces, "123-45-6789");
    for (size_t len = 0; len < value.size(); ++len) {
        std::vector<uint8_t> cut(value.begin(), value.begin() + len);
        ErrorCode code = error_of(key, cut);
        if (len == 0)
            EXPECT_EQ(code, ErrorCode::NotCiphertext);
        else if (len < format::kGcmOverhead)
            EXPECT_EQ(code, ErrorCode::Truncated) << "length " << len;
        else
            EXPECT_EQ(code, ErrorCode::AuthenticationFailed) << "length " << len;
    }
}

TEST_F(CiphertextTest, PaddingIsRefused)
{
    auto value = seal(key, nonces, "123-45-6789");
    value.push_back(0);
    EXPECT_EQ(error_of(key, value), ErrorCode::AuthenticationFailed);
}

TEST(CiphertextFormat, RejectsPlainText)
{
    std::string text = "123-45-6789";
    try {
        format::parse(ByteView(text));
        FAIL();
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::NotCiphertext);
        EXPECT_STREQ(e.what(), "value is not a pgphi ciphertext");
    }
}

TEST(CiphertextFormat, RejectsZeroKeyReference)
{
    std::vector<uint8_t> value(format::kGcmOverhead, 0);
    format::write_prefix(value.data(), format::KeyRef{0, 1});
    EXPECT_THROW(format::parse(ByteView(value.data(), value.size())), Error);
    format::write_prefix(value.data(), format::KeyRef{1, 0});
    EXPECT_THROW(format::parse(ByteView(value.data(), value.size())), Error);
    format::write_prefix(value.data(), format::KeyRef{1, 1});
    EXPECT_NO_THROW(format::parse(ByteView(value.data(), value.size())));
}

// ---- Deterministic values (AES-256-SIV) ----------------------------------

TEST_F(CiphertextTest, DeterministicRoundTripsValuesOfEverySize)
{
    for (size_t n : {0, 1, 9, 15, 16, 17, 255, 4096, 65536}) {
        std::string plaintext(n, 'x');
        for (size_t i = 0; i < n; ++i)
            plaintext[i] = static_cast<char>(i * 31 + 7);
        auto value = seal_deterministic(key, plaintext, "ctx");
        EXPECT_EQ(value.size(), n + format::kSivOverhead);
        EXPECT_EQ(open(key, value, "ctx"), plaintext);
    }
}

TEST_F(CiphertextTest, DeterministicHeaderAndNoNonceCounted)
{
    auto value = seal_deterministic(key, "123-45-6789");
    format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
    EXPECT_EQ(parsed.algorithm, format::Algorithm::Aes256Siv);
    EXPECT_TRUE(parsed.deterministic());
    EXPECT_EQ(parsed.key.key_id, 42u);
    EXPECT_EQ(parsed.key.version, 3u);
    EXPECT_EQ(parsed.nonce, nullptr);
    EXPECT_EQ(parsed.plaintext_size(), 11u);
    // Random nonces bound how many values a DEK may seal; SIV uses none.
    EXPECT_EQ(key.unreported_seals(), 0u);
}

TEST_F(CiphertextTest, DeterministicEqualityFollowsPlaintextContextAndVersion)
{
    auto a = seal_deterministic(key, "123-45-6789");
    EXPECT_EQ(seal_deterministic(key, "123-45-6789"), a);
    EXPECT_NE(seal_deterministic(key, "123-45-6780"), a);
    EXPECT_NE(seal_deterministic(key, "123-45-6789", "patient:1"), a);
    EXPECT_EQ(seal_deterministic(key, "123-45-6789", "patient:1"),
              seal_deterministic(key, "123-45-6789", "patient:1"));
    // The same DEK under another version number is another value (the
    // header is authenticated data).
    DataKey same_dek_v4{format::KeyRef{42, 4}, "ssn_key", dek};
    EXPECT_NE(seal_deterministic(same_dek_v4, "123-45-6789"), a);
    // An empty plaintext is a value like any other.
    EXPECT_NE(seal_deterministic(key, ""), seal_deterministic(key, std::string(1, '\0')));
}

TEST(DeterministicFormat, MatchesAnIndependentImplementation)
{
    // Made with Python's cryptography package: HKDF-SHA-256 of the DEK under
    // the SIV label, then AESSIV(key).encrypt(b"\\x00" + plaintext,
    // [prefix] + ([context] if context else [])), after the prefix.
    uint8_t bytes[32];
    for (int i = 0; i < 32; ++i)
        bytes[i] = static_cast<uint8_t>(i);
    SecureBytes dek(bytes, sizeof(bytes));
    DataKey key{format::KeyRef{42, 3}, "ssn_key", dek};
    EXPECT_EQ(to_hex(seal_deterministic(key, "123-45-6789")),
              "a701020000002a00000003f9d1db5fe8a319fd85206146ce699f250b493d8d78fd91d498b8da6f");
    EXPECT_EQ(to_hex(seal_deterministic(key, "123-45-6789", "patient:17")),
              "a701020000002a00000003ab8c6f5ba2bc7234f3bb5feeb85dfbae722012710b56bd5da4fa92f4");
    EXPECT_EQ(to_hex(seal_deterministic(key, "")), "a701020000002a00000003a19ecbe934c8946710da1ad47648e11022");
}

TEST_F(CiphertextTest, DeterministicContextIsBound)
{
    auto value = seal_deterministic(key, "Type 2 Diabetes", "patient:17");
    EXPECT_EQ(open(key, value, "patient:17"), "Type 2 Diabetes");
    EXPECT_EQ(error_of(key, value, "patient:18"), ErrorCode::AuthenticationFailed);
    EXPECT_EQ(error_of(key, value, ""), ErrorCode::AuthenticationFailed);
}

TEST_F(CiphertextTest, DeterministicEveryFlippedBitIsRefused)
{
    auto value = seal_deterministic(key, "123-45-6789");
    for (size_t bit = 0; bit < value.size() * 8; ++bit) {
        auto damaged = value;
        damaged[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
        ErrorCode code = error_of(key, damaged);
        size_t byte = bit / 8;
        if (byte == 0)
            EXPECT_EQ(code, ErrorCode::NotCiphertext) << "bit " << bit;
        else if (byte == 1)
            EXPECT_EQ(code, ErrorCode::UnsupportedVersion) << "bit " << bit;
        else if (byte == 2)
            EXPECT_EQ(code, ErrorCode::UnknownAlgorithm) << "bit " << bit;
        else
            EXPECT_EQ(code, ErrorCode::AuthenticationFailed) << "bit " << bit;
    }
}

TEST_F(CiphertextTest, DeterministicEveryTruncationIsRefused)
{
    auto value = seal_deterministic(key, "123-45-6789");
    for (size_t len = 0; len < value.size(); ++len) {
        std::vector<uint8_t> cut(value.begin(), value.begin() + len);
        ErrorCode code = error_of(key, cut);
        if (len == 0)
            EXPECT_EQ(code, ErrorCode::NotCiphertext);
        else if (len < format::kSivOverhead)
            EXPECT_EQ(code, ErrorCode::Truncated) << "length " << len;
        else
            EXPECT_EQ(code, ErrorCode::AuthenticationFailed) << "length " << len;
    }
    value.push_back(0);
    EXPECT_EQ(error_of(key, value), ErrorCode::AuthenticationFailed);
}

TEST_F(CiphertextTest, AlgorithmCannotBeSwapped)
{
    // Relabelling a randomized value as deterministic, or the reverse, fails
    // authentication: the algorithm byte is associated data, and the two
    // algorithms use different keys.
    auto gcm = seal(key, nonces, "123-45-6789");
    gcm[2] = static_cast<uint8_t>(format::Algorithm::Aes256Siv);
    EXPECT_EQ(error_of(key, gcm), ErrorCode::AuthenticationFailed);
    auto siv = seal_deterministic(key, std::string(40, 'x'));
    siv[2] = static_cast<uint8_t>(format::Algorithm::Aes256Gcm);
    EXPECT_EQ(error_of(key, siv), ErrorCode::AuthenticationFailed);
}

// ---- Key purposes and blind indexes --------------------------------------

namespace {

ErrorCode purpose_error(const std::function<void()>& fn)
{
    try {
        fn();
    } catch (const Error& e) {
        return e.code();
    }
    return ErrorCode::Internal;
}

} // namespace

TEST(BlindIndexKey, LayoutAndIndependentValue)
{
    uint8_t bytes[32];
    for (int i = 0; i < 32; ++i)
        bytes[i] = static_cast<uint8_t>(i);
    SecureBytes dek(bytes, sizeof(bytes));
    KeySpec spec{KeyPurpose::BlindIndex, Normalization::None, 16};
    DataKey key{format::KeyRef{0x01020304, 7}, "ssn_bidx", dek, spec};
    std::vector<uint8_t> out(key.blind_index_size());
    ASSERT_EQ(out.size(), 24u);
    key.blind_index(ByteView("123-45-6789"), out.data());
    // Key id and version, then HMAC-SHA-256 under the key HKDF derives with
    // the blind index label (the HMAC from Python's cryptography package),
    // truncated to 16 bytes.
    EXPECT_EQ(to_hex(out), "0102030400000007130ef75e933726d7f62a303499f53f3c");
}

TEST(BlindIndexKey, EachPurposeRefusesTheOther)
{
    SecureBytes dek = SecureBytes::random(32);
    DataKey index_key{format::KeyRef{5, 1}, "bidx", dek, KeySpec{KeyPurpose::BlindIndex, Normalization::Trim, 8}};
    DataKey encryption_key{format::KeyRef{6, 1}, "enc", dek};
    NonceSource nonces;
    std::vector<uint8_t> out(256);
    EXPECT_EQ(purpose_error([&] { index_key.seal(nonces, ByteView("x"), ByteView(), out.data()); }),
              ErrorCode::WrongKeyPurpose);
    EXPECT_EQ(purpose_error([&] { index_key.seal_deterministic(ByteView("x"), ByteView(), out.data()); }),
              ErrorCode::WrongKeyPurpose);
    EXPECT_EQ(index_key.unreported_seals(), 0u);
    EXPECT_EQ(purpose_error([&] { encryption_key.blind_index(ByteView("x"), out.data()); }),
              ErrorCode::WrongKeyPurpose);
    // A forged header naming a blind-index key does not get it to decrypt.
    auto value = seal(encryption_key, nonces, "x");
    format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
    EXPECT_EQ(purpose_error([&] { index_key.open(parsed, ByteView(), out.data()); }), ErrorCode::WrongKeyPurpose);
}
