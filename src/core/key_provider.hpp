// The interface every key provider implements: the local file provider now,
// HashiCorp Vault Transit and AWS KMS next. A provider holds a KEK it never
// reveals and wraps or unwraps DEKs with it. The caller binds each wrapped DEK
// to the pgphi key it belongs to, so a wrapped DEK moved to another key or
// version in the catalog fails to unwrap.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bytes.hpp"
#include "secure_bytes.hpp"

namespace pgphi {

// Which pgphi key a DEK belongs to. key_id and version are authenticated with
// the wrapped DEK; the name is used only in messages.
struct DekBinding {
    uint32_t key_id = 0;
    uint32_t version = 0;
    std::string key_name;
    // What the key catalog recorded as the KEK version that wrapped this DEK
    // (key_versions.kek_version), "" when unknown. KMS unwraps and rewraps
    // name this key ARN, not kek_ref: an alias may point elsewhere by now.
    std::string wrapped_by = {};
};

struct WrappedDek {
    std::vector<uint8_t> blob;  // opaque to pgphi, stored in the key catalog
    std::string kek_version;    // which KEK version wrapped it, for the inventory
};

struct GeneratedDek {
    SecureBytes plaintext;
    WrappedDek wrapped;
};

struct KekDescription {
    std::string provider;
    std::string kek_ref;
    std::string kek_version;    // the version new wraps use
};

class KeyProvider {
public:
    static constexpr size_t kDekSize = 32;

    virtual ~KeyProvider() = default;

    virtual const char* name() const = 0;

    // Wraps a DEK the caller generated.
    virtual WrappedDek wrap(const std::string& kek_ref, const SecureBytes& dek,
                            const DekBinding& binding) = 0;

    virtual SecureBytes unwrap(const std::string& kek_ref, ByteView wrapped,
                               const DekBinding& binding) = 0;

    // Re-wraps under the KEK's newest version. Providers that can do this
    // inside the key manager (Vault rewrap, KMS ReEncrypt) never expose the DEK.
    virtual WrappedDek rewrap(const std::string& kek_ref, ByteView wrapped,
                              const DekBinding& binding) = 0;

    // Re-wraps under another KEK of the same key manager (pgphi.rekey), inside
    // it where it can (KMS ReEncrypt to another key), so the DEK never leaves
    // it. By default nullopt: the key broker unwraps and wraps instead.
    virtual std::optional<WrappedDek> rewrap_to(const std::string& source_kek, const std::string& destination_kek,
                                                ByteView wrapped, const DekBinding& binding);

    virtual KekDescription describe(const std::string& kek_ref) = 0;

    // A fresh DEK. By default drawn locally and wrapped; key managers that
    // generate data keys themselves override it.
    virtual GeneratedDek generate_dek(const std::string& kek_ref, const DekBinding& binding);

    // Creates a new KEK in the key manager, for a KEK "created by pgphi on
    // request" (pgphi.create_kek); returns what names the new key's own
    // version (KMIP: its unique identifier; PKCS#11: its version, "v2"). A
    // new KEK of an existing name becomes that name's newest version, which
    // rewrap_keys moves DEKs onto. Key managers that rotate their keys
    // themselves (Vault, KMS) and the local file cannot: ConfigError.
    virtual std::string create_kek(const std::string& kek_name);

    // A KEK for one pgphi key alone (create_key(..., dedicated_kek => true)),
    // so that destroying the key's last version can delete the KEK itself,
    // which no backup or WAL archive outlives. `kek_name` names the new KEK
    // where the key manager names keys ("" for KMS, which assigns an id); an
    // existing key of that name is refused, since it may wrap other data.
    // `key_name` goes into its description. Returns the KEK's reference.
    // By default a provider cannot: ConfigError.
    virtual std::string create_dedicated_kek(const std::string& kek_name, const std::string& key_name);
    // Deletes a dedicated KEK, or schedules its deletion where the key
    // manager waits first (KMS); says what was done, for the key catalog and
    // the audit trail. A KEK already gone (or already scheduled) is no error,
    // so a destruction that has to be retried completes.
    virtual std::string delete_dedicated_kek(const std::string& kek_ref);

    // Audit anchors: a MAC over `message` under a key that stays in the key
    // manager (the local provider: HMAC-SHA-256 under a key derived from its
    // KEK with its own HKDF label). The MAC is printable text, stored as is.
    // By default a provider cannot anchor: both throw ConfigError.
    virtual std::string audit_mac(const std::string& key_ref, ByteView message);
    // Whether `mac` is audit_mac's answer for `message`; false for any other
    // MAC, including one in another provider's format.
    virtual bool verify_audit_mac(const std::string& key_ref, ByteView message, const std::string& mac);
};

} // namespace pgphi
