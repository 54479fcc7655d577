// Starting the short-lived workers the key broker launches into a database
// (key rotation, audit writer): each connects to one database, does its job
// in a transaction and exits; none is restarted by the postmaster.
#pragma once

#include "postgres.hpp"

extern "C" {
#include "postmaster/bgworker.h"
}

#include <cstring>

namespace pgphi::pg {

// Registers the worker whose entry point is `function` (exported by pgphi)
// with `argument`; `name` is what pg_stat_activity shows, `type` its kind.
inline bool start_database_worker(const char* function, Datum argument, const char* name, const char* type,
                                  BackgroundWorkerHandle** handle)
{
    BackgroundWorker worker;
    std::memset(&worker, 0, sizeof(worker));
    worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
    worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
    worker.bgw_restart_time = BGW_NEVER_RESTART;
    worker.bgw_main_arg = argument;
    strlcpy(worker.bgw_library_name, "pgphi", sizeof(worker.bgw_library_name));
    strlcpy(worker.bgw_function_name, function, sizeof(worker.bgw_function_name));
    strlcpy(worker.bgw_name, name, sizeof(worker.bgw_name));
    strlcpy(worker.bgw_type, type, sizeof(worker.bgw_type));
    return RegisterDynamicBackgroundWorker(&worker, handle);
}

// Whether the worker behind *handle (from start_database_worker) still runs.
// Once it has stopped, its handle (palloc'd by RegisterDynamicBackgroundWorker)
// is done with: it is freed and *handle cleared, ready for the next start.
inline bool database_worker_running(BackgroundWorkerHandle** handle)
{
    pid_t pid;
    if (!*handle)
        return false;
    if (GetBackgroundWorkerPid(*handle, &pid) != BGWH_STOPPED)
        return true;
    pfree(*handle);
    *handle = nullptr;
    return false;
}

} // namespace pgphi::pg
