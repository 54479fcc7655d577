#include "shared/postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "access/xlog.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/condition_variable.h"
#include "storage/fd.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
}

#include <atomic>
#include <cstring>

#include "shared/alerts.hpp"
#include "shared/audit_internal.hpp"
#include "shared/shared_state.hpp"
#include "workers/audit_writer.hpp"
#include "workers/database_worker.hpp"

namespace pgphi::pg {

using namespace audit_detail;

namespace {

constexpr int kWriterSlots = 32;
constexpr int64_t kVolumeFlushMs = 10'000;   // counts reach the table within about this
constexpr int64_t kMinRelaunchMs = 1'000;    // per database, also after a failed writer
constexpr int64_t kReportIntervalMs = 60'000; // the log's summaries of a full queue or worker pool
// A database whose writers keep failing (dropped meanwhile, say) must not
// hold queue entries forever: after this many writers that started and
// failed, its entries are dropped (counted, and logged once). A writer that
// could not even start (no free worker slot) is no attempt.
constexpr uint8_t kMaxFailedWriters = 20;

// ---------------------------------------------------------------------------
// Audit writer: runs in one database, claims that database's queued events
// and counts, moves them into its tables in one transaction, then removes
// what it wrote. A writer that fails (error, FATAL, a dropped database)
// gives back what it claimed at exit, counting one failed attempt on it.
// ---------------------------------------------------------------------------

struct WriterSlot {
    Oid database;
    BackgroundWorkerHandle* handle;
    int64_t launched_ms;
};

WriterSlot g_writers[kWriterSlots]; // the broker's own

// The broker's rate limits for its log lines (it is the only process that
// writes these summaries, so a flood of events never floods the log).
int64_t g_no_slot_reported_ms = 0;
uint64_t g_no_slot_failures = 0;      // launches refused since the last report
int64_t g_queue_reported_ms = 0;
uint64_t g_reported_overflow = 0;
uint64_t g_reported_dropped = 0;

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

// Registering a worker fails when every max_worker_processes slot is taken
// (parallel queries alone can do that). Nothing is lost: the events stay
// queued, and the next loop tries again. The log says so once a minute.
void report_no_worker_slot(Oid database, int64_t now)
{
    ++g_no_slot_failures;
    if (g_no_slot_reported_ms != 0 && now - g_no_slot_reported_ms < kReportIntervalMs)
        return;
    uint32_t queued = 0;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    queued = g_audit->queued_events;
    LWLockRelease(g_audit->lock);
    ereport(WARNING, (errmsg("pgphi could not start an audit writer for database %u: no background worker slot "
                             "is free",
                             database),
                      errdetail("%u audit events are waiting in shared memory; %llu writer launches were "
                                "refused since the last report. They are retried every second and nothing is "
                                "lost while they wait.",
                                queued, static_cast<unsigned long long>(g_no_slot_failures)),
                      errhint("Raise max_worker_processes (and keep max_parallel_workers below it).")));
    g_no_slot_reported_ms = now;
    g_no_slot_failures = 0;
}

// Events that found the queue full are not logged one by one by the
// sessions: the broker sums them up here, at most once a minute.
void report_queue_overflow(int64_t now)
{
    uint64_t overflow = g_audit->overflow_events.load();
    uint64_t dropped = g_audit->dropped_events.load();
    if ((overflow == g_reported_overflow && dropped == g_reported_dropped) ||
        (g_queue_reported_ms != 0 && now - g_queue_reported_ms < kReportIntervalMs))
        return;
    ereport(LOG, (errmsg("pgphi audit queue was full: %llu events were recorded only as counts per role and "
                         "action, %llu were not recorded",
                         static_cast<unsigned long long>(overflow - g_reported_overflow),
                         static_cast<unsigned long long>(dropped - g_reported_dropped)),
                  errdetail("Counted since the last report; pgphi.audit_queue_status() has the totals.")));
    g_reported_overflow = overflow;
    g_reported_dropped = dropped;
    g_queue_reported_ms = now;
}

void launch_writer(Oid database, int64_t now)
{
    WriterSlot* slot = writer_slot_for(database, now);
    if (!slot || now - slot->launched_ms < kMinRelaunchMs || writer_running(*slot))
        return;
    if (slot->handle) {
        pfree(slot->handle);
        slot->handle = nullptr;
    }
    char name[BGW_MAXLEN];
    snprintf(name, sizeof(name), "pgphi audit writer (database %u)", database);
    // Whether or not a slot was free, the next try is a second away.
    slot->launched_ms = now;
    if (!start_database_worker("pgphi_audit_writer_main", ObjectIdGetDatum(database), name, "pgphi audit writer",
                               &slot->handle)) {
        slot->handle = nullptr;
        report_no_worker_slot(database, now);
    }
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

bool query_bool(const char* sql)
{
    int rc = SPI_execute(sql, true, 1);
    bool isnull = true;
    return rc == SPI_OK_SELECT && SPI_processed == 1 &&
           DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) && !isnull;
}

// What the database's pgphi can take: 0.3.0 records coalesced events with
// their count and times; 0.2.0 one row per event (a count goes into its
// detail); before that, nothing.
enum class AuditSchema { None, OneRowPerEvent, Coalesced };

AuditSchema installed_audit_schema()
{
    // (Type names qualified: a worker runs with the database's search_path.)
    if (query_bool("SELECT pg_catalog.to_regprocedure('pgphi._record_audit_event(pg_catalog.timestamptz,"
                   "pg_catalog.text,pg_catalog.text,pg_catalog.text,pg_catalog.int4,pg_catalog.text,pg_catalog.int4,"
                   "pg_catalog.text,pg_catalog.text,pg_catalog.int8,pg_catalog.timestamptz,pg_catalog.timestamptz)')"
                   " IS NOT NULL"))
        return AuditSchema::Coalesced;
    if (query_bool("SELECT pg_catalog.to_regprocedure('pgphi._record_key_use(pg_catalog.timestamptz,"
                   "pg_catalog.text,pg_catalog.int4,pg_catalog.int8,pg_catalog.int8)') IS NOT NULL"))
        return AuditSchema::OneRowPerEvent;
    return AuditSchema::None;
}

// An alert's NOTIFY pgphi_alert, sent when the transaction that writes its
// audit row commits: once per alert (alerts are raised once per window), never
// per value, and from here because the session that raised the alert may be
// read-only or about to abort. The payload is JSON: alert (its kind), key,
// role, detail, at.
void notify_alert(const AuditEvent& event)
{
    const char* colon = strchr(event.detail, ':');
    size_t kind_length = colon ? static_cast<size_t>(colon - event.detail) : strlen(event.detail);
    const char* text = colon ? colon + 1 : "";
    while (*text == ' ')
        ++text;
    Oid types[5] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID};
    Datum values[5] = {
        PointerGetDatum(cstring_to_text_with_len(event.detail, static_cast<int>(kind_length))),
        CStringGetTextDatum(event.key_name),
        CStringGetTextDatum(role_name_or_oid(event.acting_role)),
        CStringGetTextDatum(text),
        TimestampTzGetDatum(event.first_at),
    };
    if (SPI_execute_with_args("SELECT pg_catalog.pg_notify('pgphi_alert', pg_catalog.json_build_object("
                              "'alert', $1, 'key', $2, 'role', $3, 'detail', $4, 'at', $5)::pg_catalog.text)",
                              5, types, values, nullptr, false, 1) != SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not signal an alert");
}

void write_event(const AuditEvent& event, AuditSchema schema)
{
    Oid types[12] = {TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID,
                     INT4OID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID};
    const char* detail = event.detail;
    if (schema == AuditSchema::OneRowPerEvent && event.occurrences > 1)
        detail = psprintf("%s (%llu times, the last at %s)", event.detail,
                          static_cast<unsigned long long>(event.occurrences), timestamptz_to_str(event.last_at));
    Datum values[12] = {
        TimestampTzGetDatum(event.first_at),
        CStringGetTextDatum(role_name_or_oid(event.login_role)),
        CStringGetTextDatum(role_name_or_oid(event.acting_role)),
        CStringGetTextDatum(event.action),
        Int32GetDatum(static_cast<int32>(event.key_id)),
        CStringGetTextDatum(event.key_name),
        Int32GetDatum(static_cast<int32>(event.key_version)),
        CStringGetTextDatum(event.outcome == AuditOutcome::Refused ? "refused"
                            : event.outcome == AuditOutcome::Failed ? "failed"
                                                                    : "ok"),
        CStringGetTextDatum(detail),
        Int64GetDatum(static_cast<int64>(event.occurrences)),
        TimestampTzGetDatum(event.first_at),
        TimestampTzGetDatum(event.last_at),
    };
    const char* sql = schema == AuditSchema::Coalesced
                          ? "SELECT pgphi._record_audit_event($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                          : "SELECT pgphi._record_audit_event($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    if (SPI_execute_with_args(sql, schema == AuditSchema::Coalesced ? 12 : 9, types, values, nullptr, false, 1) !=
        SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not write an audit event");
    if (strcmp(event.action, "alert") == 0)
        notify_alert(event);
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

// Values decrypted under a break-glass event, added to its row.
void write_break_glass_count(const BreakGlassCount& count)
{
    Oid types[4] = {INT4OID, OIDOID, TIMESTAMPTZOID, INT8OID};
    Datum values[4] = {Int32GetDatum(static_cast<int32>(count.key_id)), ObjectIdGetDatum(count.role),
                       TimestampTzGetDatum(count.started_at), Int64GetDatum(static_cast<int64>(count.values))};
    if (SPI_execute_with_args("SELECT pgphi._record_break_glass_use($1, $2, $3, $4)", 4, types, values, nullptr,
                              false, 1) != SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not write a break-glass count");
}

// What one writer claimed, and what it found installed.
struct WriteJob {
    const AuditEvent* events;
    int event_count;
    const VolumeSnapshot* volumes;
    int volume_count;
    const BreakGlassCount* break_glass;
    int break_glass_count;
    AuditSchema schema; // out
};

void write_claimed(void* arg)
{
    auto* job = static_cast<WriteJob*>(arg);
    job->schema = installed_audit_schema();
    if (job->schema == AuditSchema::None)
        return;
    for (int i = 0; i < job->event_count; ++i)
        write_event(job->events[i], job->schema);
    for (int i = 0; i < job->volume_count; ++i)
        write_volume(job->volumes[i]);
    bool alerts_installed =
        query_bool("SELECT pg_catalog.to_regprocedure('pgphi._volume_alerts(pg_catalog.float8,pg_catalog.int8,"
                   "pg_catalog.int4,pg_catalog.int4)') IS NOT NULL");
    if (!alerts_installed)
        return;
    for (int i = 0; i < job->break_glass_count; ++i)
        write_break_glass_count(job->break_glass[i]);
    // A role's decrypts far above its own baseline: the volumes just written
    // against the windows before (once per role, key and window).
    if (job->volume_count > 0 && g_alert_volume_factor > 0) {
        Oid types[4] = {FLOAT8OID, INT8OID, INT4OID, INT4OID};
        Datum values[4] = {Float8GetDatum(g_alert_volume_factor), Int64GetDatum(g_alert_volume_min),
                           Int32GetDatum(g_alert_volume_baseline_windows), Int32GetDatum(g_key_use_window_s)};
        if (SPI_execute_with_args("SELECT pgphi._volume_alerts($1, $2, $3, $4)", 4, types, values, nullptr, false,
                                  1) != SPI_OK_SELECT)
            elog(ERROR, "pgphi: could not check decrypt volumes");
    }
}

void anchor_if_installed(void*)
{
    if (query_bool("SELECT pg_catalog.to_regclass('pgphi.audit_anchors') IS NOT NULL")) {
        AnchorResult anchored;
        anchor_chain(&anchored);
    }
}


// This writer's claim on queued entries, and whether it wrote them.
uint64_t g_writer_claim = 0;
Oid g_writer_database = InvalidOid;
bool g_writer_done = false;

// At the exit of a writer that did not commit (an error, FATAL, a database
// dropped under it): gives back what it claimed, one failed attempt more.
// Registered before the database connection, so it runs after PostgreSQL's
// own exit callbacks have aborted the transaction and released its locks.
void release_writer_claim(int, Datum)
{
    if (g_writer_done || g_writer_claim == 0 || !g_audit)
        return;
    if (LWLockHeldByMe(g_audit->lock))
        LWLockRelease(g_audit->lock);
    uint64_t dropped_events = 0;
    uint64_t dropped_counts = 0;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    for (AuditEvent& event : g_audit->events) {
        if (!event.in_use || event.claim != g_writer_claim)
            continue;
        event.claim = 0;
        if (++event.failed_writers > kMaxFailedWriters) {
            dropped_events += event.occurrences;
            memset(&event, 0, sizeof(event));
            g_audit->queued_events--;
        }
    }
    for (VolumeEntry& entry : g_audit->volume) {
        if (!entry.in_use || entry.claim != g_writer_claim)
            continue;
        entry.claim = 0;
        if (++entry.failed_writers > kMaxFailedWriters) {
            dropped_counts += entry.counts[0].load() + entry.counts[1].load();
            entry.in_use = false;
        }
    }
    LWLockRelease(g_audit->lock);
    g_writer_claim = 0;
    if (dropped_events || dropped_counts) {
        g_audit->dropped_events.fetch_add(dropped_events);
        g_audit->dropped_counts.fetch_add(dropped_counts);
        ereport(LOG, (errmsg("pgphi dropped %llu audit events and %llu key use counts of database %u",
                             static_cast<unsigned long long>(dropped_events),
                             static_cast<unsigned long long>(dropped_counts), g_writer_database),
                      errdetail("%d audit writers in a row started and failed to write them; see the earlier "
                                "errors.",
                                kMaxFailedWriters)));
    }
}

} // namespace

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
    report_queue_overflow(now);
    LWLockAcquire(g_audit->lock, LW_SHARED);
    for (const AuditEvent& event : g_audit->events)
        if (event.in_use && event.claim == 0) // claimed ones have a writer at work
            add_due(event.database);
    for (const VolumeEntry& entry : g_audit->volume)
        if (entry.in_use && entry.claim == 0 && (entry.counts[0].load() || entry.counts[1].load()) &&
            now >= volume_flush_due_ms(entry.database))
            add_due(entry.database);
    for (const AnchorDatabase& entry : g_audit->anchor_databases)
        if (anchor_due(entry, now))
            add_due(entry.database); // its writer anchors the chain
    LWLockRelease(g_audit->lock);
    // Break-glass counts go with the volumes, about every 10 seconds.
    BreakGlassCount counts[kWriterSlots];
    int pending = collect_break_glass_counts(InvalidOid, counts, kWriterSlots);
    for (int i = 0; i < pending; ++i)
        if (now >= volume_flush_due_ms(counts[i].database))
            add_due(counts[i].database);
    for (int i = 0; i < due_count; ++i)
        launch_writer(due[i], now);
}

} // namespace pgphi::pg

extern "C" PGDLLEXPORT void pgphi_audit_writer_main(Datum);

void pgphi_audit_writer_main(Datum argument)
{
    using namespace pgphi::pg;
    Oid database = DatumGetObjectId(argument);
    begin_database_worker();
    g_writer_database = database;
    before_shmem_exit(release_writer_claim, 0);

    // What to write: claimed and copied out under the lock (before the
    // connection, so a database that cannot be connected to counts as a
    // failed attempt too), removed only once committed.
    AuditEvent* events = static_cast<AuditEvent*>(palloc(sizeof(AuditEvent) * kEventSlots));
    VolumeSnapshot* volumes = static_cast<VolumeSnapshot*>(palloc(sizeof(VolumeSnapshot) * kVolumeEntries));
    int event_count = 0;
    int volume_count = 0;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    g_writer_claim = ++g_audit->next_claim;
    for (AuditEvent& event : g_audit->events)
        if (event.in_use && event.claim == 0 && event.database == database) {
            event.claim = g_writer_claim;
            events[event_count++] = event;
        }
    for (int i = 0; i < kVolumeEntries; ++i) {
        VolumeEntry& entry = g_audit->volume[i];
        if (!entry.in_use || entry.claim != 0 || entry.database != database)
            continue;
        VolumeSnapshot& snapshot = volumes[volume_count];
        snapshot = VolumeSnapshot{i, entry.role, entry.key_id, entry.window_start,
                                  {entry.counts[0].load(), entry.counts[1].load()}};
        if (snapshot.counts[0] || snapshot.counts[1]) {
            entry.claim = g_writer_claim;
            ++volume_count;
        }
    }
    LWLockRelease(g_audit->lock);
    constexpr int kBreakGlassBatch = 256;
    BreakGlassCount* break_glass = static_cast<BreakGlassCount*>(palloc(sizeof(BreakGlassCount) * kBreakGlassBatch));
    int break_glass_count = collect_break_glass_counts(database, break_glass, kBreakGlassBatch);

    connect_database_worker(database, "writing pgphi audit events and key use counts");
    WriteJob job{events, event_count, volumes, volume_count, break_glass, break_glass_count, AuditSchema::None};
    run_in_transaction(write_claimed, &job, true);
    AuditSchema schema = job.schema;
    // Written (or, where pgphi is too old to take them, discarded).
    mark_break_glass_counts_written(break_glass, break_glass_count);

    if (schema == AuditSchema::None && (event_count || volume_count))
        ereport(LOG, (errmsg("pgphi discarded %d audit events and the key use counts of database %u", event_count,
                             database),
                      errdetail("pgphi 0.2.0 or later is not installed in that database."),
                      errhint("Run ALTER EXTENSION pgphi UPDATE there.")));

    TimestampTz current = current_window(GetCurrentTimestamp());
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    for (AuditEvent& event : g_audit->events)
        if (event.in_use && event.claim == g_writer_claim) {
            memset(&event, 0, sizeof(event));
            g_audit->queued_events--;
        }
    for (int i = 0; i < volume_count; ++i) {
        VolumeEntry& entry = g_audit->volume[volumes[i].slot];
        for (int use = 0; use < 2; ++use)
            entry.counts[use].fetch_sub(volumes[i].counts[use]);
        entry.failed_writers = 0;
        entry.claim = 0;
    }
    // Entries of past windows that nothing was added to since are done.
    for (VolumeEntry& entry : g_audit->volume)
        if (entry.in_use && entry.claim == 0 && entry.database == database && entry.window_start < current &&
            entry.counts[0].load() == 0 && entry.counts[1].load() == 0)
            entry.in_use = false;
    g_writer_done = true;
    LWLockRelease(g_audit->lock);

    // The chain's head, anchored when it changed and the interval passed:
    // in a transaction of its own, so that a failing key manager never
    // holds back the events.
    // A failure (no local KEK file where only Vault is used, a key manager
    // down) is retried every interval and logged at most once an hour.
    if (schema == AuditSchema::Coalesced && take_due_anchor(database)) {
        MemoryContext context = CurrentMemoryContext;
        PG_TRY();
        {
            pgstat_report_activity(STATE_RUNNING, "anchoring the pgphi audit log");
            run_in_transaction(anchor_if_installed, nullptr, true);
        }
        PG_CATCH();
        {
            MemoryContextSwitchTo(context);
            ErrorData* error = CopyErrorData();
            FlushErrorState();
            AbortCurrentTransaction();
            bool report = false;
            int64_t now = now_ms();
            LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
            AnchorDatabase* entry = anchor_database(database, false);
            if (entry && (entry->failure_logged_ms == 0 || now - entry->failure_logged_ms >= 3'600'000)) {
                entry->failure_logged_ms = now;
                report = true;
            }
            if (entry)
                entry->chain_changed = true; // still to be anchored
            LWLockRelease(g_audit->lock);
            if (report)
                ereport(LOG, (errmsg("pgphi could not anchor the audit log of database %u: %s", database,
                                     error->message),
                              errdetail("It is tried again every pgphi.audit_anchor_interval; this is logged at "
                                        "most once an hour."),
                              errhint("Check pgphi.audit_anchor_provider and pgphi.audit_anchor_key.")));
            FreeErrorData(error);
        }
        PG_END_TRY();
    }
}
