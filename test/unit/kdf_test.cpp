// HKDF-SHA-256 known answers (RFC 5869 appendix A, test cases 1 and 3), and
// that pgphi's labels give independent keys.
#include <gtest/gtest.h>

#include <vector>

#include "kdf.hpp"
#include "test_util.hpp"

using namespace pgphi;
using pgphi::test::from_hex;
using pgphi::test::to_hex;

TEST(Hkdf, Rfc5869Case1)
{
    std::vector<uint8_t> ikm(22, 0x0b);
    auto salt = from_hex("000102030405060708090a0b0c");
    auto info = from_hex("f0f1f2f3f4f5f6f7f8f9");
    SecureBytes okm = hkdf_sha256(ByteView(ikm.data(), ikm.size()), ByteView(salt.data(), salt.size()),
                                  ByteView(info.data(), info.size()), 42);
    EXPECT_EQ(to_hex(okm.data(), okm.size()),
              "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
}

TEST(Hkdf, Rfc5869Case3WithoutSaltOrInfo)
{
    std::vector<uint8_t> ikm(22, 0x0b);
    SecureBytes okm = hkdf_sha256(ByteView(ikm.data(), ikm.size()), ByteView(), ByteView(), 42);
    EXPECT_EQ(to_hex(okm.data(), okm.size()),
              "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8");
}

TEST(Hkdf, LabelsSeparateTheDerivedKeys)
{
    std::vector<uint8_t> dek(32, 0x42);
    ByteView dek_view(dek.data(), dek.size());
    SecureBytes siv = hkdf_sha256(dek_view, ByteView(), ByteView(kSivKeyLabel), 32);
    SecureBytes index = hkdf_sha256(dek_view, ByteView(), ByteView(kBlindIndexKeyLabel), 32);
    EXPECT_NE(to_hex(siv.data(), 32), to_hex(index.data(), 32));
    EXPECT_NE(to_hex(siv.data(), 32), to_hex(dek));
    EXPECT_NE(to_hex(index.data(), 32), to_hex(dek));
}
