// The local file key provider, pgphi's embedded default: the KEK is 32 random
// bytes in a file that only the server account may read, created on first use.
// It is meant for development and demos: anyone who can read the data
// directory's neighbourhood can read the KEK, which is exactly what a key
// manager prevents. The server log says so.
//
// Wrapped DEK layout (69 bytes):
//   0      1   layout version (1)
//   1      8   KEK fingerprint: HMAC-SHA-256(KEK, label), first 8 bytes
//   9      12  nonce
//   21     32  AES-256-GCM ciphertext of the DEK
//   53     16  tag
// The associated data binds the key id and version (see DekBinding).
#pragma once

#include <string>

#include "key_provider.hpp"

namespace pgphi {

class LocalKeyProvider final : public KeyProvider {
public:
    static constexpr size_t kKekSize = 32;
    static constexpr size_t kWrappedSize = 69;
    static constexpr const char* kDefaultKekRef = "default";

    explicit LocalKeyProvider(std::string kek_path) : kek_path_(std::move(kek_path)) {}

    const char* name() const override { return "local"; }

    WrappedDek wrap(const std::string& kek_ref, const SecureBytes& dek,
                    const DekBinding& binding) override;
    SecureBytes unwrap(const std::string& kek_ref, ByteView wrapped,
                       const DekBinding& binding) override;
    WrappedDek rewrap(const std::string& kek_ref, ByteView wrapped,
                      const DekBinding& binding) override;
    KekDescription describe(const std::string& kek_ref) override;

    // "local:v1:" and the hex of HMAC-SHA-256(HKDF(KEK, kAuditAnchorKeyLabel), message).
    std::string audit_mac(const std::string& key_ref, ByteView message) override;
    bool verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac) override;

    // Creates the KEK file (mode 0600) if it does not exist yet. Returns true
    // when it created one. Only key creation calls this: an unwrap must never
    // invent a new KEK in place of a lost one.
    bool ensure_kek_file();

    // Hex of the KEK's 8-byte fingerprint, for messages and the inventory.
    static std::string fingerprint_hex(const SecureBytes& kek);

    const std::string& kek_path() const { return kek_path_; }

private:
    SecureBytes load_kek() const;
    static void check_kek_ref(const std::string& kek_ref);

    std::string kek_path_;
};

} // namespace pgphi
