// The local file KEK provider: file creation, every refusal of a bad KEK file,
// wrap/unwrap round trips and the binding of a wrapped DEK to its key.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>

#include "error.hpp"
#include "local_provider.hpp"

using namespace pgphi;

namespace {

class LocalProviderTest : public ::testing::Test {
protected:
    void SetUp() override
    {
        char tmpl[] = "/tmp/pgphi-unit-XXXXXX";
        ASSERT_NE(mkdtemp(tmpl), nullptr);
        dir = tmpl;
        path = dir + "/kek";
    }
    void TearDown() override
    {
        unlink(path.c_str());
        rmdir(dir.c_str());
    }

    void write_file(const std::string& content, mode_t mode)
    {
        unlink(path.c_str());
        std::ofstream(path, std::ios::binary) << content;
        chmod(path.c_str(), mode);
    }

    ErrorCode error_of_unwrap(LocalKeyProvider& provider, const WrappedDek& wrapped, const DekBinding& b)
    {
        try {
            provider.unwrap("", ByteView(wrapped.blob.data(), wrapped.blob.size()), b);
        } catch (const Error& e) {
            last_message = e.what();
            return e.code();
        }
        ADD_FAILURE() << "expected an error";
        return ErrorCode::Internal;
    }

    std::string dir, path, last_message;
    DekBinding binding{7, 1, "ssn_key"};
};

bool same_bytes(const SecureBytes& a, const SecureBytes& b)
{
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

} // namespace

TEST_F(LocalProviderTest, CreatesKekFileOwnerOnly)
{
    LocalKeyProvider provider(path);
    EXPECT_TRUE(provider.ensure_kek_file());
    EXPECT_FALSE(provider.ensure_kek_file()); // never replaces an existing KEK
    struct stat st;
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_EQ(st.st_size, 32);
}

namespace {

// Names in a directory, "." and ".." aside.
std::string files_in(const std::string& dir)
{
    std::string names;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* entry = readdir(d))
            if (std::strcmp(entry->d_name, ".") != 0 && std::strcmp(entry->d_name, "..") != 0)
                names += std::string(names.empty() ? "" : " ") + entry->d_name;
        closedir(d);
    }
    return names;
}

// Creates the KEK file and returns the error code it fails with.
ErrorCode error_of_create(LocalKeyProvider& provider, std::string* message)
{
    try {
        provider.ensure_kek_file();
    } catch (const Error& e) {
        *message = e.what();
        return e.code();
    }
    ADD_FAILURE() << "expected an error";
    return ErrorCode::Internal;
}

} // namespace

// A full disk, emulated by a file-size limit as in a server (which ignores
// SIGXFSZ): the KEK file is refused as disk full, and nothing is left behind.
TEST_F(LocalProviderTest, DiskFullLeavesNoKekFile)
{
    struct rlimit saved;
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
    struct sigaction ignore {}, previous {};
    ignore.sa_handler = SIG_IGN;
    ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &previous), 0);
    for (rlim_t limit : {rlim_t{0}, rlim_t{16}}) { // nothing fits; half the KEK fits
        struct rlimit small = saved;
        small.rlim_cur = limit;
        ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
        LocalKeyProvider provider(path);
        std::string message;
        ErrorCode code = error_of_create(provider, &message);
        setrlimit(RLIMIT_FSIZE, &saved);
        EXPECT_EQ(code, ErrorCode::DiskFull) << message;
        EXPECT_NE(message.find("could not write local KEK file \"" + path + "\": File too large"), std::string::npos)
            << message;
        EXPECT_EQ(files_in(dir), "") << "limit " << limit;
    }
    sigaction(SIGXFSZ, &previous, nullptr);

    LocalKeyProvider provider(path);
    EXPECT_TRUE(provider.ensure_kek_file()); // space is back
    EXPECT_EQ(files_in(dir), "kek");
}

TEST(FileErrorCode, ClassifiesErrnoAsPostgreSqlDoes)
{
    EXPECT_EQ(file_error_code(ENOSPC), ErrorCode::DiskFull);
    EXPECT_EQ(file_error_code(EDQUOT), ErrorCode::DiskFull);
    EXPECT_EQ(file_error_code(EFBIG), ErrorCode::DiskFull);
    EXPECT_EQ(file_error_code(EACCES), ErrorCode::FileAccessDenied);
    EXPECT_EQ(file_error_code(EROFS), ErrorCode::FileAccessDenied);
    EXPECT_EQ(file_error_code(EIO), ErrorCode::Io);
}

TEST_F(LocalProviderTest, GeneratedDekUnwrapsToTheSameBytes)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    EXPECT_EQ(generated.plaintext.size(), 32u);
    EXPECT_EQ(generated.wrapped.blob.size(), LocalKeyProvider::kWrappedSize);
    EXPECT_EQ(generated.wrapped.kek_version.size(), 16u);
    SecureBytes back = provider.unwrap(
        "default", ByteView(generated.wrapped.blob.data(), generated.wrapped.blob.size()), binding);
    EXPECT_TRUE(same_bytes(back, generated.plaintext));
}

TEST_F(LocalProviderTest, WrappedDekDoesNotContainThePlaintext)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    const auto& blob = generated.wrapped.blob;
    EXPECT_EQ(std::search(blob.begin(), blob.end(), generated.plaintext.data(),
                          generated.plaintext.data() + 8),
              blob.end());
}

TEST_F(LocalProviderTest, RewrapKeepsTheDekAndChangesTheBlob)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    WrappedDek rewrapped = provider.rewrap(
        "", ByteView(generated.wrapped.blob.data(), generated.wrapped.blob.size()), binding);
    EXPECT_NE(rewrapped.blob, generated.wrapped.blob);
    SecureBytes back = provider.unwrap("", ByteView(rewrapped.blob.data(), rewrapped.blob.size()), binding);
    EXPECT_TRUE(same_bytes(back, generated.plaintext));
}

TEST_F(LocalProviderTest, WrappedDekIsBoundToKeyIdAndVersion)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, DekBinding{7, 2, "ssn_key"}),
              ErrorCode::WrappedDekInvalid);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, DekBinding{8, 1, "mrn_key"}),
              ErrorCode::WrappedDekInvalid);
    EXPECT_NE(last_message.find("failed authentication"), std::string::npos);
}

TEST_F(LocalProviderTest, AnotherKekIsNamedByFingerprint)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    unlink(path.c_str());
    provider.ensure_kek_file(); // a different KEK now
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::KekMismatch);
    EXPECT_NE(last_message.find("different local KEK"), std::string::npos);
}

TEST_F(LocalProviderTest, MissingKekFileIsNotRecreatedByUnwrap)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    unlink(path.c_str());
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::SecretFileMissing);
    EXPECT_NE(access(path.c_str(), F_OK), 0);
}

TEST_F(LocalProviderTest, RefusesBadKekFiles)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);

    write_file(std::string(31, 'k'), 0600);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::SecretFileInvalid);
    EXPECT_NE(last_message.find("wrong size"), std::string::npos);

    write_file(std::string(33, 'k'), 0600);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::SecretFileInvalid);

    write_file(std::string(32, 'k'), 0640);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::SecretFileInvalid);
    EXPECT_NE(last_message.find("group or others"), std::string::npos);

    unlink(path.c_str());
    ASSERT_EQ(mkdir(path.c_str(), 0700), 0);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::SecretFileInvalid);
    rmdir(path.c_str());
}

// A partial KEK (as a crash while writing one could leave) is refused, never
// replaced; pgphi itself writes the KEK to a temporary file and links it.
TEST_F(LocalProviderTest, EmptyKekFileIsRefusedNotReplaced)
{
    write_file("", 0600);
    LocalKeyProvider provider(path);
    EXPECT_FALSE(provider.ensure_kek_file());
    std::string message;
    try {
        provider.generate_dek("", binding);
        FAIL();
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::SecretFileInvalid);
        message = e.what();
    }
    EXPECT_NE(message.find("wrong size"), std::string::npos);
}

TEST_F(LocalProviderTest, FifoAtKekPathDoesNotBlock)
{
    ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);
    LocalKeyProvider provider(path);
    DekBinding b{1, 1, "k"};
    std::vector<uint8_t> blob(LocalKeyProvider::kWrappedSize, 0);
    blob[0] = 1;
    WrappedDek wrapped{blob, ""};
    EXPECT_EQ(error_of_unwrap(provider, wrapped, b), ErrorCode::SecretFileInvalid);
    EXPECT_NE(last_message.find("not a regular file"), std::string::npos);
}

TEST_F(LocalProviderTest, UnreadableKekFileIsRefused)
{
    if (geteuid() == 0)
        GTEST_SKIP() << "root reads files whatever their mode";
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    chmod(path.c_str(), 0);
    EXPECT_EQ(error_of_unwrap(provider, generated.wrapped, binding), ErrorCode::SecretFileInvalid);
    EXPECT_NE(last_message.find("could not open"), std::string::npos);
}

TEST_F(LocalProviderTest, OnlyTheDefaultKekExists)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    EXPECT_THROW(provider.generate_dek("other", binding), Error);
    EXPECT_EQ(provider.describe("").kek_ref, "default");
}

TEST_F(LocalProviderTest, DamagedWrappedDekIsRefused)
{
    LocalKeyProvider provider(path);
    provider.ensure_kek_file();
    GeneratedDek generated = provider.generate_dek("", binding);
    WrappedDek shorter = generated.wrapped;
    shorter.blob.pop_back();
    EXPECT_EQ(error_of_unwrap(provider, shorter, binding), ErrorCode::WrappedDekInvalid);
    WrappedDek flipped = generated.wrapped;
    flipped.blob[30] ^= 1;
    EXPECT_EQ(error_of_unwrap(provider, flipped, binding), ErrorCode::WrappedDekInvalid);
}

namespace {

// Audit anchors: HMAC-SHA-256 under a key derived from the KEK with its own
// label. Checked against an independent computation (OpenSSL's HKDF and
// HMAC called directly), so the label and layout are pinned.
class LocalAnchorTest : public LocalProviderTest {};

std::string independent_anchor_mac(const std::string& kek, const std::string& message)
{
    unsigned char key[32];
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
    const char label[] = "pgphi v1 audit anchor HMAC-SHA-256 key";
    size_t key_len = sizeof(key);
    bool ok = ctx && EVP_PKEY_derive_init(ctx) > 0 && EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
              EVP_PKEY_CTX_set1_hkdf_key(ctx, reinterpret_cast<const unsigned char*>(kek.data()),
                                         static_cast<int>(kek.size())) > 0 &&
              EVP_PKEY_CTX_add1_hkdf_info(ctx, reinterpret_cast<const unsigned char*>(label),
                                          sizeof(label) - 1) > 0 &&
              EVP_PKEY_derive(ctx, key, &key_len) > 0;
    EVP_PKEY_CTX_free(ctx);
    if (!ok)
        return "";
    unsigned char mac[32];
    unsigned int mac_len = 0;
    HMAC(EVP_sha256(), key, sizeof(key), reinterpret_cast<const unsigned char*>(message.data()), message.size(),
         mac, &mac_len);
    std::string hex = "local:v1:";
    char byte[3];
    for (unsigned i = 0; i < mac_len; ++i) {
        snprintf(byte, sizeof(byte), "%02x", mac[i]);
        hex += byte;
    }
    return hex;
}

TEST_F(LocalAnchorTest, MacIsHmacUnderTheDerivedKeyAndVerifies)
{
    std::string kek(32, '\0');
    for (size_t i = 0; i < kek.size(); ++i)
        kek[i] = static_cast<char>(i * 7 + 1);
    write_file(kek, 0600);
    LocalKeyProvider provider(path);
    std::string message = "pgphi audit anchor v1\n1\n2\n3\nabcd\n";
    std::string mac = provider.audit_mac("", ByteView(message));
    EXPECT_EQ(mac, independent_anchor_mac(kek, message));
    EXPECT_EQ(provider.audit_mac("default", ByteView(message)), mac);
    EXPECT_TRUE(provider.verify_audit_mac("", ByteView(message), mac));
    EXPECT_FALSE(provider.verify_audit_mac("", ByteView(message + "x"), mac));
    std::string flipped = mac;
    flipped.back() = flipped.back() == '0' ? '1' : '0';
    EXPECT_FALSE(provider.verify_audit_mac("", ByteView(message), flipped));
    EXPECT_FALSE(provider.verify_audit_mac("", ByteView(message), mac.substr(0, mac.size() - 2)));
    EXPECT_FALSE(provider.verify_audit_mac("", ByteView(message), "vault:v1:" + mac.substr(9)));

    // Another KEK: another MAC, and the first one no longer verifies.
    kek[0] ^= 1;
    write_file(kek, 0600);
    EXPECT_NE(provider.audit_mac("", ByteView(message)), mac);
    EXPECT_FALSE(provider.verify_audit_mac("", ByteView(message), mac));
}

TEST_F(LocalAnchorTest, RefusesOtherKeysAndAMissingKek)
{
    LocalKeyProvider provider(path);
    std::string message = "m";
    try {
        provider.audit_mac("", ByteView(message));
        ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::SecretFileMissing);
    }
    write_file(std::string(32, 'k'), 0600);
    try {
        provider.audit_mac("other", ByteView(message));
        ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    }
}

} // namespace
