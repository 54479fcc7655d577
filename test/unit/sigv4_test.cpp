// AWS Signature Version 4 against the official test suite, vendored in
// data/sigv4/ with its licence. Every case checks the canonical request, the
// string to sign and the Authorization header.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "sigv4.hpp"

using namespace pgphi;
namespace fs = std::filesystem;

namespace {

const char* kAmzDate = "20150830T123600Z";
const sigv4::Scope kScope{"20150830", "us-east-1", "service"};

std::string slurp(const fs::path& path)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

// Parses a suite .req file: "METHOD target HTTP/1.1", header lines (a line
// starting with whitespace continues the previous header with another value),
// a blank line, then the body.
sigv4::Request parse_request(const std::string& text)
{
    sigv4::Request request;
    std::istringstream in(text);
    std::string line;
    std::getline(in, line);
    size_t first_space = line.find(' ');
    size_t last_space = line.rfind(' ');
    request.method = line.substr(0, first_space);
    std::string target = line.substr(first_space + 1, last_space - first_space - 1);
    size_t question = target.find('?');
    request.path = target.substr(0, question);
    request.query = question == std::string::npos ? "" : target.substr(question + 1);

    std::string last_name;
    while (std::getline(in, line)) {
        if (!line.empty() && line.back() == '\r')
            line.pop_back();
        if (line.empty())
            break;
        if ((line[0] == ' ' || line[0] == '\t') && !last_name.empty()) {
            request.headers.emplace_back(last_name, line);
            continue;
        }
        size_t colon = line.find(':');
        last_name = line.substr(0, colon);
        request.headers.emplace_back(last_name, line.substr(colon + 1));
    }
    std::stringstream rest;
    rest << in.rdbuf();
    request.payload = rest.str();
    return request;
}

std::vector<fs::path> suite_cases()
{
    std::vector<fs::path> cases;
    fs::path root = fs::path(PGPHI_TEST_DATA_DIR) / "sigv4";
    for (const auto& entry : fs::recursive_directory_iterator(root))
        if (entry.path().extension() == ".req")
            cases.push_back(entry.path());
    std::sort(cases.begin(), cases.end());
    return cases;
}

std::string without_trailing_newline(std::string s)
{
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r'))
        s.pop_back();
    return s;
}

} // namespace

TEST(SigV4, OfficialTestSuite)
{
    sigv4::Credentials credentials{"AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", ""};
    auto cases = suite_cases();
    ASSERT_GE(cases.size(), 20u) << "the vendored SigV4 suite is missing";
    for (const fs::path& req : cases) {
        SCOPED_TRACE(req.stem().string());
        fs::path base = req;
        base.replace_extension();
        sigv4::Request request = parse_request(slurp(req));
        std::string canonical = sigv4::canonical_request(request);
        EXPECT_EQ(canonical, without_trailing_newline(slurp(base.string() + ".creq")));
        std::string to_sign = sigv4::string_to_sign(kAmzDate, kScope, canonical);
        EXPECT_EQ(to_sign, without_trailing_newline(slurp(base.string() + ".sts")));
        EXPECT_EQ(sigv4::authorization_header(request, credentials, kScope, kAmzDate),
                  without_trailing_newline(slurp(base.string() + ".authz")));
    }
}

TEST(SigV4, SignAddsDateAndSessionToken)
{
    sigv4::Credentials credentials{"AKIDEXAMPLE", "secret", "session-token"};
    sigv4::Request request{"POST", "/", "", {{"host", "kms.us-east-1.amazonaws.com"}}, "{}"};
    std::string authorization = sigv4::sign(request, credentials, "us-east-1", "kms", 1440938160);
    EXPECT_EQ(sigv4::amz_date(1440938160), kAmzDate);
    EXPECT_NE(authorization.find("Credential=AKIDEXAMPLE/20150830/us-east-1/kms/aws4_request"), std::string::npos);
    EXPECT_NE(authorization.find("SignedHeaders=host;x-amz-date;x-amz-security-token"), std::string::npos);
}
