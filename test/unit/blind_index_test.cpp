// Blind indexes: HMAC-SHA-256 known answers (RFC 4231 test cases 1 and 2),
// truncation, and each normalisation.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "blind_index.hpp"
#include "error.hpp"
#include "test_util.hpp"

using namespace pgphi;
using pgphi::test::to_hex;

namespace {

std::string index_of(BlindIndexer& indexer, const std::string& value)
{
    std::vector<uint8_t> out(indexer.index_bytes());
    indexer.compute(ByteView(value), out.data());
    return to_hex(out);
}

} // namespace

TEST(BlindIndexer, MatchesHmacSha256Vectors)
{
    std::vector<uint8_t> key1(20, 0x0b);
    BlindIndexer a(ByteView(key1.data(), key1.size()), Normalization::None, 32);
    EXPECT_EQ(index_of(a, "Hi There"), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
    BlindIndexer b(ByteView("Jefe"), Normalization::None, 32);
    // Computed twice: each computation restarts from the keyed state.
    for (int i = 0; i < 2; ++i)
        EXPECT_EQ(index_of(b, "what do ya want for nothing?"),
                  "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(BlindIndexer, TruncatesToTheConfiguredLength)
{
    BlindIndexer full(ByteView("Jefe"), Normalization::None, 32);
    BlindIndexer short_index(ByteView("Jefe"), Normalization::None, 8);
    std::string expected = index_of(full, "what do ya want for nothing?").substr(0, 16);
    EXPECT_EQ(index_of(short_index, "what do ya want for nothing?"), expected);
    EXPECT_THROW(BlindIndexer(ByteView("Jefe"), Normalization::None, 7), Error);
    EXPECT_THROW(BlindIndexer(ByteView("Jefe"), Normalization::None, 33), Error);
}

TEST(BlindIndexer, NormalisationsAreByteWiseAndAsciiOnly)
{
    auto n = [](const std::string& v, Normalization how) { return normalize(ByteView(v), how); };
    EXPECT_EQ(n(" \t123-45-6789\r\n", Normalization::None), " \t123-45-6789\r\n");
    EXPECT_EQ(n(" \t123-45-6789\r\n", Normalization::Trim), "123-45-6789");
    EXPECT_EQ(n("  \n\v\f ", Normalization::Trim), "");
    EXPECT_EQ(n(" MRN-00A7 ", Normalization::Lower), " mrn-00a7 ");
    EXPECT_EQ(n(" MRN-00A7 ", Normalization::TrimLower), "mrn-00a7");
    // Non-ASCII bytes (here UTF-8 for "É") are left as they are.
    EXPECT_EQ(n("JOS\xc3\x89", Normalization::Lower), "jos\xc3\x89");
    EXPECT_EQ(n("123-45-6789", Normalization::Digits), "123456789");
    EXPECT_EQ(n("(555) 010 9999 ext. 7", Normalization::Digits), "55501099997");
    // Longer than the internal chunk: nothing is lost at the boundaries.
    std::string long_value(1000, 'A');
    EXPECT_EQ(n(long_value, Normalization::Lower), std::string(1000, 'a'));
}

TEST(BlindIndexer, EqualAfterNormalisationMeansEqualIndex)
{
    BlindIndexer trim_lower(ByteView("k"), Normalization::TrimLower, 16);
    EXPECT_EQ(index_of(trim_lower, "  Jane.Doe@Example.org "), index_of(trim_lower, "jane.doe@example.org"));
    EXPECT_NE(index_of(trim_lower, "jane.doe@example.org"), index_of(trim_lower, "jane.doe@example.com"));
    BlindIndexer digits(ByteView("k"), Normalization::Digits, 16);
    EXPECT_EQ(index_of(digits, "123-45-6789"), index_of(digits, "123 45 6789"));
    BlindIndexer none(ByteView("k"), Normalization::None, 16);
    EXPECT_NE(index_of(none, "123-45-6789"), index_of(none, "123 45 6789"));
    // The index is a keyed function: another key gives another index.
    BlindIndexer other(ByteView("other key"), Normalization::None, 16);
    EXPECT_NE(index_of(none, "123-45-6789"), index_of(other, "123-45-6789"));
}

TEST(BlindIndexer, NamesRoundTrip)
{
    for (const char* name : {"none", "trim", "lower", "trim_lower", "digits"}) {
        Normalization n;
        ASSERT_TRUE(normalization_from_name(name, &n)) << name;
        EXPECT_STREQ(normalization_name(n), name);
    }
    Normalization n;
    EXPECT_FALSE(normalization_from_name("upper", &n));
    EXPECT_FALSE(normalization_from_name("", &n));
}
