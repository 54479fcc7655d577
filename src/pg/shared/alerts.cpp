#include "shared/postgres.hpp"

extern "C" {
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
}

#include <algorithm>
#include <cstring>
#include <new>

#include "shared/alerts.hpp"
#include "shared/audit.hpp"

namespace pgphi::pg {

int g_decrypt_limit_action = static_cast<int>(LimitAction::Refuse);
int g_alert_window_s = 600;
int g_alert_failed_decrypts = 10;
int g_alert_refused_attempts = 20;
double g_alert_volume_factor = 10.0;
int g_alert_volume_min = 1000;
int g_alert_volume_baseline_windows = 24;

namespace {

constexpr int kBudgetEntries = 1024;
constexpr int kAnomalyEntries = 256;

struct BudgetEntry {
    bool in_use;
    bool alerted;       // the limit's alert was raised in this window
    BudgetKind kind;
    Oid database;
    uint32_t key_id;
    Oid role;
    TimestampTz start;
    TimestampTz end;    // a limit's window ends (0 for a break-glass event)
    uint64_t used;      // taken by sessions (used or still held)
    uint64_t consumed;  // used, as sessions reported at their transaction's end
    uint64_t written;   // of those, written to the catalog (break-glass events)
    TimestampTz touched;
};

struct AnomalyEntry {
    bool in_use;
    bool alerted;
    AnomalyKind kind;
    Oid database;
    Oid role;
    TimestampTz window_start;
    uint64_t count;
};

struct AlertsShared {
    LWLock* lock;
    BudgetEntry budgets[kBudgetEntries];
    AnomalyEntry anomalies[kAnomalyEntries];
};

AlertsShared* g_alerts = nullptr;

const struct config_enum_entry kLimitActions[] = {
    {"refuse", static_cast<int>(LimitAction::Refuse), false},
    {"alert", static_cast<int>(LimitAction::Alert), false},
    {nullptr, 0, false},
};

bool same_budget(const BudgetEntry& entry, const BudgetIdentity& id, Oid database)
{
    return entry.in_use && entry.kind == id.kind && entry.database == database && entry.key_id == id.key_id &&
           entry.role == id.role;
}

// An entry nothing will add to: a limit's window or a break-glass event that
// everyone has given back and whose counts are written. A break-glass entry
// is kept until the writer has its count.
bool reclaimable(const BudgetEntry& entry, TimestampTz now)
{
    if (!entry.in_use)
        return true;
    if (entry.kind == BudgetKind::Limit)
        return entry.used == 0 || now >= entry.end; // its window is over
    if (entry.consumed != entry.written)
        return false;
    return entry.used == 0 || now - entry.touched > USECS_PER_SEC * 86400;
}

} // namespace

BudgetTake take_budget(const BudgetIdentity& id, int64_t window_us, uint64_t max, uint64_t want, bool overdraw)
{
    BudgetTake take{0, false, false, 0, -1, 0};
    if (!g_alerts) {
        take.table_full = true;
        return take;
    }
    TimestampTz now = GetCurrentTimestamp();
    LWLockAcquire(g_alerts->lock, LW_EXCLUSIVE);
    int slot = -1;
    int free_slot = -1;
    for (int i = 0; i < kBudgetEntries; ++i) {
        BudgetEntry& entry = g_alerts->budgets[i];
        // A limit has one entry, its current window; a break-glass event one
        // per event.
        if (same_budget(entry, id, MyDatabaseId) && (id.kind == BudgetKind::Limit || entry.start == id.start)) {
            slot = i;
            break;
        }
        if (free_slot < 0 && reclaimable(entry, now) && !same_budget(entry, id, MyDatabaseId))
            free_slot = i;
    }
    if (slot < 0 && free_slot >= 0) {
        slot = free_slot;
        BudgetEntry& entry = g_alerts->budgets[slot];
        memset(&entry, 0, sizeof(entry));
        entry.in_use = true;
        entry.kind = id.kind;
        entry.database = MyDatabaseId;
        entry.key_id = id.key_id;
        entry.role = id.role;
        entry.start = id.start;
    }
    if (slot < 0) {
        LWLockRelease(g_alerts->lock);
        take.table_full = true;
        return take;
    }
    BudgetEntry& entry = g_alerts->budgets[slot];
    if (entry.start < id.start) {
        // A new window of a limit: the old one's use is over.
        entry.start = id.start;
        entry.used = entry.consumed = entry.written = 0;
        entry.alerted = false;
    }
    entry.end = id.kind == BudgetKind::Limit ? entry.start + window_us : 0;
    uint64_t granted = want;
    if (max > 0) {
        if (entry.used < max)
            granted = std::min(want, max - entry.used);
        else {
            granted = overdraw ? want : 0;
            if (!entry.alerted) {
                entry.alerted = true;
                take.alert = true;
            }
        }
    }
    entry.used += granted;
    entry.touched = now;
    take.granted = granted;
    take.used = entry.used;
    take.slot = slot;
    take.start = entry.start;
    LWLockRelease(g_alerts->lock);
    return take;
}

void give_back_budget(int slot, const BudgetIdentity& id, uint64_t unused, uint64_t consumed)
{
    if (!g_alerts || slot < 0 || slot >= kBudgetEntries || (unused == 0 && consumed == 0))
        return;
    LWLockAcquire(g_alerts->lock, LW_EXCLUSIVE);
    BudgetEntry& entry = g_alerts->budgets[slot];
    // A window that has passed since was reset: what was held in it is gone.
    if (same_budget(entry, id, MyDatabaseId) && entry.start == id.start) {
        entry.used -= std::min(unused, entry.used);
        entry.consumed += consumed;
    }
    LWLockRelease(g_alerts->lock);
}

int collect_break_glass_counts(Oid database, BreakGlassCount* out, int max)
{
    int count = 0;
    if (!g_alerts)
        return 0;
    LWLockAcquire(g_alerts->lock, LW_SHARED);
    for (int i = 0; i < kBudgetEntries && count < max; ++i) {
        const BudgetEntry& entry = g_alerts->budgets[i];
        if (entry.in_use && entry.kind == BudgetKind::BreakGlass &&
            (entry.database == database || !OidIsValid(database)) && entry.consumed > entry.written)
            out[count++] = BreakGlassCount{i, entry.database, entry.key_id, entry.role, entry.start,
                                           entry.consumed - entry.written};
    }
    LWLockRelease(g_alerts->lock);
    return count;
}

void mark_break_glass_counts_written(const BreakGlassCount* counts, int count)
{
    if (!g_alerts)
        return;
    LWLockAcquire(g_alerts->lock, LW_EXCLUSIVE);
    for (int i = 0; i < count; ++i) {
        BudgetEntry& entry = g_alerts->budgets[counts[i].slot];
        if (entry.in_use && entry.kind == BudgetKind::BreakGlass && entry.key_id == counts[i].key_id &&
            entry.role == counts[i].role && entry.start == counts[i].started_at)
            entry.written += counts[i].values;
    }
    LWLockRelease(g_alerts->lock);
}

bool count_anomaly(AnomalyKind kind, Oid database, Oid role)
{
    int threshold = kind == AnomalyKind::FailedDecrypts ? g_alert_failed_decrypts : g_alert_refused_attempts;
    if (!g_alerts || threshold <= 0 || !OidIsValid(database))
        return false;
    TimestampTz now = GetCurrentTimestamp();
    int64_t window_us = static_cast<int64_t>(g_alert_window_s) * USECS_PER_SEC;
    TimestampTz window = now - (now % window_us + window_us) % window_us;
    bool alert = false;
    LWLockAcquire(g_alerts->lock, LW_EXCLUSIVE);
    AnomalyEntry* found = nullptr;
    AnomalyEntry* free_entry = nullptr;
    AnomalyEntry* oldest = nullptr;
    for (AnomalyEntry& entry : g_alerts->anomalies) {
        if (entry.in_use && entry.kind == kind && entry.database == database && entry.role == role) {
            found = &entry;
            break;
        }
        if (!entry.in_use || entry.window_start < window) {
            if (!free_entry)
                free_entry = &entry;
        } else if (!oldest || entry.window_start < oldest->window_start) {
            oldest = &entry;
        }
    }
    // Full of roles counting in this window: the one counted longest ago
    // makes room (an attacker cannot hide behind many roles' entries, as
    // each of those has counted below its threshold).
    if (!found) {
        found = free_entry ? free_entry : oldest;
        if (found) {
            memset(found, 0, sizeof(*found));
            found->in_use = true;
            found->kind = kind;
            found->database = database;
            found->role = role;
            found->window_start = window;
        }
    }
    if (found) {
        if (found->window_start != window) {
            found->window_start = window;
            found->count = 0;
            found->alerted = false;
        }
        if (++found->count >= static_cast<uint64_t>(threshold) && !found->alerted) {
            found->alerted = true;
            alert = true;
        }
    }
    LWLockRelease(g_alerts->lock);
    return alert;
}

void raise_alert(const char* kind, uint32_t key_id, uint32_t key_version, const char* key_name, const char* text)
{
    char detail[128];
    snprintf(detail, sizeof(detail), "%s: %s", kind, text);
    queue_audit_event("alert", AuditOutcome::Ok, key_id, key_version, key_name, detail);
    char* role = GetUserNameFromId(GetUserId(), true);
    ereport(WARNING, (errhidestmt(true), errmsg("pgphi alert (%s): %s", kind, text),
                      errdetail("Key \"%s\", role \"%s\". Raised once per window; recorded in pgphi.audit_log "
                                "(action alert) and signalled with NOTIFY pgphi_alert on the primary.",
                                key_name ? key_name : "", role ? role : "?")));
}

Size alerts_shared_size() { return sizeof(AlertsShared); }

void request_alerts_lwlock() { RequestNamedLWLockTranche("pgphi_alerts", 1); }

void init_alerts_shared_memory(void* memory, bool found)
{
    if (!found) {
        memset(memory, 0, sizeof(AlertsShared));
        auto* alerts = new (memory) AlertsShared;
        alerts->lock = &(GetNamedLWLockTranche("pgphi_alerts"))->lock;
    }
    g_alerts = static_cast<AlertsShared*>(memory);
}

void define_alert_settings()
{
    DefineCustomEnumVariable("pgphi.decrypt_limit_action",
                             "What a decrypt past a pgphi.set_decrypt_limit limit gets: refuse (an error) or alert "
                             "(allowed; the alert is raised either way).",
                             nullptr, &g_decrypt_limit_action, static_cast<int>(LimitAction::Refuse), kLimitActions,
                             PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.alert_window",
                            "Length of the windows in which pgphi counts failed decrypts and refused attempts per "
                            "role for its alerts.",
                            nullptr, &g_alert_window_s, 600, 60, 86400, PGC_SIGHUP, GUC_UNIT_S | GUC_SUPERUSER_ONLY,
                            nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.alert_failed_decrypts",
                            "Failed decrypts (authentication failures) by one role in one pgphi.alert_window that "
                            "raise an alert; 0 turns the alert off.",
                            nullptr, &g_alert_failed_decrypts, 10, 0, INT_MAX, PGC_SIGHUP, GUC_SUPERUSER_ONLY,
                            nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.alert_refused_attempts",
                            "Refused encrypts and decrypts by one role in one pgphi.alert_window that raise an "
                            "alert; 0 turns the alert off.",
                            nullptr, &g_alert_refused_attempts, 20, 0, INT_MAX, PGC_SIGHUP, GUC_SUPERUSER_ONLY,
                            nullptr, nullptr, nullptr);
    DefineCustomRealVariable("pgphi.alert_volume_factor",
                             "How many times its own average of the previous windows a role's decrypts under a key "
                             "in one pgphi.key_use_window must be to raise an alert; 0 turns the alert off.",
                             nullptr, &g_alert_volume_factor, 10.0, 0.0, 1e6, PGC_SIGHUP, GUC_SUPERUSER_ONLY,
                             nullptr, nullptr, nullptr);
    DefineCustomIntVariable("pgphi.alert_volume_min",
                            "Decrypts by a role under a key in one pgphi.key_use_window below which no volume alert "
                            "is raised, whatever its baseline.",
                            nullptr, &g_alert_volume_min, 1000, 1, INT_MAX, PGC_SIGHUP, GUC_SUPERUSER_ONLY, nullptr,
                            nullptr, nullptr);
    DefineCustomIntVariable("pgphi.alert_volume_baseline",
                            "How many previous pgphi.key_use_window windows make a role's decrypt baseline.",
                            nullptr, &g_alert_volume_baseline_windows, 24, 1, 24 * 90, PGC_SIGHUP,
                            GUC_SUPERUSER_ONLY, nullptr, nullptr, nullptr);
}

} // namespace pgphi::pg
