// Builds key providers from the server's configuration. Called only inside
// call_core(): it throws pgphi::Error for an unknown provider.
#pragma once

#include <memory>
#include <string_view>

#include "../core/key_provider.hpp"

namespace pgphi::pg {

std::unique_ptr<KeyProvider> make_provider(std::string_view name);

} // namespace pgphi::pg
