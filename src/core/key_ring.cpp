#include "key_ring.hpp"

namespace pgphi {

DataKey* KeyRing::find(format::KeyRef ref) noexcept
{
    if (last_found_ && last_found_->ref() == ref)
        return last_found_;
    auto it = by_ref_.find(ref.packed());
    if (it == by_ref_.end())
        return nullptr;
    last_found_ = it->second.get();
    return last_found_;
}

DataKey* KeyRing::find_active(std::string_view name) noexcept
{
    if (last_active_ && last_active_->name() == name)
        return last_active_;
    try {
        auto it = active_by_name_.find(std::string(name));
        if (it == active_by_name_.end())
            return nullptr;
        last_active_ = it->second;
        return last_active_;
    } catch (...) {
        return nullptr; // out of memory for the lookup string: treat as a miss
    }
}

DataKey& KeyRing::install(format::KeyRef ref, std::string name, bool active, SecureBytes dek,
                          const KeySpec& spec)
{
    auto key = std::make_unique<DataKey>(ref, std::move(name), dek, spec);
    dek.clear();
    auto& slot = by_ref_[ref.packed()];
    if (slot) {
        // Replacing a key whose state changed: forget every pointer to the old one.
        for (auto it = active_by_name_.begin(); it != active_by_name_.end();)
            it = (it->second == slot.get()) ? active_by_name_.erase(it) : std::next(it);
        last_found_ = last_active_ = nullptr;
        ++changes_;
    }
    slot = std::move(key);
    if (active) {
        active_by_name_[slot->name()] = slot.get();
        last_active_ = nullptr;
    }
    return *slot;
}

void KeyRing::clear() noexcept
{
    ++changes_;
    last_found_ = last_active_ = nullptr;
    active_by_name_.clear();
    by_ref_.clear();
}

} // namespace pgphi
