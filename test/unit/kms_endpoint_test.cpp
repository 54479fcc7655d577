// KMS endpoints: pgphi's derivation from the region against botocore's own
// endpoint rules for every region botocore knows (generated: the cases come
// from botocore's partitions.json and KMS rule set, through
// data/botocore_kms_endpoints.py), and endpoint parsing that keeps the
// signed Host and path equal to what libcurl sends.
#include <gtest/gtest.h>

#include <cstdio>
#include <sstream>
#include <string>

#include "error.hpp"
#include "http_client.hpp"
#include "kms_provider.hpp"

using namespace pgphi;

TEST(KmsEndpoint, MatchesBotocoreEndpointRulesForEveryRegion)
{
    std::string command = std::string("/usr/bin/python3 ") + PGPHI_TEST_DATA_DIR + "/botocore_kms_endpoints.py";
    FILE* pipe = popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    char line[512];
    int compared = 0, partitions_seen = 0;
    std::string previous_suffix;
    while (fgets(line, sizeof(line), pipe)) {
        std::istringstream in(line);
        std::string region, url;
        int fips = 0, dualstack = 0;
        ASSERT_TRUE(static_cast<bool>(in >> region >> fips >> dualstack >> url)) << line;
        if (url == "-")
            continue; // botocore's data refuses it (older data: no dual-stack in the ISO partitions)
        EXPECT_EQ(kms_default_endpoint(region, fips, dualstack), url) << region << " fips=" << fips
                                                                      << " dualstack=" << dualstack;
        ++compared;
        std::string suffix = url.substr(url.find(region) + region.size());
        if (!fips && !dualstack && suffix != previous_suffix) {
            ++partitions_seen;
            previous_suffix = suffix;
        }
    }
    ASSERT_EQ(pclose(pipe), 0);
    EXPECT_GT(compared, 100);
    EXPECT_GE(partitions_seen, 4); // aws, aws-cn, aws-iso, aws-iso-b at least (aws-us-gov shares aws's)
}

// Partitions newer than Debian's botocore (its 1.43 partitions.json).
TEST(KmsEndpoint, NewerPartitions)
{
    EXPECT_EQ(kms_default_endpoint("eusc-de-east-1", false, false), "https://kms.eusc-de-east-1.amazonaws.eu");
    EXPECT_EQ(kms_default_endpoint("eusc-de-east-1", true, true),
              "https://kms-fips.eusc-de-east-1.api.amazonwebservices.eu");
    EXPECT_EQ(kms_default_endpoint("eu-isoe-west-1", false, false), "https://kms.eu-isoe-west-1.cloud.adc-e.uk");
    EXPECT_EQ(kms_default_endpoint("us-isof-south-1", false, true), "https://kms.us-isof-south-1.api.aws.hci.ic.gov");
    EXPECT_EQ(kms_default_endpoint("us-iso-east-1", false, true), "https://kms.us-iso-east-1.api.aws.ic.gov");
    EXPECT_EQ(kms_default_endpoint("us-gov-east-1", true, false), "https://kms-fips.us-gov-east-1.amazonaws.com");
    // A region no partition knows yet takes aws's suffixes, as the rules do.
    EXPECT_EQ(kms_default_endpoint("xx-moon-1", false, false), "https://kms.xx-moon-1.amazonaws.com");
    for (const char* bad : {"", "US-EAST-1", "us-east-1.evil.example/", "-us-east-1", "us east 1"}) {
        try {
            kms_default_endpoint(bad, false, false);
            ADD_FAILURE() << "accepted region \"" << bad << "\"";
        } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::ConfigError);
        }
    }
}

TEST(KmsEndpoint, ParsingKeepsSignedHostAndPathEqualToTheRequest)
{
    struct Case {
        const char* url;
        const char* origin;
        const char* host;
        const char* path;
    } cases[] = {
        {"https://kms.us-east-1.amazonaws.com", "https://kms.us-east-1.amazonaws.com", "kms.us-east-1.amazonaws.com", "/"},
        {"https://vpce-1.kms.us-east-1.vpce.amazonaws.com:443", "https://vpce-1.kms.us-east-1.vpce.amazonaws.com",
         "vpce-1.kms.us-east-1.vpce.amazonaws.com", "/"},
        {"https://host.example/", "https://host.example", "host.example", "/"},
        {"https://host.example:8443//", "https://host.example:8443", "host.example:8443", "/"},
        {"https://proxy.example/kms/", "https://proxy.example", "proxy.example", "/kms/"},
        {"http://127.0.0.1:80/a//b", "http://127.0.0.1", "127.0.0.1", "/a/b"},
        {"https://[::1]:9443", "https://[::1]:9443", "[::1]:9443", "/"},
    };
    for (const Case& c : cases) {
        Endpoint endpoint = parse_endpoint(c.url, "AWS KMS");
        EXPECT_EQ(endpoint.origin, c.origin) << c.url;
        EXPECT_EQ(endpoint.host_header, c.host) << c.url;
        EXPECT_EQ(endpoint.path, c.path) << c.url;
    }
    for (const char* bad : {"not a url", "https://host.example/?x=1"}) {
        try {
            parse_endpoint(bad, "AWS KMS");
            ADD_FAILURE() << "accepted " << bad;
        } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::ConfigError);
        }
    }
}

TEST(RetryPolicy, DefaultsAreTheSdkStandardMode)
{
    RetryPolicy policy;
    EXPECT_EQ(policy.max_attempts, 3);
    EXPECT_EQ(policy.base_delay.count(), 1000);
    EXPECT_EQ(policy.max_delay.count(), 20000);
}

TEST(RetryPolicy, RetryAfterIsHonouredUpToTheCap)
{
    RetryPolicy policy;
    policy.base_delay = std::chrono::milliseconds(1);
    policy.max_delay = std::chrono::milliseconds(3000);
    std::vector<long long> slept;
    auto record = [&](std::chrono::milliseconds d) { slept.push_back(d.count()); };
    with_retries(policy, [&](int n) {
        request_retry_delay(std::chrono::seconds(n == 1 ? 2 : 60));
        return false;
    }, record);
    ASSERT_EQ(slept.size(), 2u);
    EXPECT_GE(slept[0], 2000);
    EXPECT_EQ(slept[1], 3000); // 60 s asked, capped at max_delay
}
