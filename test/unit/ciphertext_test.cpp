// The ciphertext format and DataKey: round trips, and that every kind of
// damage to a value is refused with its own error and never yields plaintext.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "ciphertext_format.hpp"
#include "data_key.hpp"
#include "error.hpp"
#include "secure_bytes.hpp"

using namespace pgphi;

namespace {

std::vector<uint8_t> seal(DataKey& key, NonceSource& nonces, const std::string& plaintext,
                          const std::string& context = "")
{
    std::vector<uint8_t> out(format::sealed_size(plaintext.size()));
    key.seal(nonces, ByteView(plaintext), ByteView(context), out.data());
    return out;
}

// Parses and opens; returns the plaintext or throws pgphi::Error.
std::string open(DataKey& key, const std::vector<uint8_t>& value, const std::string& context = "")
{
    format::ParsedValue parsed = format::parse(ByteView(value.data(), value.size()));
    std::string out(parsed.ciphertext.size, '\0');
    key.open(parsed, ByteView(context), reinterpret_cast<uint8_t*>(out.data()));
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
