// Module entry: refuses to load unless preloaded (the key broker and the
// shared DEK cache need shared memory reserved at server start), defines the
// settings and hooks key-catalog invalidation.
#include "postgres.hpp"

#include "key_access.hpp"
#include "settings.hpp"

extern "C" {
PG_MODULE_MAGIC;

void _PG_init(void);
}

void _PG_init(void)
{
    if (!process_shared_preload_libraries_in_progress)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi must be loaded via shared_preload_libraries"),
                        errhint("Add pgphi to shared_preload_libraries in postgresql.conf and restart the "
                                "server.")));

    pgphi::pg::define_settings();
    pgphi::pg::register_key_invalidation();

    ereport(LOG, (errmsg("pgphi: the local key provider keeps its KEK in a file beside the database; "
                         "it is for development only"),
                  errhint("Use the Vault or AWS KMS provider for protected health information in "
                          "production.")));
}
