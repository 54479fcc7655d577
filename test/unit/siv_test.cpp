// AES-SIV known-answer tests. Vectors: RFC 5297 appendix A.1 (deterministic
// authenticated encryption, one associated data component) and A.2 (three
// components), with 256-bit SIV keys (AES-128); and two AES-SIV-CMAC-512
// (AES-256, the size pgphi uses) vectors with two components, as published
// in GNU Nettle's test suite.
#include <gtest/gtest.h>

#include <ostream>
#include <vector>

#include "aead.hpp"
#include "error.hpp"
#include "test_util.hpp"

using namespace pgphi;
using pgphi::test::from_hex;
using pgphi::test::to_hex;

namespace {

struct SivVector {
    const char* name;
    const char* key;
    std::vector<const char*> ad;
    const char* plaintext;
    const char* tag;
    const char* ciphertext;
};

const SivVector kVectors[] = {
    {"rfc5297_a1", "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
     {"101112131415161718191a1b1c1d1e1f2021222324252627"}, "112233445566778899aabbccddee",
     "85632d07c6e8f37f950acd320a2ecc93", "40c02b9690c4dc04daef7f6afe5c"},
    {"rfc5297_a2", "7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f",
     {"00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100",
      "102030405060708090a0", "09f911029d74e35bd84156c5635688c0"},
     "7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553",
     "7bdb6e3b432667eb06f4d14bff2fbd0f",
     "cb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d"},
    {"cmac512_a", "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f06f6e6d6c6b6a69686766656463626160"
                  "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f",
     {"101112131415161718191a1b1c1d1e1f2021222324252627", "02"}, "112233445566778899aabbccddee",
     "6f740b421e2972d85e76189e99842843", "ad9e6ff14ea97c32ab315e67464c"},
    {"cmac512_b", "c27df2fdaec35d4a2a412a50c3e8c47d2d568e91a38e54148abdc0b6e86caf87"
                  "695c0a8adf4c5f8eb2c6c8b136529864f3b84b3ae8e3676ce760c461f3a13e83",
     {"101112131415161718191a1b1c1d1e1f2021222324252627", "02"}, "112233445566778899aabbccddee",
     "c3366ef892911eac3d17f29a37d4ebad", "ddc1219ebbde06d1ee893e55a39f"},
};

struct Decoded {
    std::vector<uint8_t> key, plaintext, tag, ciphertext;
    std::vector<std::vector<uint8_t>> ad;
    std::vector<ByteView> ad_views;

    explicit Decoded(const SivVector& v)
        : key(from_hex(v.key)), plaintext(from_hex(v.plaintext)), tag(from_hex(v.tag)),
          ciphertext(from_hex(v.ciphertext))
    {
        for (const char* a : v.ad)
            ad.push_back(from_hex(a));
        for (auto& a : ad)
            ad_views.emplace_back(a.data(), a.size());
    }
};

// Test names carry the vector's name; this keeps GoogleTest from dumping its bytes.
void PrintTo(const SivVector& v, std::ostream* os) { *os << v.name; }

class SivKnownAnswer : public ::testing::TestWithParam<SivVector> {};

} // namespace

TEST_P(SivKnownAnswer, SealMatchesVector)
{
    Decoded v(GetParam());
    AesSiv siv(ByteView(v.key.data(), v.key.size()));
    std::vector<uint8_t> out(v.plaintext.size()), tag(16);
    siv.seal(v.ad_views.data(), v.ad_views.size(), ByteView(v.plaintext.data(), v.plaintext.size()), tag.data(),
             out.data());
    EXPECT_EQ(to_hex(tag), GetParam().tag);
    EXPECT_EQ(to_hex(out), GetParam().ciphertext);
}

TEST_P(SivKnownAnswer, SealIsDeterministicAndWorksInPlace)
{
    Decoded v(GetParam());
    AesSiv siv(ByteView(v.key.data(), v.key.size()));
    for (int round = 0; round < 3; ++round) {
        std::vector<uint8_t> buffer = v.plaintext, tag(16);
        siv.seal(v.ad_views.data(), v.ad_views.size(), ByteView(buffer.data(), buffer.size()), tag.data(),
                 buffer.data());
        EXPECT_EQ(to_hex(tag), GetParam().tag);
        EXPECT_EQ(to_hex(buffer), GetParam().ciphertext);
    }
}

TEST_P(SivKnownAnswer, OpenMatchesVector)
{
    Decoded v(GetParam());
    AesSiv siv(ByteView(v.key.data(), v.key.size()));
    std::vector<uint8_t> out(v.ciphertext.size());
    ASSERT_TRUE(siv.open(v.ad_views.data(), v.ad_views.size(), ByteView(v.ciphertext.data(), v.ciphertext.size()),
                         v.tag.data(), out.data()));
    EXPECT_EQ(to_hex(out), GetParam().plaintext);
}

TEST_P(SivKnownAnswer, OpenRejectsEveryFlippedBitAndWipes)
{
    Decoded v(GetParam());
    AesSiv siv(ByteView(v.key.data(), v.key.size()));
    // Tag, ciphertext and every associated data component are authenticated.
    auto check = [&](const char* what, size_t bit) {
        std::vector<uint8_t> out(v.ciphertext.size(), 0xAA);
        EXPECT_FALSE(siv.open(v.ad_views.data(), v.ad_views.size(), ByteView(v.ciphertext.data(), v.ciphertext.size()),
                              v.tag.data(), out.data()))
            << what << " bit " << bit;
        for (uint8_t b : out)
            ASSERT_EQ(b, 0) << "unauthenticated bytes left after a flipped " << what << " bit " << bit;
    };
    for (size_t bit = 0; bit < v.tag.size() * 8; ++bit) {
        v.tag[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
        check("tag", bit);
        v.tag[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    }
    for (size_t bit = 0; bit < v.ciphertext.size() * 8; ++bit) {
        v.ciphertext[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
        check("ciphertext", bit);
        v.ciphertext[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    }
    for (auto& a : v.ad) {
        a[0] ^= 0x80;
        check("associated data", 7);
        a[0] ^= 0x80;
    }
}

INSTANTIATE_TEST_SUITE_P(Vectors, SivKnownAnswer, ::testing::ValuesIn(kVectors),
                         [](const ::testing::TestParamInfo<SivVector>& info) { return info.param.name; });

TEST(AesSiv, ComponentsAreNotConcatenated)
{
    // S2V frames each component: moving a byte between two components
    // changes the output, unlike a single concatenated AAD.
    std::vector<uint8_t> key(64, 7);
    AesSiv siv(ByteView(key.data(), key.size()));
    uint8_t plaintext[] = {1, 2, 3};
    ByteView split_a[] = {ByteView("ab"), ByteView("c")};
    ByteView split_b[] = {ByteView("a"), ByteView("bc")};
    uint8_t out_a[3], out_b[3], tag_a[16], tag_b[16];
    siv.seal(split_a, 2, ByteView(plaintext, 3), tag_a, out_a);
    siv.seal(split_b, 2, ByteView(plaintext, 3), tag_b, out_b);
    EXPECT_NE(to_hex(tag_a, 16), to_hex(tag_b, 16));
}

TEST(AesSiv, RefusesWhatOpenSslCannotProcess)
{
    std::vector<uint8_t> key(64, 7);
    AesSiv siv(ByteView(key.data(), key.size()));
    uint8_t out[16], tag[16];
    ByteView ad[] = {ByteView("header")};
    ByteView empty_ad[] = {ByteView()};
    try {
        siv.seal(ad, 1, ByteView(), tag, out);
        FAIL() << "an empty plaintext was accepted";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    }
    try {
        siv.seal(empty_ad, 1, ByteView("x"), tag, out);
        FAIL() << "an empty component was accepted";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    }
    std::vector<uint8_t> short_key(16, 1);
    EXPECT_THROW(AesSiv(ByteView(short_key.data(), short_key.size())), Error);
}
