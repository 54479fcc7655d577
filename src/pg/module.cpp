// Module entry: refuses to load unless preloaded (the key broker and the
// shared DEK cache need shared memory reserved at server start), defines the
// settings, reserves shared memory, registers the key broker and hooks
// key-catalog invalidation.
#include "postgres.hpp"

extern "C" {
#include "postmaster/bgworker.h"
}

#include <cstring>

#include "access_control.hpp"
#include "audit.hpp"
#include "catalog_audit.hpp"
#include "derived_data.hpp"
#include "key_access.hpp"
#include "settings.hpp"
#include "shared_state.hpp"
#include "utility_guard.hpp"

namespace {

// The key brokers, one per remote key manager and broker 0 for the local
// provider and housekeeping (see src/pg/broker.cpp).
void register_key_broker()
{
    using namespace pgphi::pg;
    // A remote provider gets its own broker when it is configured; if it is
    // configured only later (by a reload), broker 0 serves it until the next
    // restart. Each broker takes a slot of max_worker_processes.
    auto set = [](const char* value) { return value && value[0] != '\0'; };
    bool configured[kBrokers] = {true, set(vault_addr), set(aws_region) || set(aws_kms_endpoint), set(kmip_host),
                                 set(pkcs11_module)};
    for (int i = 0; i < kBrokers; ++i) {
        if (!configured[i])
            continue;
        set_broker_registered(i);
        BackgroundWorker worker;
        std::memset(&worker, 0, sizeof(worker));
        worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
        // Needs no database, so it also serves standbys during recovery.
        worker.bgw_start_time = BgWorkerStart_PostmasterStart;
        worker.bgw_restart_time = 1;
        worker.bgw_main_arg = Int32GetDatum(i);
        strlcpy(worker.bgw_library_name, "pgphi", sizeof(worker.bgw_library_name));
        strlcpy(worker.bgw_function_name, "pgphi_broker_main", sizeof(worker.bgw_function_name));
        if (i == 0)
            strlcpy(worker.bgw_name, "pgphi key broker", sizeof(worker.bgw_name));
        else
            snprintf(worker.bgw_name, sizeof(worker.bgw_name), "pgphi key broker for %s",
                     kBrokerProviders[i]);
        strlcpy(worker.bgw_type, worker.bgw_name, sizeof(worker.bgw_type)); // pg_stat_activity.backend_type
        RegisterBackgroundWorker(&worker);
    }
}

} // namespace

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
    pgphi::pg::register_derived_data_guard();
    pgphi::pg::request_shared_memory();
    register_key_broker();
    pgphi::pg::register_key_invalidation();
    pgphi::pg::register_catalog_writer_tracking();
    pgphi::pg::register_utility_guard();

    ereport(LOG, (errmsg("pgphi: the local key provider keeps its KEK in a file beside the database; "
                         "it is for development only"),
                  errhint("Use the Vault or AWS KMS provider for protected health information in "
                          "production.")));
}
