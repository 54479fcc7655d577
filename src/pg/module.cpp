// Module entry: refuses to load unless preloaded (the key broker and the
// shared DEK cache need shared memory reserved at server start), defines the
// settings, reserves shared memory, registers the key broker and hooks
// key-catalog invalidation.
#include "shared/postgres.hpp"

extern "C" {
#include "postmaster/bgworker.h"
}

#include <cstring>

#include "policy/access_control.hpp"
#include "policy/catalog_audit.hpp"
#include "policy/citus_transport.hpp"
#include "policy/decrypt_limits.hpp"
#include "policy/derived_data.hpp"
#include "policy/utility_guard.hpp"
#include "shared/alerts.hpp"
#include "shared/audit.hpp"
#include "shared/key_access.hpp"
#include "shared/settings.hpp"
#include "shared/shared_state.hpp"
#include "workers/key_broker.hpp"


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
    pgphi::pg::define_audit_settings();
    pgphi::pg::register_access_control();
    pgphi::pg::register_citus_transport_guard();
    pgphi::pg::define_alert_settings();
    pgphi::pg::register_decrypt_limits();
    pgphi::pg::register_derived_data_guard();
    pgphi::pg::request_shared_memory();
    pgphi::pg::register_key_brokers();
    pgphi::pg::register_key_invalidation();
    pgphi::pg::register_catalog_writer_tracking();
    pgphi::pg::register_utility_guard();
    pgphi::pg::reserve_setting_prefix();

    ereport(LOG, (errmsg("pgphi: the local key provider keeps its KEK in a file beside the database; "
                         "it is for development only"),
                  errhint("Use the Vault or AWS KMS provider for protected health information in "
                          "production.")));
}
