#include "shared/postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
}

#include <atomic>
#include <cstring>

#include "shared/alerts.hpp"
#include "shared/audit.hpp"
#include "shared/audit_internal.hpp"
#include "shared/error_bridge.hpp"
#include "shared/settings.hpp"
#include "shared/shared_state.hpp"

namespace pgphi::pg {

using namespace audit_detail;

namespace audit_detail {

AuditShared* g_audit = nullptr;
int g_key_use_window_s = 3600;
int g_anchor_interval_s = 300;
int g_anchor_provider = 0;
char* g_anchor_key = nullptr;
const struct config_enum_entry kAnchorProviders[] = {
    {"local", 0, false}, {"vault", 1, false}, {"aws_kms", 2, false}, {nullptr, 0, false}};

} // namespace audit_detail

namespace {

constexpr int kPendingUses = 16;
constexpr const char* kOverflowDetail = "the audit queue was full: key and detail not recorded";

// The anchor this transaction stored, to be known as committed at commit.
int64_t g_pending_anchor_seq = 0;
int64_t g_pending_anchor_audit_seq = 0;
int g_pending_anchor_level = 0;


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

constexpr int64_t kAbandonedAnchorMs = 60'000;

[[noreturn]] void raise_anchor_timeout(bool certificate)
{
    ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE),
                    errmsg("pgphi key broker did not answer within %d ms", key_wait_timeout_ms),
                    errdetail(certificate ? "It was asked for a destruction certificate's MAC."
                                          : "It was asked for an audit anchor's MAC."),
                    errhint("Check that the key broker runs (pgphi.broker_status()).")));
}

int64_t spi_int8(int row, int column, bool* isnull)
{
    Datum d = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, column, isnull);
    return *isnull ? 0 : DatumGetInt64(d);
}

} // namespace

namespace audit_detail {

TimestampTz current_window(TimestampTz now)
{
    int64_t window_us = static_cast<int64_t>(g_key_use_window_s) * USECS_PER_SEC;
    return now - (now % window_us + window_us) % window_us;
}

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

bool build_certificate_message(AnchorRequest& request, const char* body_sha256_hex)
{
    size_t hex_size = strlen(body_sha256_hex);
    if (hex_size != 64 || strspn(body_sha256_hex, "0123456789abcdef") != hex_size)
        return false;
    int n = snprintf(request.message, sizeof(request.message), "pgphi destruction certificate v1\n%s",
                     body_sha256_hex);
    if (n < 0 || static_cast<size_t>(n) >= sizeof(request.message))
        return false;
    request.message_size = static_cast<uint16_t>(n);
    request.certificate = true;
    return true;
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
            raise_anchor_timeout(request.certificate);
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
            raise_anchor_timeout(request.certificate);
        }
        LWLockRelease(g_audit->lock);
        ConditionVariableTimedSleep(&g_audit->anchor_done, deadline - now, PG_WAIT_EXTENSION);
    }
    ConditionVariableCancelSleep();
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

} // namespace audit_detail

namespace {

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

namespace {

// Refused key uses and failed decrypts also count towards the anomaly
// alerts (shared/alerts.hpp): the one that passes its threshold in the
// window raises the alert. Refusals by a decrypt limit have their own.
void note_anomaly(const char* action, AuditOutcome outcome, uint32_t key_id, uint32_t key_version,
                  const char* key_name, const char* detail)
{
    bool key_use = strcmp(action, "decrypt") == 0 || strcmp(action, "encrypt") == 0;
    if (!key_use || !detail)
        return;
    Oid role = GetUserId();
    if (outcome == AuditOutcome::Refused && strcmp(detail, "decrypt limit reached") != 0) {
        if (count_anomaly(AnomalyKind::RefusedAttempts, MyDatabaseId, role)) {
            char* name = GetUserNameFromId(role, true);
            char text[256];
            snprintf(text, sizeof(text), "role %s was refused %d key uses within %d s (the last: %s)",
                     name ? name : "?", g_alert_refused_attempts, g_alert_window_s, detail);
            raise_alert("refused_attempts", key_id, key_version, key_name, text);
        }
    } else if (outcome == AuditOutcome::Failed && strcmp(detail, "ciphertext failed authentication") == 0) {
        if (count_anomaly(AnomalyKind::FailedDecrypts, MyDatabaseId, role)) {
            char* name = GetUserNameFromId(role, true);
            char text[256];
            snprintf(text, sizeof(text), "%d values read by role %s within %d s failed authentication",
                     g_alert_failed_decrypts, name ? name : "?", g_alert_window_s);
            raise_alert("failed_decrypts", key_id, key_version, key_name, text);
        }
    }
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
    note_anomaly(action, outcome, key_id, key_version, key_name, detail);
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
