#include <gtest/gtest.h>

#include "key_ring.hpp"

using namespace pgphi;
using format::KeyRef;

TEST(KeyRing, FindsByReferenceAndActiveName)
{
    KeyRing ring;
    ring.install(KeyRef{1, 1}, "ssn_key", false, SecureBytes::random(32));
    ring.install(KeyRef{1, 2}, "ssn_key", true, SecureBytes::random(32));
    ring.install(KeyRef{2, 1}, "mrn_key", true, SecureBytes::random(32));

    ASSERT_NE(ring.find(KeyRef{1, 1}), nullptr);
    EXPECT_EQ(ring.find(KeyRef{1, 1})->ref().version, 1u);
    EXPECT_EQ(ring.find(KeyRef{3, 1}), nullptr);
    ASSERT_NE(ring.find_active("ssn_key"), nullptr);
    EXPECT_EQ(ring.find_active("ssn_key")->ref().version, 2u);
    EXPECT_EQ(ring.find_active("mrn_key")->ref().key_id, 2u);
    EXPECT_EQ(ring.find_active("nope"), nullptr);
}

TEST(KeyRing, ReinstallingAKeyDropsItsActiveRole)
{
    KeyRing ring;
    ring.install(KeyRef{1, 1}, "ssn_key", true, SecureBytes::random(32));
    ASSERT_NE(ring.find_active("ssn_key"), nullptr);
    ring.install(KeyRef{1, 1}, "ssn_key", false, SecureBytes::random(32));
    EXPECT_EQ(ring.find_active("ssn_key"), nullptr);
    EXPECT_NE(ring.find(KeyRef{1, 1}), nullptr);
}

TEST(KeyRing, ClearForgetsEverything)
{
    KeyRing ring;
    ring.install(KeyRef{1, 1}, "ssn_key", true, SecureBytes::random(32));
    ring.find(KeyRef{1, 1});
    ring.find_active("ssn_key");
    ring.clear();
    EXPECT_EQ(ring.size(), 0u);
    EXPECT_EQ(ring.find(KeyRef{1, 1}), nullptr);
    EXPECT_EQ(ring.find_active("ssn_key"), nullptr);
}

TEST(SecureBytes, MoveLeavesSourceEmpty)
{
    SecureBytes a = SecureBytes::random(32);
    const uint8_t* p = a.data();
    SecureBytes b = std::move(a);
    EXPECT_EQ(a.size(), 0u);
    EXPECT_EQ(a.data(), nullptr);
    EXPECT_EQ(b.data(), p);
    b.clear();
    EXPECT_TRUE(b.empty());
}
