#include "postgres.hpp"

extern "C" {
#include "utils/guc.h"
}

#include "settings.hpp"

namespace pgphi::pg {

char* local_kek_file = nullptr;

void define_settings()
{
    DefineCustomStringVariable(
        "pgphi.local_kek_file",
        "File holding the local key provider's key-encryption key (development only).",
        "Relative paths are taken from the data directory. The file is created with mode 0600 "
        "when the first local key is created.",
        &local_kek_file, "pgphi_local.kek", PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);

    MarkGUCPrefixReserved("pgphi");
}

} // namespace pgphi::pg
