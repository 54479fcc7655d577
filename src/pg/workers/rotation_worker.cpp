// Usage-based rotation: when a key version has sealed
// pgphi.dek_rotation_threshold values, the key broker starts a short-lived
// worker in the key's database that rotates it (pgphi._rotate_if_active), in
// its own transaction and only if that version is still the active one.
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
#include "workers/rotation_worker.hpp"

namespace pgphi::pg {

namespace {

constexpr int64_t kRotationRetryMs = 60'000;

// The rotation worker started for each usage entry, if any (the broker's own).
BackgroundWorkerHandle* g_rotation_workers[kUsageEntries];

struct RotationJob {
    uint32 key_id;
    uint32 version;
    bool rotated;        // out: _rotate_if_active answered
    int32 new_version;   // out: 0 when the version was no longer active
};

void rotate_if_active(void* arg)
{
    auto* job = static_cast<RotationJob*>(arg);
    Oid types[2] = {INT4OID, INT4OID};
    Datum values[2] = {Int32GetDatum(static_cast<int32>(job->key_id)), Int32GetDatum(static_cast<int32>(job->version))};
    int rc = SPI_execute_with_args("SELECT pgphi._rotate_if_active($1, $2)", 2, types, values, nullptr, false, 1);
    job->rotated = rc == SPI_OK_SELECT && SPI_processed == 1;
    if (job->rotated) {
        bool isnull = true;
        Datum result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
        job->new_version = isnull ? 0 : DatumGetInt32(result);
    }
}

} // namespace

// Starts a worker in the key's database that rotates it, for every version
// past the threshold; again after a minute if the key was not rotated.
void launch_rotations(SharedState* state)
{
    if (RecoveryInProgress())
        return; // a standby cannot rotate; its primary does
    int64_t now = now_ms();
    for (int i = 0; i < kUsageEntries; ++i) {
        UsageEntry& entry = state->usage[i];
        bool due = entry.in_use && pg_atomic_read_u32(&entry.rotated) == 0 &&
                   entry.seals.load() >= static_cast<uint64_t>(dek_rotation_threshold) &&
                   (entry.rotation_launched_ms == 0 || now - entry.rotation_launched_ms > kRotationRetryMs);
        if (!due || database_worker_running(&g_rotation_workers[i]))
            continue; // not due, or the previous worker is still at it
        char name[BGW_MAXLEN];
        snprintf(name, sizeof(name), "pgphi key rotation (key %u version %u)", entry.key_id, entry.key_version);
        if (start_database_worker("pgphi_rotation_worker_main", Int32GetDatum(i), name, "pgphi key rotation",
                                  &g_rotation_workers[i]))
            entry.rotation_launched_ms = now;
    }
}

} // namespace pgphi::pg

// A short-lived worker connected to one database: rotates the key whose
// version passed pgphi.dek_rotation_threshold, in its own transaction, and
// only if that version is still the active one.
extern "C" PGDLLEXPORT void pgphi_rotation_worker_main(Datum);

void pgphi_rotation_worker_main(Datum argument)
{
    using namespace pgphi::pg;
    begin_database_worker();
    SharedState* state = shared_state();
    UsageEntry& entry = state->usage[DatumGetInt32(argument)];
    Oid database = entry.database;
    uint32 key_id = entry.key_id;
    uint32 version = entry.key_version;
    connect_database_worker(database, "rotating a pgphi key past its seal threshold");

    RotationJob job{key_id, version, false, 0};
    run_in_transaction(rotate_if_active, &job, true);
    bool rotated = job.rotated;

    pg_atomic_write_u32(&entry.rotated, rotated ? 1 : 0);
    state->usage_dirty.store(true);
    if (rotated && job.new_version != 0)
        ereport(LOG, (errmsg("pgphi rotated key id %u to version %d: version %u had encrypted %llu values", key_id,
                             job.new_version, version, static_cast<unsigned long long>(entry.seals.load()))));
}
