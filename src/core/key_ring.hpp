// The backend-local cache of ready DataKeys, looked up by key reference (for
// decryption: the reference comes from the value's header) or by key name (for
// encryption: the active version). It owns the keys; clear() destroys them,
// which cleanses their key schedules. A pointer returned by a lookup stays
// valid until the next clear().
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

#include "ciphertext_format.hpp"
#include "data_key.hpp"
#include "secure_bytes.hpp"

namespace pgphi {

class KeyRing {
public:
    DataKey* find(format::KeyRef ref) noexcept;
    DataKey* find_active(std::string_view name) noexcept;

    // Adds a key made from `dek` (wiped before returning) and, when `active`,
    // makes it the version encrypt_phi uses for its name.
    DataKey& install(format::KeyRef ref, std::string name, bool active, SecureBytes dek,
                     const KeySpec& spec = {});

    void clear() noexcept;

    // Counts the changes that destroy keys (clear(), and install() replacing
    // a key): a pointer from find() is valid while this stays the same.
    uint64_t changes() const noexcept { return changes_; }

    // Calls fn on every key (before clear(), to report their usage).
    template <typename Fn>
    void for_each(Fn&& fn)
    {
        for (auto& entry : by_ref_)
            fn(*entry.second);
    }
    size_t size() const noexcept { return by_ref_.size(); }

private:
    std::unordered_map<uint64_t, std::unique_ptr<DataKey>> by_ref_;
    std::unordered_map<std::string, DataKey*> active_by_name_;
    // One-entry memo in front of each map: columns are mostly one key.
    DataKey* last_found_ = nullptr;
    DataKey* last_active_ = nullptr;
    uint64_t changes_ = 0;
};

} // namespace pgphi
