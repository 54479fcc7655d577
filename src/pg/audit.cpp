#include "postgres.hpp"

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

#include "audit.hpp"
#include "database_worker.hpp"
#include "error_bridge.hpp"
#include "providers.hpp"
#include "settings.hpp"
#include "shared_state.hpp"

namespace pgphi::pg {

namespace {

constexpr int kAuditEvents = 256;     // distinct events (identical ones coalesce)
constexpr int kOverflowEvents = 64;   // when those are full: counts per role and action
constexpr int kEventSlots = kAuditEvents + kOverflowEvents;
constexpr int kVolumeEntries = 2048;
constexpr int kPendingUses = 16;
constexpr int kWriterSlots = 32;
constexpr int64_t kVolumeFlushMs = 10'000;   // counts reach the table within about this
constexpr int64_t kMinRelaunchMs = 1'000;    // per database, also after a failed writer
constexpr int64_t kReportIntervalMs = 60'000; // the log's summaries of a full queue or worker pool
// A database whose writers keep failing (dropped meanwhile, say) must not
// hold queue entries forever: after this many writers that started and
// failed, its entries are dropped (counted, and logged once). A writer that
// could not even start (no free worker slot) is no attempt.
constexpr uint8_t kMaxFailedWriters = 20;
constexpr const char* kOverflowDetail = "the audit queue was full: key and detail not recorded";

// Identical events (same database, roles, action, outcome, key and detail)
// coalesce into one entry that counts them, with the first and last time.
// An entry a writer has claimed (`claim` is its ticket) takes no more
// occurrences: the next identical event starts a new entry.
struct AuditEvent {
    bool in_use;
    AuditOutcome outcome;
    uint8_t failed_writers;
    uint64_t claim;
    uint64_t id;
    uint64_t occurrences;
    Oid database;
    Oid login_role;
    Oid acting_role;
    TimestampTz first_at;
    TimestampTz last_at;
    uint32_t key_id;
    uint32_t key_version;
    char action[16];
    char key_name[64];
    char detail[128];
};

// Encryptions and decryptions by one role under one key in one time window.
struct VolumeEntry {
    bool in_use;
    uint8_t failed_writers;
    uint64_t claim;
    Oid database;
    Oid role;
    uint32_t key_id;
    TimestampTz window_start;
    std::atomic<uint64_t> counts[2]; // indexed by KeyUse
};

// A MAC over an audit anchor's message, or the check of one, asked of the
// key broker: the only process that holds key-manager credentials (and the
// local provider's KEK).
constexpr int kAnchorRequests = 8;
constexpr size_t kAnchorMessageSize = 512;
constexpr size_t kAnchorMacSize = 256;
struct AnchorRequest {
    enum class State : uint8_t { Free, Pending, InFlight, Done };
    State state;
    bool verify;
    uint64_t ticket;
    int64_t done_at_ms;
    Oid database;
    int64_t anchor_seq;
    int64_t audit_seq;
    char provider[16];              // in for a check; out for a MAC (the broker's setting)
    char key_ref[256];
    uint16_t message_size;
    char message[kAnchorMessageSize];
    char mac[kAnchorMacSize];       // in for a check, out for a MAC
    // Results
    bool ok;
    bool valid;                     // a check: the MAC is authentic
    bool regressed;                 // a MAC refused: the anchor would go back
    int64_t last_anchor_seq;        // ... behind this one
    CoreFailure failure;
};

// Per database: the last anchor known to be committed (the broker refuses
// to MAC that number or a lower one again: anchors removed and redone; an
// anchor whose transaction rolled back may be made again), and when the
// chain changed and was last anchored (the schedule). The committed state
// is saved by the broker in kAnchorStateFile and survives restarts.
constexpr int kAnchorDatabases = 64;
constexpr const char* kAnchorStateFile = "pgphi_audit_anchors"; // in the data directory
struct AnchorDatabase {
    Oid database;
    bool chain_changed;
    int64_t anchored_ms;            // last scheduled anchoring
    int64_t committed_seq;          // the last committed anchor (0: none known)
    int64_t committed_audit_seq;    // ... and the row it anchored
    int64_t failure_logged_ms;      // a failing scheduled anchor is logged once an hour
};

struct AuditShared {
    LWLock* lock; // allocating and freeing entries; counts are atomics
    uint64_t next_event_id;
    uint64_t next_claim;
    uint32_t queued_events;
    std::atomic<uint64_t> dropped_events;   // not recorded at all (overflow full, or writers failing)
    std::atomic<uint64_t> overflow_events;  // recorded only in an overflow entry
    std::atomic<uint64_t> dropped_counts;
    AuditEvent events[kEventSlots];
    VolumeEntry volume[kVolumeEntries];
    uint64_t next_anchor_ticket;
    ConditionVariable anchor_done;  // broadcast by the broker after each answer
    AnchorRequest anchors[kAnchorRequests];
    AnchorDatabase anchor_databases[kAnchorDatabases];
    std::atomic<bool> anchor_state_dirty; // committed anchors not yet saved to the file
    bool anchor_state_loaded;
};

AuditShared* g_audit = nullptr;
// The anchor this transaction stored, to be known as committed at commit.
int64_t g_pending_anchor_seq = 0;
int64_t g_pending_anchor_audit_seq = 0;
int g_pending_anchor_level = 0;

int g_key_use_window_s = 3600;
int g_anchor_interval_s = 300;
int g_anchor_provider = 0;
char* g_anchor_key = nullptr;
const struct config_enum_entry kAnchorProviders[] = {
    {"local", 0, false}, {"vault", 1, false}, {"aws_kms", 2, false}, {nullptr, 0, false}};

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
        entry.failed_writers = 0;
        entry.claim = 0;
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

void note_anchor_committed();

void flush_at_xact_end(XactEvent event, void*)
{
    if (event == XACT_EVENT_COMMIT)
        note_anchor_committed();
    else if (event == XACT_EVENT_ABORT)
        g_pending_anchor_seq = 0;
    if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_COMMIT ||
        event == XACT_EVENT_PARALLEL_ABORT)
        flush_pending_uses();
}

void flush_at_exit(int, Datum) { flush_pending_uses(); }

// An anchor stored in a subtransaction that rolls back never committed.
void forget_anchor_at_subxact_abort(SubXactEvent event, SubTransactionId, SubTransactionId, void*)
{
    if (g_pending_anchor_seq == 0)
        return;
    int level = GetCurrentTransactionNestLevel();
    if (event == SUBXACT_EVENT_ABORT_SUB && g_pending_anchor_level >= level)
        g_pending_anchor_seq = 0;
    else if (event == SUBXACT_EVENT_COMMIT_SUB && g_pending_anchor_level >= level)
        g_pending_anchor_level = level - 1;
}

void copy_string(char* dst, size_t size, const char* src) { strlcpy(dst, src ? src : "", size); }

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


// ---------------------------------------------------------------------------
// Audit anchors: the chain head (seq, row_hash) with a MAC by the key
// manager, in pgphi.audit_anchors and in the server log. Each anchor's MAC
// covers its number, time, the anchored row and hash, and the previous
// anchor's MAC, so anchors form a chain of their own.
// ---------------------------------------------------------------------------

constexpr int64_t kAbandonedAnchorMs = 60'000;

// Under the lock (exclusive when `create`).
AnchorDatabase* anchor_database(Oid database, bool create)
{
    AnchorDatabase* free_entry = nullptr;
    for (AnchorDatabase& entry : g_audit->anchor_databases) {
        if (entry.database == database)
            return &entry;
        if (!OidIsValid(entry.database) && !free_entry)
            free_entry = &entry;
    }
    if (!create || !free_entry)
        return nullptr;
    memset(free_entry, 0, sizeof(*free_entry));
    free_entry->database = database;
    return free_entry;
}

bool anchor_due(const AnchorDatabase& entry, int64_t now)
{
    return OidIsValid(entry.database) && entry.chain_changed && g_anchor_interval_s > 0 &&
           (entry.anchored_ms == 0 || now - entry.anchored_ms >= static_cast<int64_t>(g_anchor_interval_s) * 1000);
}

const char* anchor_provider_name() { return kAnchorProviders[g_anchor_provider].name; }

bool known_provider(const char* name)
{
    for (const config_enum_entry* entry = kAnchorProviders; entry->name; ++entry)
        if (strcmp(entry->name, name) == 0)
            return true;
    return false;
}

// The text an anchor's MAC covers. False when it does not fit.
bool build_anchor_message(AnchorRequest& request, int64_t anchor_seq, TimestampTz anchored_at, int64_t audit_seq,
                          const uint8_t* hash, size_t hash_size, const char* prev_mac)
{
    char hash_hex[2 * 64 + 1];
    if (hash_size > 64)
        return false;
    for (size_t i = 0; i < hash_size; ++i)
        snprintf(hash_hex + 2 * i, 3, "%02x", hash[i]);
    hash_hex[2 * hash_size] = '\0';
    int n = snprintf(request.message, sizeof(request.message), "pgphi audit anchor v1\n%lld\n%lld\n%lld\n%s\n%s",
                     static_cast<long long>(anchor_seq), static_cast<long long>(anchored_at),
                     static_cast<long long>(audit_seq), hash_hex, prev_mac);
    if (n < 0 || static_cast<size_t>(n) >= sizeof(request.message))
        return false;
    request.message_size = static_cast<uint16_t>(n);
    request.anchor_seq = anchor_seq;
    request.audit_seq = audit_seq;
    return true;
}

[[noreturn]] void raise_anchor_timeout()
{
    ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE),
                    errmsg("pgphi key broker did not answer within %d ms", key_wait_timeout_ms),
                    errdetail("It was asked for an audit anchor's MAC."),
                    errhint("Check that the key broker runs (pgphi.broker_status()).")));
}

// Posts the request to the broker and waits for its answer (at most
// pgphi.key_wait_timeout; cancel works). `request` comes back answered.
void ask_broker(AnchorRequest& request)
{
    int64_t deadline = now_ms() + key_wait_timeout_ms;
    int index = -1;
    uint64_t ticket = 0;
    ConditionVariablePrepareToSleep(&g_audit->anchor_done);
    for (;;) {
        int64_t now = now_ms();
        LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
        for (int i = 0; i < kAnchorRequests && index < 0; ++i) {
            AnchorRequest& slot = g_audit->anchors[i];
            // A Done slot nobody collected belonged to a cancelled session.
            if (slot.state == AnchorRequest::State::Free ||
                (slot.state == AnchorRequest::State::Done && now - slot.done_at_ms > kAbandonedAnchorMs))
                index = i;
        }
        if (index >= 0) {
            ticket = ++g_audit->next_anchor_ticket;
            request.ticket = ticket;
            request.state = AnchorRequest::State::Pending;
            g_audit->anchors[index] = request;
        }
        LWLockRelease(g_audit->lock);
        if (index >= 0)
            break;
        if (now >= deadline) {
            ConditionVariableCancelSleep();
            raise_anchor_timeout();
        }
        ConditionVariableTimedSleep(&g_audit->anchor_done, std::min<int64_t>(deadline - now, 100), PG_WAIT_EXTENSION);
    }
    wake_broker();
    for (;;) {
        int64_t now = now_ms();
        LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
        AnchorRequest& slot = g_audit->anchors[index];
        if (slot.ticket == ticket && slot.state == AnchorRequest::State::Done) {
            request = slot;
            memset(&slot, 0, sizeof(slot));
            LWLockRelease(g_audit->lock);
            break;
        }
        if (now >= deadline) {
            if (slot.ticket == ticket)
                memset(&slot, 0, sizeof(slot)); // a late answer finds another ticket and is dropped
            LWLockRelease(g_audit->lock);
            ConditionVariableCancelSleep();
            raise_anchor_timeout();
        }
        LWLockRelease(g_audit->lock);
        ConditionVariableTimedSleep(&g_audit->anchor_done, deadline - now, PG_WAIT_EXTENSION);
    }
    ConditionVariableCancelSleep();
}

// In the broker: answers one request.
void serve_anchor_request(int index)
{
    AnchorRequest& shared = g_audit->anchors[index];
    AnchorRequest job;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    if (shared.state != AnchorRequest::State::Pending) {
        LWLockRelease(g_audit->lock);
        return;
    }
    shared.state = AnchorRequest::State::InFlight;
    job = shared;
    // An anchor must come after the last one this server made for the
    // database: a lower number means anchors were removed and are being
    // redone over a rewritten chain.
    if (!job.verify) {
        AnchorDatabase* known = anchor_database(job.database, false);
        if (known && known->committed_seq != 0 &&
            (job.anchor_seq <= known->committed_seq || job.audit_seq < known->committed_audit_seq)) {
            job.regressed = true;
            job.last_anchor_seq = known->committed_seq;
        }
    }
    LWLockRelease(g_audit->lock);

    ByteView message(reinterpret_cast<const uint8_t*>(job.message), job.message_size);
    if (job.verify) {
        job.ok = run_core(job.failure, [&] {
            job.valid = provider_named(job.provider).verify_audit_mac(job.key_ref, message, std::string(job.mac));
        });
    } else if (!job.regressed) {
        strlcpy(job.provider, anchor_provider_name(), sizeof(job.provider));
        const char* key = g_anchor_key && g_anchor_key[0] ? g_anchor_key
                          : g_anchor_provider == 0       ? "default"
                                                         : "";
        strlcpy(job.key_ref, key, sizeof(job.key_ref));
        job.ok = run_core(job.failure, [&] {
            if (job.key_ref[0] == '\0')
                throw Error(ErrorCode::ConfigError, "pgphi.audit_anchor_key is not set",
                            "The Vault and AWS KMS providers anchor with a key named by that setting.");
            std::string mac = provider_named(job.provider).audit_mac(job.key_ref, message);
            if (mac.size() >= sizeof(job.mac))
                throw Error(ErrorCode::ProviderError, "the key provider returned an oversized MAC");
            memcpy(job.mac, mac.c_str(), mac.size() + 1);
        });
    }
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    if (shared.ticket == job.ticket && shared.state == AnchorRequest::State::InFlight) {
        shared = job;
        shared.state = AnchorRequest::State::Done;
        shared.done_at_ms = now_ms();
    }
    LWLockRelease(g_audit->lock);
    ConditionVariableBroadcast(&g_audit->anchor_done);
}

struct AnchorResult {
    bool exists;         // false: the chain is empty
    int64_t anchor_seq;
    int64_t audit_seq;
    char audit_hash[2 * 64 + 1];
    char mac[kAnchorMacSize];
};

int64_t spi_int8(int row, int column, bool* isnull)
{
    Datum d = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, column, isnull);
    return *isnull ? 0 : DatumGetInt64(d);
}

// Anchors the chain's head, unless the last anchor already covers it. Runs
// inside a transaction with SPI connected, as the extension's owner.
void anchor_chain(AnchorResult* result)
{
    memset(result, 0, sizeof(*result));
    if (SPI_execute("SELECT pg_catalog.pg_advisory_xact_lock("
                    "'pgphi.audit_anchors'::pg_catalog.regclass::pg_catalog.oid::pg_catalog.int4, 0)",
                    false, 0) != SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not lock pgphi.audit_anchors");
    bool isnull = true;
    int64_t last_anchor = 0;
    int64_t last_audit_seq = -1;
    char prev_mac[kAnchorMacSize] = "";
    // Not read-only: in READ COMMITTED each read then sees what committed
    // before the lock was granted (an anchor made meanwhile, say).
    if (SPI_execute("SELECT anchor_seq, audit_seq, mac FROM pgphi.audit_anchors ORDER BY anchor_seq DESC LIMIT 1",
                    false, 1) != SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not read pgphi.audit_anchors");
    if (SPI_processed == 1) {
        last_anchor = spi_int8(0, 1, &isnull);
        last_audit_seq = spi_int8(0, 2, &isnull);
        char* mac = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
        strlcpy(prev_mac, mac ? mac : "", sizeof(prev_mac));
    }
    if (SPI_execute("SELECT seq, row_hash FROM pgphi.audit_log ORDER BY seq DESC LIMIT 1", false, 1) !=
        SPI_OK_SELECT)
        elog(ERROR, "pgphi: could not read pgphi.audit_log");
    if (SPI_processed != 1)
        return; // nothing to anchor yet
    int64_t head_seq = spi_int8(0, 1, &isnull);
    Datum hash_datum = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
    bytea* hash = DatumGetByteaPP(hash_datum);
    const uint8_t* hash_bytes = reinterpret_cast<const uint8_t*>(VARDATA_ANY(hash));
    size_t hash_size = VARSIZE_ANY_EXHDR(hash);
    if (hash_size > 64)
        elog(ERROR, "pgphi: the audit log's head hash is oversized");
    result->exists = true;
    result->audit_seq = head_seq;
    for (size_t i = 0; i < hash_size; ++i)
        snprintf(result->audit_hash + 2 * i, 3, "%02x", hash_bytes[i]);
    if (last_audit_seq == head_seq) {
        result->anchor_seq = last_anchor; // already anchored
        strlcpy(result->mac, prev_mac, sizeof(result->mac));
        return;
    }

    AnchorRequest request;
    memset(&request, 0, sizeof(request));
    request.verify = false;
    request.database = MyDatabaseId;
    TimestampTz anchored_at = GetCurrentTimestamp();
    if (!build_anchor_message(request, last_anchor + 1, anchored_at, head_seq, hash_bytes, hash_size, prev_mac))
        elog(ERROR, "pgphi: the audit anchor's message is too long");
    ask_broker(request);
    if (request.regressed)
        ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED),
                        errmsg("pgphi refuses to make audit anchor %lld: this server already anchored up to anchor "
                               "%lld",
                               static_cast<long long>(request.anchor_seq),
                               static_cast<long long>(request.last_anchor_seq)),
                        errdetail("Anchors were removed from pgphi.audit_anchors, or rows from pgphi.audit_log."),
                        errhint("The server log holds every anchor made (\"pgphi audit anchor\" lines).")));
    if (!request.ok)
        raise_core_failure(request.failure);

    Oid types[8] = {INT8OID, TIMESTAMPTZOID, INT8OID, BYTEAOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
    Datum values[8] = {Int64GetDatum(request.anchor_seq),    TimestampTzGetDatum(anchored_at),
                       Int64GetDatum(head_seq),              PointerGetDatum(hash),
                       CStringGetTextDatum(request.provider), CStringGetTextDatum(request.key_ref),
                       CStringGetTextDatum(prev_mac),         CStringGetTextDatum(request.mac)};
    if (SPI_execute_with_args("INSERT INTO pgphi.audit_anchors (anchor_seq, anchored_at, audit_seq, audit_hash, "
                              "provider, key_ref, prev_mac, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                              8, types, values, nullptr, false, 0) != SPI_OK_INSERT)
        elog(ERROR, "pgphi: could not store an audit anchor");
    result->anchor_seq = request.anchor_seq;
    strlcpy(result->mac, request.mac, sizeof(result->mac));
    g_pending_anchor_seq = request.anchor_seq;
    g_pending_anchor_audit_seq = head_seq;
    g_pending_anchor_level = GetCurrentTransactionNestLevel();
    // For a SIEM: the anchored head, outside the database.
    char* database = get_database_name(MyDatabaseId);
    ereport(LOG, (errhidestmt(true),
                  errmsg("pgphi audit anchor: database \"%s\" anchor %lld at %s: row %lld, head %s, mac %s "
                         "(provider %s, key %s)",
                         database ? database : "?", static_cast<long long>(request.anchor_seq),
                         timestamptz_to_str(anchored_at), static_cast<long long>(head_seq), result->audit_hash,
                         request.mac, request.provider, request.key_ref)));
}

// Whether the database's chain is due for a scheduled anchor; if so, it is
// marked as anchored now (a failing anchor is retried an interval later).
bool take_due_anchor(Oid database)
{
    bool due = false;
    int64_t now = now_ms();
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    AnchorDatabase* entry = anchor_database(database, false);
    if (entry && anchor_due(*entry, now)) {
        due = true;
        entry->chain_changed = false;
        entry->anchored_ms = now;
    }
    LWLockRelease(g_audit->lock);
    return due;
}

// At commit: the anchor this transaction stored is now a fact the broker
// holds on to (it must not be made again).
void note_anchor_committed()
{
    if (g_pending_anchor_seq == 0 || !g_audit)
        return;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    AnchorDatabase* entry = anchor_database(MyDatabaseId, true);
    if (entry && g_pending_anchor_seq > entry->committed_seq) {
        entry->committed_seq = g_pending_anchor_seq;
        entry->committed_audit_seq = g_pending_anchor_audit_seq;
    }
    LWLockRelease(g_audit->lock);
    g_audit->anchor_state_dirty.store(true);
    g_pending_anchor_seq = 0;
    wake_broker(); // to save it
}

// In the broker: the committed anchors from the file ("database anchor_seq
// audit_seq" per line), once after server start.
void load_anchor_state()
{
    FILE* in = AllocateFile(kAnchorStateFile, PG_BINARY_R);
    if (!in)
        return;
    unsigned database;
    long long anchor_seq, audit_seq;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    while (fscanf(in, "%u %lld %lld", &database, &anchor_seq, &audit_seq) == 3) {
        AnchorDatabase* entry = anchor_database(database, true);
        if (entry && anchor_seq > entry->committed_seq) {
            entry->committed_seq = anchor_seq;
            entry->committed_audit_seq = audit_seq;
        }
    }
    LWLockRelease(g_audit->lock);
    FreeFile(in);
}

// In the broker: replaces the file atomically with the committed anchors.
// A failure is logged and retried at the next loop.
void save_anchor_state()
{
    if (!g_audit->anchor_state_dirty.exchange(false))
        return;
    AnchorDatabase entries[kAnchorDatabases];
    LWLockAcquire(g_audit->lock, LW_SHARED);
    memcpy(entries, g_audit->anchor_databases, sizeof(entries));
    LWLockRelease(g_audit->lock);
    char temp[MAXPGPATH];
    snprintf(temp, sizeof(temp), "%s.tmp", kAnchorStateFile);
    FILE* out = AllocateFile(temp, PG_BINARY_W);
    bool ok = out != nullptr;
    for (int i = 0; ok && i < kAnchorDatabases; ++i)
        if (OidIsValid(entries[i].database) && entries[i].committed_seq > 0)
            fprintf(out, "%u %lld %lld\n", entries[i].database, static_cast<long long>(entries[i].committed_seq),
                    static_cast<long long>(entries[i].committed_audit_seq));
    if (out) {
        ok = fflush(out) == 0 && !ferror(out);
        if (FreeFile(out) != 0)
            ok = false;
    }
    if (!ok || durable_rename(temp, kAnchorStateFile, LOG) != 0) {
        if (!ok)
            ereport(LOG, (errcode_for_file_access(),
                          errmsg("pgphi could not save the audit anchors it made to \"%s\": %m", kAnchorStateFile)));
        unlink(temp);
        g_audit->anchor_state_dirty.store(true);
    }
}

} // namespace

namespace {

bool same_event(const AuditEvent& event, const AuditEvent& wanted)
{
    return event.in_use && event.claim == 0 && event.database == wanted.database &&
           event.key_id == wanted.key_id && event.key_version == wanted.key_version &&
           event.outcome == wanted.outcome && event.acting_role == wanted.acting_role &&
           event.login_role == wanted.login_role && strcmp(event.action, wanted.action) == 0 &&
           strcmp(event.key_name, wanted.key_name) == 0 && strcmp(event.detail, wanted.detail) == 0;
}

// Under the exclusive lock: adds one occurrence to the entry identical to
// `wanted` among slots [from, to), or takes a free one. False when full.
bool coalesce_into(const AuditEvent& wanted, int from, int to)
{
    int free_slot = -1;
    for (int i = from; i < to; ++i) {
        AuditEvent& event = g_audit->events[i];
        if (same_event(event, wanted)) {
            event.occurrences++;
            event.last_at = wanted.last_at;
            return true;
        }
        if (!event.in_use && free_slot < 0)
            free_slot = i;
    }
    if (free_slot < 0)
        return false;
    AuditEvent& event = g_audit->events[free_slot];
    event = wanted;
    event.id = ++g_audit->next_event_id;
    g_audit->queued_events++;
    return true;
}

} // namespace

void queue_audit_event(const char* action, AuditOutcome outcome, uint32_t key_id, uint32_t key_version,
                       const char* key_name, const char* detail)
{
    if (!g_audit || !OidIsValid(MyDatabaseId))
        return;
    AuditEvent wanted;
    memset(&wanted, 0, sizeof(wanted));
    wanted.in_use = true;
    wanted.outcome = outcome;
    wanted.occurrences = 1;
    wanted.database = MyDatabaseId;
    wanted.login_role = GetSessionUserId();
    wanted.acting_role = GetUserId();
    wanted.first_at = wanted.last_at = GetCurrentTimestamp();
    wanted.key_id = key_id;
    wanted.key_version = key_version;
    copy_string(wanted.action, sizeof(wanted.action), action);
    copy_string(wanted.key_name, sizeof(wanted.key_name), key_name);
    copy_string(wanted.detail, sizeof(wanted.detail), detail);

    bool queued = false;
    bool overflowed = false;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    if (coalesce_into(wanted, 0, kAuditEvents)) {
        queued = true;
    } else {
        // Too many distinct events: keep at least who did what, and how often.
        wanted.key_id = wanted.key_version = 0;
        wanted.key_name[0] = '\0';
        copy_string(wanted.detail, sizeof(wanted.detail), kOverflowDetail);
        queued = overflowed = coalesce_into(wanted, kAuditEvents, kEventSlots);
    }
    LWLockRelease(g_audit->lock);
    // No log line here: a flood must not cost one per event. The broker
    // reports these counters, at most once a minute.
    if (overflowed)
        g_audit->overflow_events.fetch_add(1);
    if (queued)
        wake_broker();
    else
        g_audit->dropped_events.fetch_add(1);
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
        ConditionVariableInit(&audit->anchor_done);
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
    for (int i = 0; i < due_count; ++i)
        launch_writer(due[i], now);
}

void serve_audit_anchors()
{
    if (!g_audit)
        return;
    if (!g_audit->anchor_state_loaded) {
        load_anchor_state();
        g_audit->anchor_state_loaded = true;
    }
    static bool save_at_exit_registered = false;
    if (!save_at_exit_registered) {
        before_shmem_exit(
            [](int, Datum) {
                if (LWLockHeldByMe(g_audit->lock)) // an error while the broker held it
                    LWLockRelease(g_audit->lock);
                save_anchor_state();
            },
            0);
        save_at_exit_registered = true;
    }
    save_anchor_state();
    for (int i = 0; i < kAnchorRequests; ++i) {
        serve_anchor_request(i);
        CHECK_FOR_INTERRUPTS();
    }
}

AuditCounters audit_counters()
{
    AuditCounters counters{0, 0, 0, 0};
    if (!g_audit)
        return counters;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    counters.queued_events = g_audit->queued_events;
    LWLockRelease(g_audit->lock);
    counters.dropped_events = g_audit->dropped_events.load();
    counters.dropped_counts = g_audit->dropped_counts.load();
    counters.overflow_events = g_audit->overflow_events.load();
    return counters;
}

void define_audit_settings()
{
    DefineCustomIntVariable("pgphi.key_use_window",
                            "Length of the time windows in which pgphi.key_use_stats counts encryptions and "
                            "decryptions per role and key.",
                            nullptr, &g_key_use_window_s, 3600, 60, 86400 * 7, PGC_SIGHUP, GUC_UNIT_S, nullptr,
                            nullptr, nullptr);
    DefineCustomIntVariable("pgphi.audit_anchor_interval",
                            "How often at most pgphi anchors a changed audit chain's head with a MAC by the key "
                            "manager; 0 turns scheduled anchors off.",
                            nullptr, &g_anchor_interval_s, 300, 0, 86400 * 7, PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY, nullptr,
                            nullptr, nullptr);
    DefineCustomEnumVariable("pgphi.audit_anchor_provider",
                             "Key provider whose key authenticates audit anchors: local, vault or aws_kms.", nullptr,
                             &g_anchor_provider, 0, kAnchorProviders, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr,
                             nullptr, nullptr);
    DefineCustomStringVariable("pgphi.audit_anchor_key",
                               "Key that authenticates audit anchors: a Vault Transit key or an AWS KMS HMAC key; "
                               "empty for the local provider.",
                               nullptr, &g_anchor_key, "", PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
    RegisterXactCallback(flush_at_xact_end, nullptr);
    RegisterSubXactCallback(forget_anchor_at_subxact_abort, nullptr);
}

} // namespace pgphi::pg

namespace pgphi::pg {
namespace {

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
} // namespace pgphi::pg

extern "C" PGDLLEXPORT void pgphi_audit_writer_main(Datum);

void pgphi_audit_writer_main(Datum argument)
{
    using namespace pgphi::pg;
    Oid database = DatumGetObjectId(argument);
    // SIGTERM sets a flag that CHECK_FOR_INTERRUPTS acts on (bgworker_die
    // would raise FATAL inside the signal handler, amid SPI).
    pqsignal(SIGTERM, die);
    BackgroundWorkerUnblockSignals();
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

    BackgroundWorkerInitializeConnectionByOid(database, InvalidOid, 0);
    pgstat_report_activity(STATE_RUNNING, "writing pgphi audit events and key use counts");

    SetCurrentStatementStartTimestamp();
    StartTransactionCommand();
    SPI_connect();
    PushActiveSnapshot(GetTransactionSnapshot());
    AuditSchema schema = installed_audit_schema();
    if (schema != AuditSchema::None) {
        for (int i = 0; i < event_count; ++i)
            write_event(events[i], schema);
        for (int i = 0; i < volume_count; ++i)
            write_volume(volumes[i]);
    }
    SPI_finish();
    PopActiveSnapshot();
    CommitTransactionCommand();

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
            SetCurrentStatementStartTimestamp();
            StartTransactionCommand();
            SPI_connect();
            PushActiveSnapshot(GetTransactionSnapshot());
            pgstat_report_activity(STATE_RUNNING, "anchoring the pgphi audit log");
            if (query_bool("SELECT pg_catalog.to_regclass('pgphi.audit_anchors') IS NOT NULL")) {
                AnchorResult anchored;
                anchor_chain(&anchored);
            }
            SPI_finish();
            PopActiveSnapshot();
            CommitTransactionCommand();
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

// pgphi.audit_queue_status(): events waiting for the audit writer, and what
// was lost because the queue or the count table was full.
PGPHI_FUNCTION(pgphi_audit_queue_status)
{
    using namespace pgphi::pg;
    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_audit_queue_status must return a composite type");
    AuditCounters counters = audit_counters();
    // 0.2.0 declared the first three columns; 0.3.0 adds overflow_events.
    Datum values[4] = {Int32GetDatum(static_cast<int32>(counters.queued_events)),
                       Int64GetDatum(static_cast<int64>(counters.dropped_events)),
                       Int64GetDatum(static_cast<int64>(counters.dropped_counts)),
                       Int64GetDatum(static_cast<int64>(counters.overflow_events))};
    bool nulls[4] = {false, false, false, false};
    if (desc->natts != 3 && desc->natts != 4)
        elog(ERROR, "pgphi_audit_queue_status: unexpected result type");
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

// pgphi.anchor_audit_log(): anchors the chain's head now (custodians and
// auditors), unless the last anchor covers it; returns that anchor.
PGPHI_FUNCTION(pgphi_anchor_audit_log)
{
    using namespace pgphi::pg;
    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_anchor_audit_log must return a composite type");
    AnchorResult anchored;
    SPI_connect();
    anchor_chain(&anchored);
    SPI_finish();
    Datum values[4] = {Int64GetDatum(anchored.anchor_seq), Int64GetDatum(anchored.audit_seq),
                       CStringGetTextDatum(anchored.audit_hash), CStringGetTextDatum(anchored.mac)};
    bool nulls[4] = {!anchored.exists, !anchored.exists, !anchored.exists, !anchored.exists};
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

// pgphi._verify_audit_anchor(anchor_seq, anchored_at, audit_seq, audit_hash,
// prev_mac, provider, key_ref, mac): whether the key manager vouches for
// the anchor. Raises the key manager's error when it cannot be asked.
PGPHI_FUNCTION(pgphi_verify_audit_anchor)
{
    using namespace pgphi::pg;
    int64 anchor_seq = PG_GETARG_INT64(0);
    TimestampTz anchored_at = PG_GETARG_TIMESTAMPTZ(1);
    int64 audit_seq = PG_GETARG_INT64(2);
    bytea* hash = PG_GETARG_BYTEA_PP(3);
    char* prev_mac = text_to_cstring(PG_GETARG_TEXT_PP(4));
    char* provider = text_to_cstring(PG_GETARG_TEXT_PP(5));
    char* key_ref = text_to_cstring(PG_GETARG_TEXT_PP(6));
    char* mac = text_to_cstring(PG_GETARG_TEXT_PP(7));
    AnchorRequest request;
    memset(&request, 0, sizeof(request));
    request.verify = true;
    request.database = MyDatabaseId;
    // Anything that does not fit what pgphi makes is simply not authentic.
    if (!known_provider(provider) || strlen(key_ref) >= sizeof(request.key_ref) ||
        strlen(mac) >= sizeof(request.mac) || strlen(prev_mac) >= kAnchorMacSize ||
        !build_anchor_message(request, anchor_seq, anchored_at, audit_seq,
                              reinterpret_cast<const uint8_t*>(VARDATA_ANY(hash)), VARSIZE_ANY_EXHDR(hash),
                              prev_mac))
        PG_RETURN_BOOL(false);
    strlcpy(request.provider, provider, sizeof(request.provider));
    strlcpy(request.key_ref, key_ref, sizeof(request.key_ref));
    strlcpy(request.mac, mac, sizeof(request.mac));
    ask_broker(request);
    if (!request.ok)
        raise_core_failure(request.failure);
    PG_RETURN_BOOL(request.valid);
}

// pgphi._audit_anchor_last_known(): the last anchor of this database known
// to have committed (kept across restarts in the data directory), or NULL.
PGPHI_FUNCTION(pgphi_audit_anchor_last_known)
{
    using namespace pgphi::pg;
    int64_t last = 0;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    AnchorDatabase* entry = anchor_database(MyDatabaseId, false);
    if (entry)
        last = entry->committed_seq;
    LWLockRelease(g_audit->lock);
    if (last == 0)
        PG_RETURN_NULL();
    PG_RETURN_INT64(last);
}

// pgphi._audit_chain_changed(): from the chain trigger, so the scheduled
// anchoring knows which databases' chains moved.
PGPHI_FUNCTION(pgphi_audit_chain_changed)
{
    using namespace pgphi::pg;
    if (g_audit && OidIsValid(MyDatabaseId)) {
        LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
        AnchorDatabase* entry = anchor_database(MyDatabaseId, true);
        if (entry)
            entry->chain_changed = true;
        LWLockRelease(g_audit->lock);
    }
    PG_RETURN_VOID();
}
