// The PKCS#11 key provider: the KEK is a non-extractable, sensitive AES key
// object on an HSM or token, reached through the vendor's PKCS#11 module
// (a shared library loaded with dlopen). pgphi asks the token to encrypt and
// decrypt DEKs with it and never sees the KEK.
//
// KEK references (the `kek` of create_key):
//   label:NAME  version 1 is the secret-key object whose CKA_LABEL is NAME,
//               version N >= 2 the one labelled NAME.vN
//   id:HEX      version 1 is the object whose CKA_ID is the bytes HEX,
//               version N >= 2 the one whose CKA_ID is those bytes followed
//               by N as two big-endian bytes
// New wraps use the newest version present; create_kek() makes the
// next one on the token (C_GenerateKey), and rewrap moves a DEK to it.
//
// Wrapped DEK layout:
//   0   1   layout version (1)
//   1   1   mechanism: 1 CKM_AES_GCM, 2 CKM_AES_KEY_WRAP_PAD
//   2   4   KEK version N, big-endian
//   CKM_AES_GCM:          6: 12-byte IV, 32-byte ciphertext, 16-byte tag;
//                         the additional data is a label, bytes 0..5, the
//                         key id and the DEK version
//   CKM_AES_KEY_WRAP_PAD: 6: 48 bytes, the key wrap (RFC 5649) of the key id,
//                         the DEK version and the DEK, as a generic secret
// CKM_AES_GCM is used when the token can encrypt and decrypt with it, else
// CKM_AES_KEY_WRAP_PAD (pgphi.pkcs11_mechanism can force either).
//
// One session per process, logged in as CKU_USER with the PIN from a 0600
// file. The module is initialised (C_Initialize with CKF_OS_LOCKING_OK) at
// the first call in the process that makes it, never before, and again in a
// process forked after that. A session that the token invalidated (token
// reset or removed, device error, logged out) is reopened and logged in once
// per call. A PIN the token refused is not tried again until the PIN file
// changes: a second try could lock the PIN.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "key_provider.hpp"

namespace pgphi {

struct Pkcs11Settings {
    std::string module_path;   // the vendor's PKCS#11 library
    std::string token_label;   // the token, by label ...
    long slot_id = -1;         // ... or by slot id (-1: by label)
    std::string pin_file;      // the user PIN, mode 0600
    std::string mechanism = "auto"; // auto, aes_gcm or aes_key_wrap_pad
};

class Pkcs11KeyProvider final : public KeyProvider {
public:
    explicit Pkcs11KeyProvider(Pkcs11Settings settings);
    ~Pkcs11KeyProvider() override;

    const char* name() const override { return "pkcs11"; }

    WrappedDek wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding) override;
    SecureBytes unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    // Unwraps on the token and wraps again under the newest KEK version.
    WrappedDek rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    KekDescription describe(const std::string& kek_ref) override;
    // Generates the next KEK version on the token (version 1 if none exists).
    std::string create_kek(const std::string& kek_ref) override;
    // A dedicated KEK: version 1 of a label (or id) no key on the token has
    // yet; deleting it destroys every version of it on the token.
    std::string create_dedicated_kek(const std::string& kek_name, const std::string& key_name) override;
    std::string delete_dedicated_kek(const std::string& kek_ref) override;

    // PKCS#11 functions called so far (C_Encrypt, C_Decrypt, C_FindObjects,
    // ...), for tests.
    uint64_t token_calls() const;

    // Closes the session and finalizes the module, as a token reset would
    // (tests).
    void drop_session_for_testing();

    struct State;

private:
    std::unique_ptr<State> state_;
};

} // namespace pgphi
