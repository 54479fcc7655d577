// Seal reservations: sessions seal under a key version only inside a
// committed reservation (pgphi.seal_reservations). Half a block before the
// end of one, the key broker starts a short-lived worker in the version's
// database that commits the next.
#include "shared/postgres.hpp"

extern "C" {
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "storage/condition_variable.h"
#include "storage/lwlock.h"
}

#include "shared/settings.hpp"
#include "shared/shared_state.hpp"
#include "workers/database_worker.hpp"
#include "workers/seal_reservation_worker.hpp"

namespace pgphi::pg {

namespace {

constexpr int64_t kReservationRetryMs = 1'000; // a failing worker is not restarted in a loop

// The reservation worker started for each usage entry, if any, and when (the broker's own).
BackgroundWorkerHandle* g_reservation_workers[kUsageEntries];
int64_t g_reservation_launched_ms[kUsageEntries];

struct ReservationJob {
    uint32 key_id;
    uint32 version;
    uint64_t target;    // the count the reservation must cover
    uint64_t reserved;  // out: what is reserved now (0: no reservation row)
};

void reserve(void* arg)
{
    auto* job = static_cast<ReservationJob*>(arg);
    job->reserved = write_reservation(job->key_id, job->version, job->target, false);
}

} // namespace

// Starts a worker in the version's database that commits its next seal
// reservation, for every version whose sessions asked. A missing worker
// slot is tried again at the next loop; sessions wait meanwhile, up to
// pgphi.key_wait_timeout, and then fail rather than seal unreserved.
void launch_reservations(SharedState* state)
{
    if (RecoveryInProgress())
        return; // a standby does not encrypt
    if (test_fault_is("reservation_stall"))
        return;
    for (int i = 0; i < kUsageEntries; ++i) {
        UsageEntry& entry = state->usage[i];
        if (!entry.in_use || pg_atomic_read_u32(&entry.reservation_requested) == 0 ||
            database_worker_running(&g_reservation_workers[i]))
            continue; // not wanted, or the previous worker is still at it
        int64_t now = now_ms();
        if (now - g_reservation_launched_ms[i] < kReservationRetryMs)
            continue;
        char name[BGW_MAXLEN];
        snprintf(name, sizeof(name), "pgphi seal reservation (key %u version %u)", entry.key_id, entry.key_version);
        if (start_database_worker("pgphi_seal_reservation_main", Int32GetDatum(i), name, "pgphi seal reservation",
                                  &g_reservation_workers[i]))
            g_reservation_launched_ms[i] = now;
    }
}

} // namespace pgphi::pg

// A short-lived worker connected to one database: commits the next seal
// reservation of one key version (pgphi.seal_reservations), then lets the
// sessions waiting for it go on. The reservation covers the version's count
// now, what sessions may hold unreported, and one block more.
extern "C" PGDLLEXPORT void pgphi_seal_reservation_main(Datum);

void pgphi_seal_reservation_main(Datum argument)
{
    using namespace pgphi::pg;
    begin_database_worker();
    SharedState* state = shared_state();
    UsageEntry& entry = state->usage[DatumGetInt32(argument)];
    LWLockAcquire(state->lock, LW_SHARED);
    Oid database = entry.database;
    uint32 key_id = entry.key_id;
    uint32 version = entry.key_version;
    bool wanted = entry.in_use;
    LWLockRelease(state->lock);
    if (!wanted)
        return;
    connect_database_worker(database, "reserving seals for a pgphi key version");

    ReservationJob job{key_id, version, entry.seals.load() + unreported_seal_headroom() + seal_reservation_block(), 0};
    run_in_transaction(reserve, &job, false);
    uint64_t reserved = job.reserved;

    // Only now, committed (and, with synchronous replication, on the
    // standbys), may sessions seal inside it.
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    if (entry.in_use && entry.database == database && entry.key_id == key_id && entry.key_version == version) {
        if (reserved > entry.reserved.load())
            entry.reserved.store(reserved);
        pg_atomic_write_u32(&entry.reservation_requested, 0);
    }
    LWLockRelease(state->lock);
    ConditionVariableBroadcast(&state->changed);
    if (reserved == 0)
        ereport(LOG, (errmsg("pgphi found no seal reservation of key id %u version %u in this database", key_id,
                             version)));
}
