// AES-256-GCM known-answer tests. Vectors: McGrew & Viega, "The Galois/Counter
// Mode of Operation (GCM)", appendix B, test cases 13, 14 and 16 (the 256-bit
// cases), and one NIST CAVP GCMVS encrypt vector (gcmEncryptExtIV256).
#include <gtest/gtest.h>

#include "aead.hpp"
#include "error.hpp"
#include "test_util.hpp"

using namespace pgphi;
using pgphi::test::from_hex;
using pgphi::test::to_hex;

namespace {

struct GcmVector {
    const char* name;
    const char* key;
    const char* nonce;
    const char* aad;
    const char* plaintext;
    const char* ciphertext;
    const char* tag;
};

const GcmVector kVectors[] = {
    {"spec_case_13", "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
    {"spec_case_14", "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "00000000000000000000000000000000",
     "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
    {"spec_case_16", "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
     "cafebabefacedbaddecaf888", "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
     "49a6b525b16aedf5aa0de657ba637b39",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b10"
     "56828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
    {"cavp_256_96_128_160", "83688deb4af8007f9b713b47cfa6c73e35ea7a3aa4ecdb414dded03bf7a0fd3a",
     "0b459724904e010a46901cf3", "794a14ccd178c8ebfd1379dc704c5e208f9d8424",
     "33d893a2114ce06fc15d55e454cf90c3", "cc66bee423e3fcd4c0865715e9586696",
     "0fb291bd3dba94a1dfd8b286cfb97ac5"},
};

class GcmKnownAnswer : public ::testing::TestWithParam<GcmVector> {};

} // namespace

TEST_P(GcmKnownAnswer, SealMatchesVector)
{
    const GcmVector& v = GetParam();
    auto key = from_hex(v.key), nonce = from_hex(v.nonce), aad = from_hex(v.aad);
    auto plaintext = from_hex(v.plaintext);
    Aes256Gcm gcm(ByteView(key.data(), key.size()));
    std::vector<uint8_t> out(plaintext.size()), tag(16);
    gcm.seal(nonce.data(), ByteView(aad.data(), aad.size()), ByteView(),
             ByteView(plaintext.data(), plaintext.size()), out.data(), tag.data());
    EXPECT_EQ(to_hex(out), v.ciphertext);
    EXPECT_EQ(to_hex(tag), v.tag);
}

TEST_P(GcmKnownAnswer, OpenMatchesVectorWithAadSplitAnywhere)
{
    const GcmVector& v = GetParam();
    auto key = from_hex(v.key), nonce = from_hex(v.nonce), aad = from_hex(v.aad);
    auto ciphertext = from_hex(v.ciphertext), tag = from_hex(v.tag);
    Aes256Gcm gcm(ByteView(key.data(), key.size()));
    // The AAD is taken in two parts; every split point must give the same result.
    for (size_t split = 0; split <= aad.size(); ++split) {
        std::vector<uint8_t> out(ciphertext.size());
        ASSERT_TRUE(gcm.open(nonce.data(), ByteView(aad.data(), split),
                             ByteView(aad.data() + split, aad.size() - split),
                             ByteView(ciphertext.data(), ciphertext.size()), tag.data(), out.data()));
        EXPECT_EQ(to_hex(out), v.plaintext);
    }
}

TEST_P(GcmKnownAnswer, OpenRejectsEveryFlippedTagBit)
{
    const GcmVector& v = GetParam();
    auto key = from_hex(v.key), nonce = from_hex(v.nonce), aad = from_hex(v.aad);
    auto ciphertext = from_hex(v.ciphertext), tag = from_hex(v.tag);
    Aes256Gcm gcm(ByteView(key.data(), key.size()));
    for (size_t bit = 0; bit < tag.size() * 8; ++bit) {
        auto bad_tag = tag;
        bad_tag[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
        std::vector<uint8_t> out(ciphertext.size(), 0xEE);
        EXPECT_FALSE(gcm.open(nonce.data(), ByteView(aad.data(), aad.size()), ByteView(),
                              ByteView(ciphertext.data(), ciphertext.size()), bad_tag.data(), out.data()));
        // Nothing decrypted without authentication may be left behind.
        for (uint8_t b : out)
            ASSERT_EQ(b, 0);
    }
}

INSTANTIATE_TEST_SUITE_P(Vectors, GcmKnownAnswer, ::testing::ValuesIn(kVectors),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Aes256Gcm, RejectsKeysThatAreNot32Bytes)
{
    std::vector<uint8_t> short_key(16);
    EXPECT_THROW(Aes256Gcm(ByteView(short_key.data(), short_key.size())), Error);
}

TEST(Aes256Gcm, ContextIsReusableAcrossManyMessages)
{
    std::vector<uint8_t> key(32, 7), nonce(12, 1);
    Aes256Gcm gcm(ByteView(key.data(), key.size()));
    for (int i = 0; i < 100; ++i) {
        std::string msg = "message " + std::to_string(i);
        nonce[0] = static_cast<uint8_t>(i);
        std::vector<uint8_t> ct(msg.size()), tag(16), back(msg.size());
        gcm.seal(nonce.data(), ByteView(), ByteView(), ByteView(msg), ct.data(), tag.data());
        ASSERT_TRUE(gcm.open(nonce.data(), ByteView(), ByteView(), ByteView(ct.data(), ct.size()), tag.data(),
                             back.data()));
        ASSERT_EQ(std::string(back.begin(), back.end()), msg);
    }
}
