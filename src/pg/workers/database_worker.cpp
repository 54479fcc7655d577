#include "shared/postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "tcop/tcopprot.h"
#include "utils/snapmgr.h"
}

#include <cstring>

#include "workers/database_worker.hpp"

namespace pgphi::pg {

bool start_database_worker(const char* function, Datum argument, const char* name, const char* type,
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

bool database_worker_running(BackgroundWorkerHandle** handle)
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

void begin_database_worker()
{
    pqsignal(SIGTERM, die);
    BackgroundWorkerUnblockSignals();
}

void connect_database_worker(Oid database, const char* activity)
{
    BackgroundWorkerInitializeConnectionByOid(database, InvalidOid, 0);
    pgstat_report_activity(STATE_RUNNING, activity);
}

void run_in_transaction(void (*step)(void* arg), void* arg, bool with_spi)
{
    SetCurrentStatementStartTimestamp();
    StartTransactionCommand();
    if (with_spi)
        SPI_connect();
    PushActiveSnapshot(GetTransactionSnapshot());
    step(arg);
    if (with_spi)
        SPI_finish();
    PopActiveSnapshot();
    CommitTransactionCommand();
}

} // namespace pgphi::pg
