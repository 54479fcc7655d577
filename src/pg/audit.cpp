#include "postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "access/xlog.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
}

#include <atomic>
#include <cstring>

#include "audit.hpp"
#include "database_worker.hpp"
#include "shared_state.hpp"

namespace pgphi::pg {

namespace {

constexpr int kAuditEvents = 256;
constexpr int kVolumeEntries = 2048;
constexpr int kPendingUses = 16;
constexpr int kWriterSlots = 32;
constexpr int64_t kVolumeFlushMs = 10'000;   // counts reach the table within about this
constexpr int64_t kMinRelaunchMs = 1'000;    // per database, also after a failed writer
// A database whose writers keep failing (dropped meanwhile, say) must not
// hold queue entries forever: after this many writers, they are dropped.
constexpr uint8_t kMaxWriterAttempts = 20;

struct AuditEvent {
    bool in_use;
    AuditOutcome outcome;
    uint8_t writer_attempts;
    uint64_t id;
    Oid database;
    Oid login_role;
    Oid acting_role;
    TimestampTz at;
    uint32_t key_id;
    uint32_t key_version;
    char action[16];
    char key_name[64];
    char detail[128];
};

// Encryptions and decryptions by one role under one key in one time window.
struct VolumeEntry {
    bool in_use;
    uint8_t writer_attempts;
    Oid database;
    Oid role;
    uint32_t key_id;
    TimestampTz window_start;
    std::atomic<uint64_t> counts[2]; // indexed by KeyUse
};

struct AuditShared {
    LWLock* lock; // allocating and freeing entries; counts are atomics
    uint64_t next_event_id;
    uint32_t queued_events;
    std::atomic<uint64_t> dropped_events;
    std::atomic<uint64_t> dropped_counts;
    AuditEvent events[kAuditEvents];
    VolumeEntry volume[kVolumeEntries];
};

AuditShared* g_audit = nullptr;
int g_key_use_window_s = 3600;

// This backend's counts not yet added to shared memory. `slot` remembers the
// shared entry they went to last time, so the usual flush needs no search.
struct PendingUse {
    Oid role;
    uint32_t key_id;
    uint64_t counts[2];
    int slot;
    TimestampTz slot_window;
};

PendingUse g_pending[kPendingUses];
int g_pending_count = 0;
int g_pending_last = 0;
bool g_flush_at_exit_registered = false;

TimestampTz current_window(TimestampTz now)
{
    int64_t window_us = static_cast<int64_t>(g_key_use_window_s) * USECS_PER_SEC;
    return now - (now % window_us + window_us) % window_us;
}

bool entry_matches(const VolumeEntry& entry, const PendingUse& use, TimestampTz window)
{
    return entry.in_use && entry.database == MyDatabaseId && entry.role == use.role &&
           entry.key_id == use.key_id && entry.window_start == window;
}

// Finds or allocates the shared entry for a pending count; -1 when full.
// Called with the lock held exclusively.
int find_volume_slot(const PendingUse& use, TimestampTz window)
{
    int free_slot = -1;
    for (int i = 0; i < kVolumeEntries; ++i) {
        VolumeEntry& entry = g_audit->volume[i];
        if (entry_matches(entry, use, window))
            return i;
        if (!entry.in_use && free_slot < 0)
            free_slot = i;
    }
    if (free_slot >= 0) {
        VolumeEntry& entry = g_audit->volume[free_slot];
        entry.in_use = true;
        entry.writer_attempts = 0;
        entry.database = MyDatabaseId;
        entry.role = use.role;
        entry.key_id = use.key_id;
        entry.window_start = window;
        entry.counts[0].store(0);
        entry.counts[1].store(0);
    }
    return free_slot;
}

void add_counts(VolumeEntry& entry, const PendingUse& use)
{
    for (int i = 0; i < 2; ++i)
        if (use.counts[i])
            entry.counts[i].fetch_add(use.counts[i], std::memory_order_relaxed);
}

bool has_counts(const PendingUse& use) { return use.counts[0] != 0 || use.counts[1] != 0; }

// Adds this backend's counts to shared memory. Runs at the end of every
// transaction, also while aborting, so it must not raise an error; one that
// counted nothing takes no lock. Entries are kept (with their slots) for the
// next transaction and forgotten only when the table of pending uses is full.
void flush_pending_uses()
{
    if (!g_audit || !OidIsValid(MyDatabaseId))
        return;
    bool any = false;
    for (int i = 0; i < g_pending_count && !any; ++i)
        any = has_counts(g_pending[i]);
    if (!any)
        return;

    TimestampTz window = current_window(GetCurrentTimestamp());
    bool need_search = false;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    for (int i = 0; i < g_pending_count; ++i) {
        PendingUse& use = g_pending[i];
        if (!has_counts(use))
            continue;
        if (use.slot >= 0 && use.slot_window == window && entry_matches(g_audit->volume[use.slot], use, window)) {
            add_counts(g_audit->volume[use.slot], use);
            use.counts[0] = use.counts[1] = 0;
        } else {
            need_search = true;
        }
    }
    LWLockRelease(g_audit->lock);
    if (!need_search)
        return;

    uint64_t dropped = 0;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    for (int i = 0; i < g_pending_count; ++i) {
        PendingUse& use = g_pending[i];
        if (!has_counts(use))
            continue;
        int slot = find_volume_slot(use, window);
        if (slot >= 0)
            add_counts(g_audit->volume[slot], use);
        else
            dropped += use.counts[0] + use.counts[1];
        use.counts[0] = use.counts[1] = 0;
        use.slot = slot;
        use.slot_window = window;
    }
    LWLockRelease(g_audit->lock);
    // Only if writers cannot keep up (or no database takes them).
    if (dropped)
        g_audit->dropped_counts.fetch_add(dropped);
}

void flush_at_xact_end(XactEvent event, void*)
{
    if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_COMMIT ||
        event == XACT_EVENT_PARALLEL_ABORT)
        flush_pending_uses();
}

void flush_at_exit(int, Datum) { flush_pending_uses(); }

void copy_string(char* dst, size_t size, const char* src) { strlcpy(dst, src ? src : "", size); }

// ---------------------------------------------------------------------------
// Audit writer: runs in one database, moves that database's queued events and
// counts into its tables in one transaction, then removes what it wrote.
// ---------------------------------------------------------------------------

struct WriterSlot {
    Oid database;
    BackgroundWorkerHandle* handle;
    int64_t launched_ms;
};

WriterSlot g_writers[kWriterSlots]; // the broker's own

bool writer_running(const WriterSlot& slot)
{
    pid_t pid;
    return slot.handle && GetBackgroundWorkerPid(slot.handle, &pid) != BGWH_STOPPED;
}

// The database's slot, else a slot that was never used or whose writer is
// done and was not needed for a while.
WriterSlot* writer_slot_for(Oid database, int64_t now)
{
    for (WriterSlot& slot : g_writers)
        if (slot.database == database)
            return &slot;
    for (WriterSlot& slot : g_writers)
        if (!OidIsValid(slot.database) || (!writer_running(slot) && now - slot.launched_ms > kVolumeFlushMs)) {
            if (slot.handle)
                pfree(slot.handle);
            slot = WriterSlot{database, nullptr, 0};
            return &slot;
        }
    return nullptr; // more busy databases than slots: the next round
}

// Counts a writer started for the database against its entries, dropping
// those that have seen too many writers come and go.
void note_writer_launch(Oid database)
{
    uint64_t dropped_events = 0;
    uint64_t dropped_counts = 0;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    for (AuditEvent& event : g_audit->events)
        if (event.in_use && event.database == database && ++event.writer_attempts > kMaxWriterAttempts) {
            memset(&event, 0, sizeof(event));
            g_audit->queued_events--;
            ++dropped_events;
        }
    for (VolumeEntry& entry : g_audit->volume)
        if (entry.in_use && entry.database == database && ++entry.writer_attempts > kMaxWriterAttempts) {
            dropped_counts += entry.counts[0].load() + entry.counts[1].load();
            entry.in_use = false;
        }
    LWLockRelease(g_audit->lock);
    if (dropped_events || dropped_counts) {
        g_audit->dropped_events.fetch_add(dropped_events);
        g_audit->dropped_counts.fetch_add(dropped_counts);
        ereport(LOG, (errmsg("pgphi dropped %llu audit events and %llu key use counts of database %u",
                             static_cast<unsigned long long>(dropped_events),
                             static_cast<unsigned long long>(dropped_counts), database),
                      errdetail("%d audit writers in a row could not write them; see the earlier errors.",
                                kMaxWriterAttempts)));
    }
}

void launch_writer(Oid database, int64_t now)
{
    WriterSlot* slot = writer_slot_for(database, now);
    if (!slot || now - slot->launched_ms < kMinRelaunchMs || writer_running(*slot))
        return;
    note_writer_launch(database);
    if (slot->handle) {
        pfree(slot->handle);
        slot->handle = nullptr;
    }
    char name[BGW_MAXLEN];
    snprintf(name, sizeof(name), "pgphi audit writer (database %u)", database);
    if (start_database_worker("pgphi_audit_writer_main", ObjectIdGetDatum(database), name, "pgphi audit writer",
                              &slot->handle))
        slot->launched_ms = now;
}

int64_t volume_flush_due_ms(Oid database)
{
    for (const WriterSlot& slot : g_writers)
        if (slot.database == database)
            return slot.launched_ms + kVolumeFlushMs;
    return 0;
}

char* role_name_or_oid(Oid role)
{
    char* name = GetUserNameFromId(role, true);
    return name ? name : psprintf("(dropped role %u)", role);
}

bool audit_functions_installed()
{
    int rc = SPI_execute("SELECT pg_catalog.to_regprocedure('pgphi._record_key_use(timestamptz,text,integer,"
                         "bigint,bigint)') IS NOT NULL",
                         true, 1);
    bool isnull = true;
    return rc == SPI_OK_SELECT && SPI_processed == 1 &&
           DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) && !isnull;
}

void write_event(const AuditEvent& event)
{
    Oid types[9] = {TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID, INT4OID, TEXTOID, TEXTOID};
    Datum values[9] = {
        TimestampTzGetDatum(event.at),
        CStringGetTextDatum(role_name_or_oid(event.login_role)),
        CStringGetTextDatum(role_name_or_oid(event.acting_role)),
        CStringGetTextDatum(event.action),
        Int32GetDatum(static_cast<int32>(event.key_id)),
        CStringGetTextDatum(event.key_name),
        Int32GetDatum(static_cast<int32>(event.key_version)),
        CStringGetTextDatum(event.outcome == AuditOutcome::Refused ? "refused" : "failed"),
        CStringGetTextDatum(event.detail),
    };
    if (SPI_execute_with_args("SELECT pgphi._record_audit_event($1, $2, $3, $4, $5, $6, $7, $8, $9)", 9, types,
                              values, nullptr, false, 1) != SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not write an audit event");
}

struct VolumeSnapshot {
    int slot;
    Oid role;
    uint32_t key_id;
    TimestampTz window_start;
    uint64_t counts[2];
};

void write_volume(const VolumeSnapshot& volume)
{
    Oid types[5] = {TIMESTAMPTZOID, TEXTOID, INT4OID, INT8OID, INT8OID};
    Datum values[5] = {
        TimestampTzGetDatum(volume.window_start),
        CStringGetTextDatum(role_name_or_oid(volume.role)),
        Int32GetDatum(static_cast<int32>(volume.key_id)),
        Int64GetDatum(static_cast<int64>(volume.counts[0])),
        Int64GetDatum(static_cast<int64>(volume.counts[1])),
    };
    if (SPI_execute_with_args("SELECT pgphi._record_key_use($1, $2, $3, $4, $5)", 5, types, values, nullptr, false,
                              1) != SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not write key use counts");
}

} // namespace

void queue_audit_event(const char* action, AuditOutcome outcome, uint32_t key_id, uint32_t key_version,
                       const char* key_name, const char* detail)
{
    if (!g_audit || !OidIsValid(MyDatabaseId))
        return;
    bool queued = false;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    for (AuditEvent& event : g_audit->events) {
        if (event.in_use)
            continue;
        event.in_use = true;
        event.outcome = outcome;
        event.writer_attempts = 0;
        event.id = ++g_audit->next_event_id;
        event.database = MyDatabaseId;
        event.login_role = GetSessionUserId();
        event.acting_role = GetUserId();
        event.at = GetCurrentTimestamp();
        event.key_id = key_id;
        event.key_version = key_version;
        copy_string(event.action, sizeof(event.action), action);
        copy_string(event.key_name, sizeof(event.key_name), key_name);
        copy_string(event.detail, sizeof(event.detail), detail);
        g_audit->queued_events++;
        queued = true;
        break;
    }
    LWLockRelease(g_audit->lock);
    if (queued) {
        wake_broker();
    } else {
        g_audit->dropped_events.fetch_add(1);
        ereport(LOG, (errmsg("pgphi audit queue is full: a \"%s\" event on key \"%s\" was not recorded in "
                             "pgphi.audit_log",
                             action, key_name)));
    }
}

void queue_audit_event(const char* action, AuditOutcome outcome, const DataKey& key, const char* detail)
{
    queue_audit_event(action, outcome, key.ref().key_id, key.ref().version, key.name().c_str(), detail);
}

void count_key_use(uint32_t key_id, KeyUse use)
{
    Oid role = GetUserId();
    PendingUse* pending = &g_pending[g_pending_last];
    if (g_pending_last >= g_pending_count || pending->role != role || pending->key_id != key_id) {
        pending = nullptr;
        for (int i = 0; i < g_pending_count; ++i)
            if (g_pending[i].role == role && g_pending[i].key_id == key_id) {
                pending = &g_pending[i];
                g_pending_last = i;
                break;
            }
        if (!pending) {
            if (!g_flush_at_exit_registered) {
                before_shmem_exit(flush_at_exit, 0);
                g_flush_at_exit_registered = true;
            }
            if (g_pending_count == kPendingUses) {
                flush_pending_uses();
                g_pending_count = 0;
            }
            g_pending_last = g_pending_count++;
            pending = &g_pending[g_pending_last];
            *pending = PendingUse{role, key_id, {0, 0}, -1, 0};
        }
    }
    pending->counts[static_cast<int>(use)]++;
}

Size audit_shared_size() { return sizeof(AuditShared); }

void request_audit_lwlock() { RequestNamedLWLockTranche("pgphi_audit", 1); }

void init_audit_shared_memory(void* memory, bool found)
{
    if (!found) {
        memset(memory, 0, sizeof(AuditShared));
        auto* audit = new (memory) AuditShared;
        audit->lock = &(GetNamedLWLockTranche("pgphi_audit"))->lock;
    }
    g_audit = static_cast<AuditShared*>(memory);
}

void launch_audit_writers()
{
    if (!g_audit || RecoveryInProgress())
        return; // a standby's tables are read-only; its refusals are in its server log
    Oid due[kWriterSlots];
    int due_count = 0;
    int64_t now = now_ms();
    auto add_due = [&](Oid database) {
        for (int i = 0; i < due_count; ++i)
            if (due[i] == database)
                return;
        if (due_count < kWriterSlots)
            due[due_count++] = database;
    };
    LWLockAcquire(g_audit->lock, LW_SHARED);
    for (const AuditEvent& event : g_audit->events)
        if (event.in_use)
            add_due(event.database);
    for (const VolumeEntry& entry : g_audit->volume)
        if (entry.in_use && (entry.counts[0].load() || entry.counts[1].load()) &&
            now >= volume_flush_due_ms(entry.database))
            add_due(entry.database);
    LWLockRelease(g_audit->lock);
    for (int i = 0; i < due_count; ++i)
        launch_writer(due[i], now);
}

AuditCounters audit_counters()
{
    AuditCounters counters{0, 0, 0};
    if (!g_audit)
        return counters;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    counters.queued_events = g_audit->queued_events;
    LWLockRelease(g_audit->lock);
    counters.dropped_events = g_audit->dropped_events.load();
    counters.dropped_counts = g_audit->dropped_counts.load();
    return counters;
}

void define_audit_settings()
{
    DefineCustomIntVariable("pgphi.key_use_window",
                            "Length of the time windows in which pgphi.key_use_stats counts encryptions and "
                            "decryptions per role and key.",
                            nullptr, &g_key_use_window_s, 3600, 60, 86400 * 7, PGC_SIGHUP, GUC_UNIT_S, nullptr,
                            nullptr, nullptr);
    RegisterXactCallback(flush_at_xact_end, nullptr);
}

} // namespace pgphi::pg

extern "C" PGDLLEXPORT void pgphi_audit_writer_main(Datum);

void pgphi_audit_writer_main(Datum argument)
{
    using namespace pgphi::pg;
    Oid database = DatumGetObjectId(argument);
    pqsignal(SIGTERM, die); // not bgworker_die, which raises FATAL in the handler, inside SPI
    BackgroundWorkerUnblockSignals();
    BackgroundWorkerInitializeConnectionByOid(database, InvalidOid, 0);
    pgstat_report_activity(STATE_RUNNING, "writing pgphi audit events and key use counts");

    // What to write: copied out under the lock, removed only once committed,
    // so a writer that fails leaves everything for the next one.
    AuditEvent* events = static_cast<AuditEvent*>(palloc(sizeof(AuditEvent) * kAuditEvents));
    VolumeSnapshot* volumes = static_cast<VolumeSnapshot*>(palloc(sizeof(VolumeSnapshot) * kVolumeEntries));
    int event_count = 0;
    int volume_count = 0;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    for (const AuditEvent& event : g_audit->events)
        if (event.in_use && event.database == database)
            events[event_count++] = event;
    for (int i = 0; i < kVolumeEntries; ++i) {
        const VolumeEntry& entry = g_audit->volume[i];
        if (!entry.in_use || entry.database != database)
            continue;
        VolumeSnapshot& snapshot = volumes[volume_count];
        snapshot = VolumeSnapshot{i, entry.role, entry.key_id, entry.window_start,
                                  {entry.counts[0].load(), entry.counts[1].load()}};
        if (snapshot.counts[0] || snapshot.counts[1])
            ++volume_count;
    }
    LWLockRelease(g_audit->lock);

    SetCurrentStatementStartTimestamp();
    StartTransactionCommand();
    SPI_connect();
    PushActiveSnapshot(GetTransactionSnapshot());
    bool installed = audit_functions_installed();
    if (installed) {
        for (int i = 0; i < event_count; ++i)
            write_event(events[i]);
        for (int i = 0; i < volume_count; ++i)
            write_volume(volumes[i]);
    }
    SPI_finish();
    PopActiveSnapshot();
    CommitTransactionCommand();

    if (!installed && (event_count || volume_count))
        ereport(LOG, (errmsg("pgphi discarded %d audit events and the key use counts of database %u", event_count,
                             database),
                      errdetail("pgphi 0.2.0 or later is not installed in that database."),
                      errhint("Run ALTER EXTENSION pgphi UPDATE there.")));

    TimestampTz current = current_window(GetCurrentTimestamp());
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    for (int i = 0; i < event_count; ++i)
        for (AuditEvent& event : g_audit->events)
            if (event.in_use && event.id == events[i].id) {
                memset(&event, 0, sizeof(event));
                g_audit->queued_events--;
                break;
            }
    for (int i = 0; i < volume_count; ++i) {
        VolumeEntry& entry = g_audit->volume[volumes[i].slot];
        for (int use = 0; use < 2; ++use)
            entry.counts[use].fetch_sub(volumes[i].counts[use]);
        entry.writer_attempts = 0;
    }
    // Entries of past windows that nothing was added to since are done.
    for (VolumeEntry& entry : g_audit->volume)
        if (entry.in_use && entry.database == database && entry.window_start < current &&
            entry.counts[0].load() == 0 && entry.counts[1].load() == 0)
            entry.in_use = false;
    LWLockRelease(g_audit->lock);
}

// pgphi.audit_queue_status(): events waiting for the audit writer, and what
// was lost because the queue or the count table was full.
PGPHI_FUNCTION(pgphi_audit_queue_status)
{
    using namespace pgphi::pg;
    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_audit_queue_status must return a composite type");
    AuditCounters counters = audit_counters();
    Datum values[3] = {Int32GetDatum(static_cast<int32>(counters.queued_events)),
                       Int64GetDatum(static_cast<int64>(counters.dropped_events)),
                       Int64GetDatum(static_cast<int64>(counters.dropped_counts))};
    bool nulls[3] = {false, false, false};
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}
