#include "postgres.hpp"

#include <string>

#include "../core/error.hpp"
#include "../core/local_provider.hpp"
#include "providers.hpp"
#include "settings.hpp"

namespace pgphi::pg {

std::unique_ptr<KeyProvider> make_provider(std::string_view name)
{
    if (name == "local")
        return std::make_unique<LocalKeyProvider>(local_kek_file ? local_kek_file : "");
    throw Error(ErrorCode::InvalidArgument, "unknown pgphi key provider \"" + std::string(name) + "\"", {},
                "Available providers: local.");
}

} // namespace pgphi::pg
