// The KMIP key provider: the KEK is a symmetric (AES) key object on a KMIP
// 1.4 server, named by its Name attribute or by its Unique Identifier. DEKs
// are wrapped and unwrapped by the server's Encrypt and Decrypt with AES-GCM,
// with the DEK's key id and version as authenticated data; the KEK never
// leaves the server (pgphi never sends Get).
//
// A wrapped DEK records the unique identifier of the object that wrapped it,
// so an unwrap is one Decrypt. A name resolves to the newest active object
// of that name (Locate answers newest first); a new KEK version is a new
// object of the same name, made by the server's administrator (or Re-key on
// servers that have it) or by pgphi on request (create_kek), and
// rewrap_keys moves DEKs onto it. The state of a KEK that refuses to work
// (pre-active, deactivated, compromised, destroyed) is asked for only then,
// and reported as KeyManagerKeyDisabled (55000).
#pragma once

#include <string>

#include "http_client.hpp"
#include "key_provider.hpp"
#include "kmip_client.hpp"
#include "kmip_messages.hpp"

namespace pgphi {

struct KmipSettings {
    kmip::ClientSettings client;
    RetryPolicy retry;
};

// The wrapped DEK's format (stored in the key catalog): version byte 1, the
// KEK object's unique identifier (2-byte big-endian length, then the text),
// the 12-byte GCM IV, the 16-byte tag, and the ciphertext.
struct KmipWrapped {
    std::string unique_id;
    std::vector<uint8_t> iv, tag, ciphertext;

    std::vector<uint8_t> serialize() const;
    static KmipWrapped parse(ByteView blob);   // WrappedDekInvalid when malformed
};

// The authenticated data bound to a wrapped DEK: its key id and version.
std::vector<uint8_t> kmip_dek_aad(const DekBinding& binding);

class KmipKeyProvider final : public KeyProvider {
public:
    explicit KmipKeyProvider(KmipSettings settings);

    const char* name() const override { return "kmip"; }

    WrappedDek wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding) override;
    SecureBytes unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    WrappedDek rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding) override;
    KekDescription describe(const std::string& kek_ref) override;
    std::string create_kek(const std::string& kek_name) override;
    // Create and Activate under a Name no object has yet; the reference is
    // the new object's Unique Identifier, so no later key of that name can
    // take its place. Deletion: Revoke (Cessation of Operation), then Destroy.
    std::string create_dedicated_kek(const std::string& kek_name, const std::string& key_name) override;
    std::string delete_dedicated_kek(const std::string& kek_ref) override;

    // The unique identifier a KEK reference stands for now; `known` tells
    // whether the server named it (a Locate answer) or it is the reference
    // itself, which messages do not repeat (it could be PHI passed by mistake).
    struct Resolved {
        std::string unique_id;
        bool known = false;
    };
    Resolved resolve(const std::string& kek_ref);

private:
    kmip::Response call(kmip::Operation operation, kmip::Item payload);
    WrappedDek wrap_under(const Resolved& resolved, const SecureBytes& dek, const DekBinding& binding);
    // Throws the error for a failed answer about object `unique_id`.
    // `show_id`: the identifier came from the server and may be named.
    [[noreturn]] void refuse(kmip::Operation operation, const kmip::Response& response, const std::string& unique_id,
                             bool show_id);
    static void check_ref(const std::string& kek_ref);

    KmipSettings settings_;
    kmip::Client client_;
};

} // namespace pgphi
