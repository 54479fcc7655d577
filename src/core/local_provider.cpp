#include "local_provider.hpp"

#include <cerrno>
#include <cstring>
#include <string>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "aead.hpp"
#include "encoding.hpp"
#include "error.hpp"
#include "kdf.hpp"
#include "secret_file.hpp"

namespace pgphi {

namespace {

constexpr uint8_t kLayoutVersion = 1;
constexpr size_t kFingerprintSize = 8;
constexpr char kFingerprintLabel[] = "pgphi local KEK fingerprint v1";
constexpr char kWrapLabel[] = "pgphi local DEK wrap v1";

std::string errno_text(int err) { return std::strerror(err); }

void fingerprint(const SecureBytes& kek, uint8_t* out)
{
    uint8_t mac[EVP_MAX_MD_SIZE];
    size_t mac_len = 0;
    if (!EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, kek.data(), kek.size(),
                   reinterpret_cast<const unsigned char*>(kFingerprintLabel), sizeof(kFingerprintLabel) - 1,
                   mac, sizeof(mac), &mac_len) ||
        mac_len < kFingerprintSize)
        throw Error(ErrorCode::Internal, "could not compute the local KEK fingerprint");
    std::memcpy(out, mac, kFingerprintSize);
}

// Associated data of a wrap: the label, then key id and version big-endian.
std::string wrap_aad(const DekBinding& binding)
{
    std::string aad(kWrapLabel, sizeof(kWrapLabel) - 1);
    for (uint32_t v : {binding.key_id, binding.version})
        for (int shift = 24; shift >= 0; shift -= 8)
            aad.push_back(static_cast<char>((v >> shift) & 0xFF));
    return aad;
}

std::string describe_key(const DekBinding& binding)
{
    std::string who = binding.key_name.empty() ? "key id " + std::to_string(binding.key_id)
                                               : "key \"" + binding.key_name + "\"";
    return who + " version " + std::to_string(binding.version);
}

} // namespace

void LocalKeyProvider::check_kek_ref(const std::string& kek_ref)
{
    if (!kek_ref.empty() && kek_ref != kDefaultKekRef)
        throw Error(ErrorCode::InvalidArgument,
                    "the local key provider has no KEK of that name",
                    "The local provider holds a single KEK, in the file named by pgphi.local_kek_file.",
                    "Omit kek, or pass 'default'.");
}

std::string LocalKeyProvider::fingerprint_hex(const SecureBytes& kek)
{
    uint8_t fp[kFingerprintSize];
    fingerprint(kek, fp);
    return hex_lower(ByteView(fp, sizeof(fp)));
}

SecureBytes LocalKeyProvider::load_kek() const
{
    SecureBytes kek;
    try {
        kek = read_secret_file(kek_path_, "local KEK file", 4096);
    } catch (const Error& e) {
        if (e.code() != ErrorCode::SecretFileMissing)
            throw;
        throw Error(ErrorCode::SecretFileMissing, e.what(),
                    "Every key of the local provider is wrapped by the KEK in this file.",
                    "Restore the file from backup, or set pgphi.local_kek_file to where it is.");
    }
    if (kek.size() != kKekSize)
        throw Error(ErrorCode::SecretFileInvalid,
                    "local KEK file \"" + kek_path_ + "\" has the wrong size",
                    "It has " + std::to_string(kek.size()) + " bytes; a KEK is exactly " +
                        std::to_string(kKekSize) + ".");
    return kek;
}

bool LocalKeyProvider::ensure_kek_file()
{
    struct stat st;
    if (stat(kek_path_.c_str(), &st) == 0)
        return false;

    // Written in full to a temporary file, made durable, then linked into
    // place: a crash or a concurrent first key never sees a partial KEK, and
    // link() never replaces a KEK that another session created meanwhile.
    // Every failure removes the temporary file and leaves no KEK behind, so
    // the key creation can simply be retried once the cause is fixed.
    size_t slash = kek_path_.rfind('/');
    std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : kek_path_.substr(0, slash);
    std::string temp = kek_path_ + ".tmp." + std::to_string(getpid());
    auto fail = [&](const std::string& what, int err) {
        ErrorCode code = file_error_code(err);
        throw Error(code, "could not " + what + " local KEK file \"" + kek_path_ + "\": " + errno_text(err),
                    "No key was created.",
                    code == ErrorCode::DiskFull ? "Free space where pgphi.local_kek_file points, then retry."
                    : code == ErrorCode::FileAccessDenied
                        ? "pgphi.local_kek_file must be in a directory the server account can write."
                        : "");
    };

    unlink(temp.c_str()); // only a crashed broker that had our pid can have left it
    FileCloser file{open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, S_IRUSR | S_IWUSR)};
    if (file.fd < 0)
        fail("create", errno);
    SecureBytes kek = SecureBytes::random(kKekSize);
    size_t done = 0;
    while (done < kek.size()) {
        ssize_t n = write(file.fd, kek.data() + done, kek.size() - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            // A write that stops short without an error means no space left.
            int err = n < 0 ? errno : ENOSPC;
            unlink(temp.c_str());
            fail("write", err);
        }
        done += static_cast<size_t>(n);
    }
    if (fsync(file.fd) != 0) {
        int err = errno;
        unlink(temp.c_str());
        fail("write", err);
    }
    bool created = link(temp.c_str(), kek_path_.c_str()) == 0;
    int err = errno;
    unlink(temp.c_str());
    if (!created && err != EEXIST)
        fail("create", err);

    FileCloser dir_file{open(dir.c_str(), O_RDONLY | O_CLOEXEC)};
    if (dir_file.fd < 0 || fsync(dir_file.fd) != 0) {
        err = errno;
        // Not durable means a crash could lose it after keys were wrapped
        // by it: take it back while no key uses it yet (only the broker
        // creates keys, one request at a time).
        if (created)
            unlink(kek_path_.c_str());
        fail("sync the directory of", err);
    }
    return created;
}

WrappedDek LocalKeyProvider::wrap(const std::string& kek_ref, const SecureBytes& dek,
                                  const DekBinding& binding)
{
    check_kek_ref(kek_ref);
    if (dek.size() != kDekSize)
        throw Error(ErrorCode::InvalidArgument, "a DEK must be 32 bytes");
    SecureBytes kek = load_kek();

    WrappedDek wrapped;
    wrapped.blob.resize(kWrappedSize);
    uint8_t* out = wrapped.blob.data();
    out[0] = kLayoutVersion;
    fingerprint(kek, out + 1);
    uint8_t* nonce = out + 1 + kFingerprintSize;
    if (RAND_bytes(nonce, Aes256Gcm::kNonceSize) != 1)
        throw Error(ErrorCode::Internal, "could not draw a random nonce");
    uint8_t* body = nonce + Aes256Gcm::kNonceSize;
    Aes256Gcm cipher(ByteView(kek.data(), kek.size()));
    cipher.seal(nonce, ByteView(wrap_aad(binding)), ByteView(), ByteView(dek.data(), dek.size()), body,
                body + kDekSize);
    wrapped.kek_version = hex_lower(ByteView(out + 1, kFingerprintSize));
    return wrapped;
}

SecureBytes LocalKeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped,
                                     const DekBinding& binding)
{
    check_kek_ref(kek_ref);
    if (wrapped.size != kWrappedSize || wrapped.data[0] != kLayoutVersion)
        throw Error(ErrorCode::WrappedDekInvalid,
                    "wrapped DEK of " + describe_key(binding) + " is not in the local provider's format",
                    "The key catalog entry may have been created by another provider or damaged.");
    SecureBytes kek = load_kek();

    uint8_t configured[kFingerprintSize];
    fingerprint(kek, configured);
    if (CRYPTO_memcmp(configured, wrapped.data + 1, kFingerprintSize) != 0)
        throw Error(ErrorCode::KekMismatch,
                    "the DEK of " + describe_key(binding) + " was wrapped by a different local KEK",
                    "It needs the KEK with fingerprint " + hex_lower(ByteView(wrapped.data + 1, kFingerprintSize)) +
                        "; pgphi.local_kek_file holds the KEK with fingerprint " +
                        hex_lower(ByteView(configured, kFingerprintSize)) + ".",
                    "Point pgphi.local_kek_file at the KEK file these keys were created with.");

    const uint8_t* nonce = wrapped.data + 1 + kFingerprintSize;
    const uint8_t* body = nonce + Aes256Gcm::kNonceSize;
    SecureBytes dek(kDekSize);
    Aes256Gcm cipher(ByteView(kek.data(), kek.size()));
    if (!cipher.open(nonce, ByteView(wrap_aad(binding)), ByteView(), ByteView(body, kDekSize),
                     body + kDekSize, dek.data()))
        throw Error(ErrorCode::WrappedDekInvalid,
                    "the wrapped DEK of " + describe_key(binding) + " failed authentication",
                    "The key catalog entry was altered, or moved from another key or version.");
    return dek;
}

WrappedDek LocalKeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped,
                                    const DekBinding& binding)
{
    // The local KEK has a single version, so rewrapping re-encrypts under a
    // fresh nonce; the DEK exists in plaintext only inside this call.
    SecureBytes dek = unwrap(kek_ref, wrapped, binding);
    return wrap(kek_ref, dek, binding);
}

KekDescription LocalKeyProvider::describe(const std::string& kek_ref)
{
    check_kek_ref(kek_ref);
    return KekDescription{name(), kDefaultKekRef, fingerprint_hex(load_kek())};
}

namespace {

constexpr char kAnchorMacPrefix[] = "local:v1:";

std::string anchor_hmac_hex(const SecureBytes& kek, ByteView message)
{
    SecureBytes key = hkdf_sha256(ByteView(kek.data(), kek.size()), ByteView(), ByteView(kAuditAnchorKeyLabel), 32);
    uint8_t mac[EVP_MAX_MD_SIZE];
    size_t mac_len = 0;
    if (!EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, key.data(), key.size(), message.data,
                   message.size, mac, sizeof(mac), &mac_len) ||
        mac_len != 32)
        throw Error(ErrorCode::Internal, "could not compute the audit anchor's HMAC");
    return kAnchorMacPrefix + hex_lower(ByteView(mac, mac_len));
}

} // namespace

std::string LocalKeyProvider::audit_mac(const std::string& key_ref, ByteView message)
{
    check_kek_ref(key_ref);
    return anchor_hmac_hex(load_kek(), message);
}

bool LocalKeyProvider::verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac)
{
    check_kek_ref(key_ref);
    std::string expected = anchor_hmac_hex(load_kek(), message);
    return mac.size() == expected.size() && CRYPTO_memcmp(mac.data(), expected.data(), mac.size()) == 0;
}

} // namespace pgphi
