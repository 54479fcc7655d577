// What the short-lived workers the key broker starts into one database have
// in common (key rotation, seal reservation, audit writer): each is started
// here, connects to its database, does its job in a transaction or two and
// exits; none is restarted by the postmaster.
#pragma once

#include "shared/postgres.hpp"

extern "C" {
#include "postmaster/bgworker.h"
}

namespace pgphi::pg {

// Registers the worker whose entry point is `function` (exported by pgphi)
// with `argument`; `name` is what pg_stat_activity shows, `type` its kind.
// False when no background worker slot is free.
bool start_database_worker(const char* function, Datum argument, const char* name, const char* type,
                           BackgroundWorkerHandle** handle);

// Whether the worker behind *handle (from start_database_worker) still runs.
// Once it has stopped, its handle (palloc'd by RegisterDynamicBackgroundWorker)
// is done with: it is freed and *handle cleared, ready for the next start.
bool database_worker_running(BackgroundWorkerHandle** handle);

// First thing in a worker's main: SIGTERM sets the flag that
// CHECK_FOR_INTERRUPTS acts on (the bgworker default, bgworker_die, raises
// FATAL inside the signal handler, wherever SPI happens to be), then the
// signals are unblocked.
void begin_database_worker();

// Connects the worker to `database` and shows `activity` in pg_stat_activity.
void connect_database_worker(Oid database, const char* activity);

// Runs step(arg) in a transaction of its own, with a snapshot and, when
// `with_spi`, SPI connected, and commits it. An ERROR in step aborts the
// transaction and ends the worker (catch it around this call to go on).
void run_in_transaction(void (*step)(void* arg), void* arg, bool with_spi);

} // namespace pgphi::pg
