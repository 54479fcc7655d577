// Alerts on unusual key use, and the shared budgets behind decrypt limits
// and break-glass counts.
//
// An alert is raised at most once per window for what it is about (a role's
// decrypt limit, a role's failed decrypts, a role's refused attempts, a
// role's decrypt volume). Its three outputs: an audit event (action `alert`,
// queued like refusals, so it is written even when the statement that raised
// it aborts), a WARNING in the server log (raised in the session, so it is
// there also on a standby and in a read-only transaction), and
// `NOTIFY pgphi_alert`, which the audit writer sends in the transaction that
// writes the event (so never per value, and never from a read-only or
// standby session, where NOTIFY is impossible).
//
// Budgets: sessions take values from a shared budget in batches and count
// locally in between (policy/decrypt_limits.cpp), as seal counting does; the
// lock is taken once per batch, not per value.
#pragma once

#include "shared/postgres.hpp"

extern "C" {
#include "utils/timestamp.h"
}

#include "core/data_key.hpp"

namespace pgphi::pg {

// What a budget counts: a decrypt limit's window (identified by key, the
// limited role and the window's start), or a break-glass event (key, role
// and the event's start).
enum class BudgetKind : uint8_t { Limit = 0, BreakGlass = 1 };

struct BudgetIdentity {
    BudgetKind kind;
    uint32_t key_id;
    Oid role;
    TimestampTz start; // the window's start, or the event's
};

struct BudgetTake {
    uint64_t granted;        // values the caller may use now (0: the limit is reached)
    bool alert;              // the caller is the first to pass the limit in this window
    bool table_full;         // no entry for the budget could be made
    uint64_t used;           // the budget's use after this take
    int slot;                // for give_back_budget
    TimestampTz start;       // the window the values were taken in (a later one than asked for
                             // when another session's clock was ahead)
};

// Takes up to `want` values. With `max` 0 the budget has no limit (it only
// counts). With `overdraw` the values are granted also past the limit (an
// alerting, not refusing, limit). `window_us`: a limit's window, whose
// entry is kept until the window ends. Takes the lock once.
BudgetTake take_budget(const BudgetIdentity& id, int64_t window_us, uint64_t max, uint64_t want, bool overdraw);

// Returns values taken but not used, and adds those used to the budget's
// count of values decrypted (what the audit writer writes for break-glass
// events). Never raises: runs at transaction end, also while aborting.
void give_back_budget(int slot, const BudgetIdentity& id, uint64_t unused, uint64_t consumed);

// The audit writer's side: break-glass counts of `database` not yet written.
struct BreakGlassCount {
    int slot;
    Oid database;
    uint32_t key_id;
    Oid role;
    TimestampTz started_at;
    uint64_t values;
};
// (InvalidOid: of every database.)
int collect_break_glass_counts(Oid database, BreakGlassCount* out, int max);
void mark_break_glass_counts_written(const BreakGlassCount* counts, int count);

// Anomalies counted per role and pgphi.alert_window: failed decrypts
// (authentication failures) and refused key uses. Returns true for the one
// occurrence that passes the threshold in the window.
enum class AnomalyKind : uint8_t { FailedDecrypts = 0, RefusedAttempts = 1 };
bool count_anomaly(AnomalyKind kind, Oid database, Oid role);

// Raises an alert: queues the audit event (action "alert", detail
// "<kind>: <text>") and logs a WARNING. Call only where a WARNING may be
// raised; never raises an error itself unless the WARNING cannot be sent.
void raise_alert(const char* kind, uint32_t key_id, uint32_t key_version, const char* key_name, const char* text);

// Settings (defined by define_alert_settings).
enum class LimitAction { Refuse = 0, Alert = 1 };
extern int g_decrypt_limit_action;
extern int g_alert_window_s;
extern int g_alert_failed_decrypts;
extern int g_alert_refused_attempts;
extern double g_alert_volume_factor;
extern int g_alert_volume_min;
extern int g_alert_volume_baseline_windows;

// Shared memory and settings, from shared_state's hooks and _PG_init.
Size alerts_shared_size();
void request_alerts_lwlock();
void init_alerts_shared_memory(void* memory, bool found);
void define_alert_settings();

} // namespace pgphi::pg
