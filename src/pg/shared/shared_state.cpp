#include "shared/postgres.hpp"

extern "C" {
#include "access/xlog.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"
#include "utils/syscache.h"
#include "utils/lsyscache.h"
#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "commands/extension.h"
#include "executor/spi.h"
}

#include <algorithm>
#include <cstring>
#include <new>
#include <time.h>

#include "shared/alerts.hpp"
#include "shared/audit.hpp"
#include "shared/compat.hpp"
#include "shared/error_bridge.hpp"
#include "shared/key_access.hpp"
#include "shared/settings.hpp"
#include "shared/shared_state.hpp"

namespace pgphi::pg {

namespace {

SharedState* g_state = nullptr;
shmem_request_hook_type g_prev_request_hook = nullptr;
shmem_startup_hook_type g_prev_startup_hook = nullptr;

Size shared_size()
{
    return add_size(offsetof(SharedState, table_memory), cache::Table::bytes_for(static_cast<uint32_t>(cache_size)));
}

void on_shmem_request()
{
    if (g_prev_request_hook)
        g_prev_request_hook();
    RequestAddinShmemSpace(shared_size());
    RequestNamedLWLockTranche("pgphi", 1);
    RequestAddinShmemSpace(audit_shared_size());
    request_audit_lwlock();
    RequestAddinShmemSpace(alerts_shared_size());
    request_alerts_lwlock();
}

void on_shmem_startup()
{
    if (g_prev_startup_hook)
        g_prev_startup_hook();
    LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
    bool found = false;
    void* memory = ShmemInitStruct("pgphi", shared_size(), &found);
    if (!found) {
        std::memset(memory, 0, shared_size());
        auto* state = new (memory) SharedState;
        state->lock = &(GetNamedLWLockTranche("pgphi"))->lock;
        ConditionVariableInit(&state->changed);
        state->invalidation_generation.store(1);
        state->next_ticket.store(1);
        state->capacity = static_cast<uint32_t>(cache_size);
        for (UsageEntry& entry : state->usage) {
            pg_atomic_init_u32(&entry.rotation_requested, 0);
            pg_atomic_init_u32(&entry.rotated, 0);
            pg_atomic_init_u32(&entry.reservation_requested, 0);
        }
        // Tells a reservation made in this server's life from one made by an
        // earlier life or another server (a crash restart gets a new one).
        if (!pg_strong_random(&state->incarnation, sizeof(state->incarnation)))
            state->incarnation = static_cast<uint64_t>(GetCurrentTimestamp()) ^ static_cast<uint64_t>(MyProcPid);
        state->incarnation &= INT64CONST(0x7fffffffffffffff); // stored in a bigint
        state->table().initialize();
    }
    g_state = static_cast<SharedState*>(memory);
    void* audit_memory = ShmemInitStruct("pgphi_audit", audit_shared_size(), &found);
    init_audit_shared_memory(audit_memory, found);
    void* alerts_memory = ShmemInitStruct("pgphi_alerts", alerts_shared_size(), &found);
    init_alerts_shared_memory(alerts_memory, found);
    LWLockRelease(AddinShmemInitLock);
}

// Raises the key manager's error for a key, after queueing it for the
// audit trail (the transaction that asked will abort).
[[noreturn]] void raise_failure(const cache::FailureRecord& failure, const char* action,
                                const cache::UnwrapRequest& key)
{
    queue_audit_event(action, AuditOutcome::Failed, key.key_id, key.key_version, key.key_name, failure.message);
    CoreFailure core;
    core.capture(static_cast<ErrorCode>(failure.code), failure.message, failure.detail, failure.hint);
    raise_core_failure(core);
}


[[noreturn]] void raise_wait_timeout(const char* what)
{
    LWLockAcquire(g_state->lock, LW_SHARED);
    bool broker_running = true;
    for (int i = 0; i < kBrokers; ++i)
        broker_running &= !broker_registered(i) || g_state->brokers[i].pid != 0;
    LWLockRelease(g_state->lock);
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_CONNECTION_FAILURE),
                    errmsg("pgphi key broker did not %s within %d ms", what, key_wait_timeout_ms),
                    broker_running ? errdetail("The key manager may be slow or unreachable.")
                                   : errdetail("A key broker process is not running."),
                    errhint("See pgphi.broker_status() and the server log.")));
    pg_unreachable();
}

} // namespace

SharedState* shared_state()
{
    if (!g_state)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi shared memory is not initialised"),
                        errhint("pgphi must be loaded via shared_preload_libraries.")));
    return g_state;
}

void request_shared_memory()
{
    g_prev_request_hook = shmem_request_hook;
    shmem_request_hook = on_shmem_request;
    g_prev_startup_hook = shmem_startup_hook;
    shmem_startup_hook = on_shmem_startup;
}

int64_t now_ms() { return GetCurrentTimestamp() / 1000; }

TimestampTz coarse_timestamp()
{
    struct timespec coarse;
    if (clock_gettime(CLOCK_REALTIME_COARSE, &coarse) != 0)
        return GetCurrentTimestamp();
    return static_cast<TimestampTz>(coarse.tv_sec - (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY) *
               USECS_PER_SEC +
           coarse.tv_nsec / 1000;
}

namespace {
bool g_broker_registered[kBrokers] = {true}; // inherited by every forked process
} // namespace

void set_broker_registered(int index) { g_broker_registered[index] = true; }
bool broker_registered(int index) { return g_broker_registered[index]; }

bool broker_serves(int index, const char* provider)
{
    for (int i = 1; i < kBrokers; ++i)
        if (strcmp(provider, kBrokerProviders[i]) == 0)
            return index == (g_broker_registered[i] ? i : 0);
    return index == 0;
}

void wake_broker()
{
    // SetLatch on a latch whose owner exited since is harmless. All are
    // woken: each takes only its own provider's work.
    Latch* latches[kBrokers];
    LWLockAcquire(g_state->lock, LW_SHARED);
    for (int i = 0; i < kBrokers; ++i)
        latches[i] = g_state->brokers[i].latch;
    LWLockRelease(g_state->lock);
    for (Latch* latch : latches)
        if (latch)
            SetLatch(latch);
}

namespace {

// The entry counting a key version's seals, created on first use; nullptr
// when the table is full.
UsageEntry* claim_usage_entry(DataKey& key, Oid database)
{
    SharedState* state = shared_state();
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    UsageEntry* found = nullptr;
    UsageEntry* free_entry = nullptr;
    for (UsageEntry& entry : state->usage) {
        if (entry.in_use && entry.database == database && entry.key_id == key.ref().key_id &&
            entry.key_version == key.ref().version) {
            found = &entry;
            break;
        }
        if (!entry.in_use && !free_entry)
            free_entry = &entry;
    }
    if (!found && free_entry) {
        found = free_entry;
        found->database = database;
        found->key_id = key.ref().key_id;
        found->key_version = key.ref().version;
        found->seals.store(0);
        pg_atomic_write_u32(&found->rotation_requested, 0);
        pg_atomic_write_u32(&found->rotated, 0);
        found->rotation_launched_ms = 0;
        // No count of it was loaded: after a clean shutdown that means none
        // was made; otherwise seals may have gone uncounted.
        found->synced = false;
        found->trusted = state->usage_file_clean;
        found->reserved.store(0);
        pg_atomic_write_u32(&found->reservation_requested, 0);
        found->in_use = true;
    }
    LWLockRelease(state->lock);
    return found;
}

// Frees the entries of this database's versions that can no longer encrypt
// (decrypt-only, retired, destroyed, or gone from the catalog) and of
// databases that no longer exist: their counts no longer matter, since only
// an active version's count decides its rotation and its limit. Runs SPI, so
// only from a transaction (check_seal_budget), never from an exit callback.
SPIPlanPtr g_plan_active_versions = nullptr;

struct ActiveVersions {
    int count;
    uint64_t refs[kUsageEntries]; // key_id << 32 | version
};

void collect_active_version(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* active = static_cast<ActiveVersions*>(arg);
    bool isnull;
    uint32 key_id = static_cast<uint32>(DatumGetInt32(SPI_getbinval(row, desc, 1, &isnull)));
    uint32 version = static_cast<uint32>(DatumGetInt32(SPI_getbinval(row, desc, 2, &isnull)));
    if (active->count < kUsageEntries)
        active->refs[active->count++] = (static_cast<uint64_t>(key_id) << 32) | version;
}

int reclaim_usage_entries()
{
    SharedState* state = shared_state();
    auto* active = static_cast<ActiveVersions*>(palloc0(sizeof(ActiveVersions)));
    (void)query_catalog(&g_plan_active_versions,
                        "SELECT v.key_id, v.version FROM pgphi.key_versions v "
                        "WHERE v.state OPERATOR(pg_catalog.=) 'active'",
                        0, nullptr, nullptr, kUsageEntries, collect_active_version, active, nullptr);
    // Which databases still exist, looked up outside the lock.
    Oid databases[kUsageEntries];
    bool exists[kUsageEntries];
    LWLockAcquire(state->lock, LW_SHARED);
    for (int i = 0; i < kUsageEntries; ++i)
        databases[i] = state->usage[i].in_use ? state->usage[i].database : InvalidOid;
    LWLockRelease(state->lock);
    for (int i = 0; i < kUsageEntries; ++i)
        exists[i] = !OidIsValid(databases[i]) || databases[i] == MyDatabaseId ||
                    SearchSysCacheExists1(DATABASEOID, ObjectIdGetDatum(databases[i]));

    int freed = 0;
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    for (int i = 0; i < kUsageEntries; ++i) {
        UsageEntry& entry = state->usage[i];
        if (!entry.in_use || entry.database != databases[i])
            continue;
        bool reclaim = !exists[i];
        if (entry.database == MyDatabaseId) {
            uint64_t ref = (static_cast<uint64_t>(entry.key_id) << 32) | entry.key_version;
            reclaim = std::find(active->refs, active->refs + active->count, ref) == active->refs + active->count;
        }
        if (reclaim) {
            entry.in_use = false;
            ++freed;
        }
    }
    LWLockRelease(state->lock);
    pfree(active);
    if (freed > 0)
        state->usage_dirty.store(true);
    return freed;
}

// The entry of a key version, from the key's cached slot when that still
// counts this version (an entry can be reclaimed and reused meanwhile).
// When the table is full and `may_reclaim`, reclaims entries and tries again.
UsageEntry* usage_entry(DataKey& key, Oid database, bool may_reclaim)
{
    SharedState* state = shared_state();
    if (key.usage_slot() < kUsageEntries) {
        UsageEntry& cached = state->usage[key.usage_slot()];
        if (cached.in_use && cached.database == database && cached.key_id == key.ref().key_id &&
            cached.key_version == key.ref().version)
            return &cached;
    }
    UsageEntry* found = test_fault_is("usage_full") ? nullptr : claim_usage_entry(key, database);
    if (!found && may_reclaim && !test_fault_is("usage_full") && reclaim_usage_entries() > 0)
        found = claim_usage_entry(key, database);
    if (!found) {
        ereport(WARNING, (errmsg("pgphi cannot count the use of more than %d key versions", kUsageEntries)));
        return nullptr;
    }
    key.set_usage_slot(static_cast<uint32_t>(found - state->usage));
    return found;
}

uint64_t hard_seal_limit()
{
    // Four times the rotation threshold, and always under 2^32, NIST's bound
    // for random 96-bit GCM nonces (SP 800-38D, 8.3).
    return std::min<uint64_t>(4ULL * static_cast<uint64_t>(dek_rotation_threshold), (1ULL << 32) - (1ULL << 24));
}

// In a Citus cluster (pgphi.citus_setup() has run: docs/citus.md) every node
// seals under the same DEKs, each counting only its own values. So that all
// of them together stay inside the one limit, each node takes an equal
// share of it, for a cluster of up to kCitusNodeShares nodes (citus_sync()
// warns beyond 32). Looked up once per transaction: the encrypt path must not
// pay a catalog lookup per value.
constexpr uint64_t kCitusNodeShares = 32;

Oid namespace_owner(Oid schema)
{
    HeapTuple tuple = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(schema));
    if (!HeapTupleIsValid(tuple))
        return InvalidOid;
    Oid owner = reinterpret_cast<Form_pg_namespace>(GETSTRUCT(tuple))->nspowner;
    ReleaseSysCache(tuple);
    return owner;
}

} // namespace

bool in_citus_cluster()
{
    static TimestampTz checked_in = 0; // the transaction's start: one per transaction in a backend
    static bool member = false;
    if (checked_in != GetCurrentTransactionStartTimestamp()) {
        // Only pgphi.citus_setup()'s schema counts: one a superuser owns
        // (it refuses another), with Citus installed. Anyone allowed to
        // create a schema could otherwise make a server seal less.
        Oid schema = get_namespace_oid("pgphi_citus", true);
        member = OidIsValid(schema) && OidIsValid(get_extension_oid("citus", true)) &&
                 OidIsValid(get_relname_relid("catalog_rows", schema)) && superuser_arg(namespace_owner(schema));
        checked_in = GetCurrentTransactionStartTimestamp();
    }
    return member;
}

uint64_t unreported_seal_headroom() { return static_cast<uint64_t>(MaxBackends) * kSealReportBatch; }

uint64_t seal_reservation_block()
{
    return std::max<uint64_t>(static_cast<uint64_t>(dek_rotation_threshold) / 4, 2 * unreported_seal_headroom());
}

bool seal_reservations_installed()
{
    // A database whose pgphi is not yet updated to 0.3.0 keeps the older
    // behaviour: counts only.
    Oid schema = get_namespace_oid("pgphi", true);
    return OidIsValid(schema) && OidIsValid(get_relname_relid("seal_reservations", schema));
}

uint64_t write_reservation(uint32 key_id, uint32 version, uint64_t at_least, bool first)
{
    SharedState* state = shared_state();
    Oid types[5] = {INT4OID, INT4OID, INT8OID, INT8OID, BOOLOID};
    Datum values[5] = {Int32GetDatum(static_cast<int32>(key_id)), Int32GetDatum(static_cast<int32>(version)),
                       Int64GetDatum(static_cast<int64>(at_least)),
                       Int64GetDatum(static_cast<int64>(state->incarnation)), BoolGetDatum(first)};
    if (SPI_connect() != SPI_OK_CONNECT)
        elog(ERROR, "pgphi: SPI_connect failed");
    int rc = SPI_execute_with_args("SELECT pgphi._reserve_seals($1, $2, $3, $4, $5)", 5, types, values, nullptr,
                                   false, 1);
    if (rc != SPI_OK_SELECT || SPI_processed != 1)
        elog(ERROR, "pgphi: could not record the seal reservation: %s", SPI_result_code_string(rc));
    bool isnull;
    Datum result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
    uint64_t reserved = isnull ? 0 : static_cast<uint64_t>(DatumGetInt64(result));
    SPI_finish();
    return reserved;
}

void reserve_first_seals(uint32 key_id, uint32 version)
{
    if (seal_reservations_installed())
        (void)write_reservation(key_id, version, seal_reservation_block(), true);
}

namespace {

struct ReservationRow {
    bool found;
    Oid database;
    uint64_t reserved;
    uint64_t incarnation;
};

SPIPlanPtr g_plan_reservation = nullptr;

void collect_reservation(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* out = static_cast<ReservationRow*>(arg);
    bool isnull;
    out->found = true;
    out->database = DatumGetObjectId(SPI_getbinval(row, desc, 1, &isnull));
    out->reserved = static_cast<uint64_t>(DatumGetInt64(SPI_getbinval(row, desc, 2, &isnull)));
    out->incarnation = static_cast<uint64_t>(DatumGetInt64(SPI_getbinval(row, desc, 3, &isnull)));
}

bool counts_version(const UsageEntry& entry, const DataKey& key, Oid database)
{
    return entry.in_use && entry.database == database && entry.key_id == key.ref().key_id &&
           entry.key_version == key.ref().version;
}

// Reads the version's reservation at its first use in this server's life.
// An untrusted count (the server crashed, was promoted, or started from a
// base backup) starts at the reservation, which covers every seal made
// under it anywhere: the old primary sealed only inside it.
void sync_reservation(DataKey& key, Oid database, UsageEntry* entry)
{
    SharedState* state = shared_state();
    ReservationRow row = {};
    Oid types[2] = {INT4OID, INT4OID};
    Datum args[2] = {Int32GetDatum(static_cast<int32>(key.ref().key_id)),
                     Int32GetDatum(static_cast<int32>(key.ref().version))};
    (void)query_catalog(&g_plan_reservation,
                        "SELECT database_oid, reserved, server_incarnation FROM pgphi.seal_reservations "
                        "WHERE key_id OPERATOR(pg_catalog.=) $1 AND version OPERATOR(pg_catalog.=) $2",
                        2, types, args, 1, collect_reservation, &row, nullptr);
    if (!row.found || row.database != database)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u cannot encrypt in this database", key.name().c_str(),
                               key.ref().version),
                        row.found ? errdetail("Its data key was copied from another database (CREATE DATABASE ... "
                                              "TEMPLATE), which seals under it too: together they would pass "
                                              "the limit of values one data key may encrypt.")
                                  : errdetail("Its data key came here by a restore, and how many values it has "
                                              "encrypted elsewhere is unknown."),
                        errhint("Rotate the key in this database with pgphi.rotate_key(); values under "
                                "this version still decrypt.")));
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    if (counts_version(*entry, key, database) && !entry->synced) {
        if (!entry->trusted && row.incarnation != state->incarnation) {
            uint64_t seals = entry->seals.load();
            if (row.reserved > seals) {
                entry->seals.store(row.reserved);
                state->usage_dirty.store(true);
            }
        }
        if (row.reserved > entry->reserved.load())
            entry->reserved.store(row.reserved);
        entry->trusted = true;
        entry->synced = true;
    }
    LWLockRelease(state->lock);
}

// Seals under the version may go on only while its count plus what sessions
// hold unreported stays inside the committed reservation. Asks the broker
// for the next one half a block ahead, and waits when it is not there yet.
void require_reservation(DataKey& key, Oid database, UsageEntry* entry)
{
    SharedState* state = shared_state();
    uint64_t headroom = unreported_seal_headroom();
    uint64_t half_block = seal_reservation_block() / 2;
    int64_t deadline = now_ms() + key_wait_timeout_ms;
    bool sleeping = false;
    for (;;) {
        uint64_t needed = entry->seals.load() + headroom;
        uint64_t reserved = entry->reserved.load();
        if (!counts_version(*entry, key, database))
            break; // reclaimed meanwhile: the caller's next batch claims it again
        if (needed + half_block >= reserved && pg_atomic_exchange_u32(&entry->reservation_requested, 1) == 0)
            wake_broker();
        if (needed < reserved)
            break;
        int64_t now = now_ms();
        if (now >= deadline) {
            if (sleeping)
                ConditionVariableCancelSleep();
            raise_wait_timeout("reserve seals for a key version");
        }
        if (!sleeping) {
            ConditionVariablePrepareToSleep(&state->changed);
            sleeping = true;
            continue;
        }
        ConditionVariableTimedSleep(&state->changed, std::min<int64_t>(deadline - now, 1000),
                                    compat::key_broker_wait_event());
    }
    if (sleeping)
        ConditionVariableCancelSleep();
}

} // namespace

void report_seals(DataKey& key, Oid database)
{
    uint64_t seals = key.unreported_seals();
    if (seals == 0)
        return;
    UsageEntry* entry = usage_entry(key, database, false);
    key.take_unreported_seals();
    if (!entry)
        return;
    uint64_t total = entry->seals.fetch_add(seals, std::memory_order_relaxed) + seals;
    shared_state()->usage_dirty.store(true, std::memory_order_relaxed);
    if (total >= static_cast<uint64_t>(dek_rotation_threshold) &&
        pg_atomic_exchange_u32(&entry->rotation_requested, 1) == 0)
        wake_broker();
}

void check_seal_budget(DataKey& key, Oid database)
{
    // A standby's encryptions would escape the primary's count of what each
    // DEK has sealed (and could not be stored there anyway).
    if (RecoveryInProgress())
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
                        errmsg("cannot encrypt with pgphi on a standby"),
                        errdetail("Values are encrypted on the primary, which counts what each key seals."),
                        errhint("Encrypt on the primary; standbys decrypt.")));
    UsageEntry* entry = usage_entry(key, database, true);
    if (!entry)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_RESOURCES),
                        errmsg("pgphi cannot count the values key \"%s\" version %u encrypts", key.name().c_str(),
                               key.ref().version),
                        errdetail("The shared table of seal counts holds %d key versions, and it is full; an "
                                  "uncounted version would escape its limit of values.",
                                  kUsageEntries),
                        errhint("Deterministic encryption still works; see \"Seal counts\" in docs/broker-and-cache.md.")));
    if (seal_reservations_installed()) {
        if (!entry->synced)
            sync_reservation(key, database, entry);
        require_reservation(key, database, entry);
    }
    uint64_t shares = in_citus_cluster() ? kCitusNodeShares : 1;
    if (entry->seals.load(std::memory_order_relaxed) >= hard_seal_limit() / shares)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u has encrypted as many values as is safe",
                               key.name().c_str(), key.ref().version),
                        shares == 1 ? errdetail("Random 96-bit nonces allow about %llu values per DEK.",
                                                static_cast<unsigned long long>(hard_seal_limit()))
                                    : errdetail("Random 96-bit nonces allow about %llu values per DEK; each node "
                                                "of a Citus cluster encrypts at most 1/%llu of them.",
                                                static_cast<unsigned long long>(hard_seal_limit()),
                                                static_cast<unsigned long long>(shares)),
                        errhint("Rotate the key with pgphi.rotate_key(); the automatic rotation has not "
                                "happened (see the server log).")));
}

void report_key_use(uint32_t slot_index, int64_t now)
{
    SharedState* state = shared_state();
    // The slot may have been reused meanwhile; that only keeps another key
    // alive a little longer.
    if (slot_index < state->capacity)
        state->table().at(slot_index).last_used_ms.store(now, std::memory_order_relaxed);
}

void get_dek(const cache::UnwrapRequest& request, uint8_t* dek, int64_t* valid_until_ms, uint32_t* slot_index)
{
    SharedState* state = shared_state();
    cache::Table table = state->table();
    cache::Digest digest;
    call_core([&] { digest = cache::digest_of(request); });
    int64_t deadline = now_ms() + key_wait_timeout_ms;
    bool asked = false;

    ConditionVariablePrepareToSleep(&state->changed);
    for (;;) {
        LWLockAcquire(state->lock, LW_SHARED);
        cache::Slot* slot = table.find(digest);
        int64_t now = now_ms();
        if (slot && table.usable(*slot, now)) {
            std::memcpy(dek, slot->dek, cache::kDekSize);
            *valid_until_ms = slot->serve_until_ms;
            *slot_index = table.index_of(*slot);
            slot->last_used_ms.store(now, std::memory_order_relaxed);
            LWLockRelease(state->lock);
            if (!asked)
                state->stats.hits.fetch_add(1, std::memory_order_relaxed);
            break;
        }
        if (slot && slot->state == cache::SlotState::Failed && asked) {
            cache::FailureRecord failure = slot->failure;
            LWLockRelease(state->lock);
            ConditionVariableCancelSleep();
            raise_failure(failure, "unwrap", request);
        }
        bool must_ask = !asked || !slot;
        LWLockRelease(state->lock);

        if (must_ask) {
            // Post (or re-post) the request; a slot already pending for this
            // DEK is shared: one key-manager call serves every waiter.
            LWLockAcquire(state->lock, LW_EXCLUSIVE);
            slot = table.find(digest);
            if (!slot) {
                bool evicted = false;
                slot = table.claim(digest, now, &evicted);
                if (!slot) {
                    LWLockRelease(state->lock);
                    ConditionVariableCancelSleep();
                    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_RESOURCES),
                                    errmsg("pgphi key cache is full of pending requests"),
                                    errhint("Increase pgphi.cache_size.")));
                }
                slot->request = request;
                if (evicted)
                    state->stats.evictions.fetch_add(1, std::memory_order_relaxed);
            } else if (!slot->in_flight &&
                       (slot->state == cache::SlotState::Failed ||
                        (slot->state == cache::SlotState::Ready && !table.usable(*slot, now)))) {
                // (A slot the broker is already calling about is simply waited
                // for: its answer wakes us.)
                table.retry(*slot);
            }
            LWLockRelease(state->lock);
            if (!asked)
                state->stats.misses.fetch_add(1, std::memory_order_relaxed);
            asked = true;
            wake_broker();
            continue;
        }
        if (now >= deadline) {
            ConditionVariableCancelSleep();
            raise_wait_timeout("answer");
        }
        ConditionVariableTimedSleep(&state->changed, deadline - now, compat::key_broker_wait_event());
    }
    ConditionVariableCancelSleep();
}

namespace {

// Posts `prototype` (operation, key and its other inputs) in a free admin
// request, waits for the broker to finish it, copies the result out and frees
// the request; raises the broker's failure, naming `action`.
void run_posted_request(const AdminRequest& prototype, const char* action, AdminRequest* result)
{
    const cache::UnwrapRequest& key = prototype.key;
    SharedState* state = shared_state();
    int64_t deadline = now_ms() + key_wait_timeout_ms;
    AdminRequest* request = nullptr;
    uint64_t ticket = state->next_ticket.fetch_add(1);

    ConditionVariablePrepareToSleep(&state->changed);
    while (!request) {
        LWLockAcquire(state->lock, LW_EXCLUSIVE);
        for (AdminRequest& candidate : state->admin)
            if (candidate.state == AdminRequest::State::Free) {
                request = &candidate;
                *request = prototype;
                request->ticket = ticket;
                request->state = AdminRequest::State::Pending;
                break;
            }
        LWLockRelease(state->lock);
        if (request)
            break;
        int64_t left = deadline - now_ms(); // read once: a negative timeout would mean no timeout
        if (left <= 0) {
            ConditionVariableCancelSleep();
            raise_wait_timeout("take the key request");
        }
        ConditionVariableTimedSleep(&state->changed, left, compat::key_broker_wait_event());
    }
    wake_broker();

    for (;;) {
        LWLockAcquire(state->lock, LW_EXCLUSIVE);
        if (request->ticket == ticket && request->state == AdminRequest::State::Done) {
            *result = *request;
            explicit_bzero(request, sizeof(*request));
            request->state = AdminRequest::State::Free;
            LWLockRelease(state->lock);
            ConditionVariableBroadcast(&state->changed); // someone may wait for a free request
            break;
        }
        LWLockRelease(state->lock);
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            ConditionVariableCancelSleep();
            raise_wait_timeout("create the key");
        }
        ConditionVariableTimedSleep(&state->changed, left, compat::key_broker_wait_event());
    }
    ConditionVariableCancelSleep();
    if (!result->ok)
        raise_failure(result->failure, action, key);
}

} // namespace

const char* admin_action(AdminRequest::Operation operation)
{
    switch (operation) {
    case AdminRequest::Operation::Generate: return "generate";
    case AdminRequest::Operation::Rewrap: return "rewrap";
    case AdminRequest::Operation::CreateKek: return "create_kek";
    case AdminRequest::Operation::Rekey: return "rekey";
    case AdminRequest::Operation::CreateDedicatedKek: return "create_dedicated_kek";
    case AdminRequest::Operation::DeleteDedicatedKek: return "delete_dedicated_kek";
    }
    return "admin";
}

void run_admin_request(AdminRequest::Operation operation, const cache::UnwrapRequest& key,
                       bool may_create_local_kek, AdminRequest* result)
{
    AdminRequest* prototype = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    prototype->operation = operation;
    prototype->key = key;
    prototype->may_create_local_kek = may_create_local_kek;
    run_posted_request(*prototype, admin_action(operation), result);
    explicit_bzero(prototype, sizeof(*prototype));
    pfree(prototype);
}

void run_rekey_request(const cache::UnwrapRequest& source, const char* to_provider, const char* to_kek_ref,
                       AdminRequest* result)
{
    AdminRequest* prototype = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    prototype->operation = AdminRequest::Operation::Rekey;
    prototype->key = source;
    strlcpy(prototype->to_provider, to_provider, sizeof(prototype->to_provider));
    strlcpy(prototype->to_kek_ref, to_kek_ref, sizeof(prototype->to_kek_ref));
    run_posted_request(*prototype, "rekey", result);
    explicit_bzero(prototype, sizeof(*prototype));
    pfree(prototype);
}

} // namespace pgphi::pg
