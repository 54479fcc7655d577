// The key providers of this process, built from the server's configuration
// and kept between calls (connections stay open, Vault tokens are reused).
// When a reload changes any provider setting, they are rebuilt. Called only
// inside call_core(): it throws pgphi::Error.
#pragma once

#include <string_view>

#include "core/key_provider.hpp"

namespace pgphi::pg {

KeyProvider& provider_named(std::string_view name);

} // namespace pgphi::pg
