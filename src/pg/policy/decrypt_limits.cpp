#include "shared/postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "catalog/namespace.h"
#include "storage/ipc.h"
#include "utils/acl.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
}

#include <algorithm>
#include <cstring>

#include "policy/decrypt_limits.hpp"
#include "shared/alerts.hpp"
#include "shared/audit.hpp"
#include "shared/key_access.hpp"

namespace pgphi::pg {

namespace {

// One budget that applies to a role's decrypts under a key.
struct BudgetSpec {
    BudgetKind kind;
    Oid role;             // the limited role, or the break-glass role
    uint64_t max;         // values per window; 0 for a break-glass event (counted, not limited)
    int64_t per_us;       // the window
    TimestampTz started_at; // a break-glass event's start
    char per_text[32];
};

constexpr int kMaxSpecs = 8;

// What applies to (current role, session role, key): cached per session
// like the grant answers, cleared by any change to the limits, the
// break-glass events or role memberships.
struct LimitAnswer {
    bool valid;
    Oid role;
    Oid session_role;
    uint32_t key_id;
    uint64_t generation;
    TimestampTz only_for_statement;
    int count;
    BudgetSpec specs[kMaxSpecs];
    int local[kMaxSpecs]; // the LocalBudget of each spec, checked before use
};

constexpr int kAnswerCacheSize = 32;
LimitAnswer g_answers[kAnswerCacheSize];

// Values this session took from a shared budget and has not used yet, and
// those it used since its transaction began.
struct LocalBudget {
    bool in_use;
    BudgetIdentity id;
    int slot;
    uint64_t remaining;
    uint64_t consumed;
};

constexpr int kLocalBudgets = 32;
LocalBudget g_local[kLocalBudgets];
bool g_exit_callback_registered = false;

uint64_t g_limit_generation = 1;
Oid g_limits_relid = InvalidOid;
Oid g_events_relid = InvalidOid;
SPIPlanPtr g_plan_limits = nullptr;

constexpr const char* kSelectLimits =
    "SELECT 0, l.role::pg_catalog.oid, l.max_values, "
    "(pg_catalog.date_part('epoch', l.per) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, "
    "NULL::pg_catalog.timestamptz, l.per::pg_catalog.text "
    "FROM pgphi.decrypt_limits l "
    "WHERE l.key_id OPERATOR(pg_catalog.=) $1 "
    "AND (pg_catalog.pg_has_role($2, l.role::pg_catalog.oid, 'USAGE') "
    "OR CASE WHEN $4 THEN pg_catalog.pg_has_role($3, l.role::pg_catalog.oid, 'USAGE') ELSE false END) "
    "UNION ALL "
    "SELECT 1, e.role::pg_catalog.oid, 0, 0, e.started_at, NULL "
    "FROM pgphi.break_glass_events e "
    "WHERE e.key_id OPERATOR(pg_catalog.=) $1 AND e.role::pg_catalog.oid OPERATOR(pg_catalog.=) $2 "
    "AND e.ends_at OPERATOR(pg_catalog.>) pg_catalog.now()";

void on_relcache_invalidation(Datum, Oid relid)
{
    if (relid == InvalidOid || relid == g_limits_relid || relid == g_events_relid)
        ++g_limit_generation;
}

void on_role_change(Datum, int, uint32) { ++g_limit_generation; }

struct SpecScan {
    LimitAnswer* answer;
    bool overflow;
};

void collect_spec(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* scan = static_cast<SpecScan*>(arg);
    if (scan->answer->count == kMaxSpecs) {
        scan->overflow = true;
        return;
    }
    BudgetSpec& spec = scan->answer->specs[scan->answer->count];
    memset(&spec, 0, sizeof(spec));
    bool isnull;
    spec.kind = DatumGetInt32(SPI_getbinval(row, desc, 1, &isnull)) == 0 ? BudgetKind::Limit : BudgetKind::BreakGlass;
    spec.role = DatumGetObjectId(SPI_getbinval(row, desc, 2, &isnull));
    spec.max = static_cast<uint64_t>(DatumGetInt64(SPI_getbinval(row, desc, 3, &isnull)));
    spec.per_us = DatumGetInt64(SPI_getbinval(row, desc, 4, &isnull));
    Datum started = SPI_getbinval(row, desc, 5, &isnull);
    spec.started_at = isnull ? 0 : DatumGetTimestampTz(started);
    char* per = SPI_getvalue(row, desc, 6);
    strlcpy(spec.per_text, per ? per : "", sizeof(spec.per_text));
    if (spec.kind == BudgetKind::Limit && spec.per_us <= 0)
        spec.per_us = USECS_PER_SEC * 3600; // (the table's check makes this impossible)
    scan->answer->local[scan->answer->count] = -1;
    scan->answer->count++;
}

// The catalog's answer, into the cache slot (the miss path, out of line so
// that the hit path stays a few compares).
__attribute__((noinline)) LimitAnswer& read_answer(LimitAnswer& answer, Oid role, Oid session_role,
                                                   uint32_t key_id)
{
    uint64_t generation = g_limit_generation;
    answer.valid = false;
    answer.count = 0;
    Oid nsp = get_namespace_oid("pgphi", true);
    g_limits_relid = OidIsValid(nsp) ? get_relname_relid("decrypt_limits", nsp) : InvalidOid;
    g_events_relid = OidIsValid(nsp) ? get_relname_relid("break_glass_events", nsp) : InvalidOid;
    bool latest = true;
    // Superusers have no limits; a catalog before 0.3.0 has none either.
    if (!superuser_arg(role) && OidIsValid(g_limits_relid) && OidIsValid(g_events_relid)) {
        Oid argtypes[4] = {INT4OID, OIDOID, OIDOID, BOOLOID};
        Datum args[4] = {Int32GetDatum(static_cast<int32>(key_id)), ObjectIdGetDatum(role),
                         ObjectIdGetDatum(session_role), BoolGetDatum(!superuser_arg(session_role))};
        SpecScan scan{&answer, false};
        query_catalog(&g_plan_limits, kSelectLimits, 4, argtypes, args, 0, collect_spec, &scan, &latest);
        if (scan.overflow)
            ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
                            errmsg("more than %d pgphi decrypt limits apply to this role and key", kMaxSpecs),
                            errhint("pgphi.decrypt_limits lists them; a key custodian can remove some.")));
    }
    answer.role = role;
    answer.session_role = session_role;
    answer.key_id = key_id;
    answer.generation = generation;
    answer.only_for_statement = latest ? 0 : GetCurrentStatementStartTimestamp();
    answer.valid = true;
    return answer;
}

bool same_identity(const BudgetIdentity& a, const BudgetIdentity& b)
{
    return a.kind == b.kind && a.key_id == b.key_id && a.role == b.role &&
           (a.kind == BudgetKind::Limit || a.start == b.start);
}

void give_back(LocalBudget& budget)
{
    if (budget.remaining || budget.consumed)
        give_back_budget(budget.slot, budget.id, budget.remaining, budget.consumed);
    budget.remaining = budget.consumed = 0;
}

void give_back_all()
{
    for (LocalBudget& budget : g_local)
        if (budget.in_use)
            give_back(budget);
}

void at_xact_end(XactEvent event, void*)
{
    if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_COMMIT ||
        event == XACT_EVENT_PARALLEL_ABORT)
        give_back_all();
}

void at_exit(int, Datum) { give_back_all(); }

// The session's budget for a spec: the one the answer found last time, else
// a search, else a free one (or the first, given back, when all are taken).
LocalBudget& local_for(LimitAnswer& answer, int i, uint32_t key_id)
{
    const BudgetSpec& spec = answer.specs[i];
    BudgetIdentity wanted{spec.kind, key_id, spec.role, spec.started_at};
    int index = answer.local[i];
    if (index >= 0 && g_local[index].in_use && same_identity(g_local[index].id, wanted))
        return g_local[index];
    int free_index = -1;
    for (int j = 0; j < kLocalBudgets; ++j) {
        if (g_local[j].in_use && same_identity(g_local[j].id, wanted)) {
            answer.local[i] = j;
            return g_local[j];
        }
        if (!g_local[j].in_use && free_index < 0)
            free_index = j;
    }
    if (free_index < 0) {
        free_index = 0;
        give_back(g_local[0]);
    }
    if (!g_exit_callback_registered) {
        before_shmem_exit(at_exit, 0);
        g_exit_callback_registered = true;
    }
    LocalBudget& budget = g_local[free_index];
    budget = LocalBudget{true, wanted, -1, 0, 0};
    budget.id.start = spec.kind == BudgetKind::Limit ? 0 : spec.started_at;
    answer.local[i] = free_index;
    return budget;
}

// A batch: a sixteenth of the limit (so that sessions holding batches refuse
// at most a little early), at most 256 values.
uint64_t batch_for(const BudgetSpec& spec)
{
    if (spec.max == 0)
        return 256;
    return std::clamp<uint64_t>(spec.max / 16, 1, 256);
}

void refill(LocalBudget& budget, const BudgetSpec& spec, const DataKey& key)
{
    TimestampTz start = spec.started_at;
    if (spec.kind == BudgetKind::Limit) {
        TimestampTz now = GetCurrentTimestamp();
        start = now - (now % spec.per_us + spec.per_us) % spec.per_us;
        if (budget.id.start != start && budget.id.start != 0) {
            // A new window: what was used counts in the old one.
            give_back(budget);
        }
        if (budget.id.start < start)
            budget.id.start = start;
    }
    bool alert_only = g_decrypt_limit_action == static_cast<int>(LimitAction::Alert);
    BudgetTake take = take_budget(budget.id, spec.per_us, spec.max, batch_for(spec), alert_only);
    if (take.table_full)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
                        errmsg("pgphi cannot count this decrypt against its limit: the shared table of decrypt "
                               "budgets is full"),
                        errhint("Fewer decrypt limits and break-glass events in force at once, or a restart, "
                                "make room.")));
    budget.slot = take.slot;
    if (take.start != budget.id.start) {
        give_back(budget);
        budget.id.start = take.start;
    }
    char* limited = GetUserNameFromId(spec.role, true);
    if (take.alert) {
        char text[256];
        snprintf(text, sizeof(text), "role %s passed its decrypt limit of %llu values per %s%s",
                 limited ? limited : "?", static_cast<unsigned long long>(spec.max), spec.per_text,
                 alert_only ? " (alert only)" : " (refused)");
        raise_alert("decrypt_limit", key.ref().key_id, key.ref().version, key.name().c_str(), text);
    }
    if (take.granted == 0) {
        queue_audit_event("decrypt", AuditOutcome::Refused, key, "decrypt limit reached");
        char* role = GetUserNameFromId(GetUserId(), true);
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
                        errmsg("pgphi decrypt limit reached for key \"%s\"", key.name().c_str()),
                        errdetail("Role \"%s\" may decrypt at most %llu values per %s with this key (a limit on "
                                  "role \"%s\"); the window ends at %s.",
                                  role ? role : "?", static_cast<unsigned long long>(spec.max), spec.per_text,
                                  limited ? limited : "?", timestamptz_to_str(budget.id.start + spec.per_us)),
                        errhint("A key custodian can change the limit with pgphi.set_decrypt_limit().")));
    }
    budget.remaining = take.granted;
}

__attribute__((noinline)) void charge_budgets(LimitAnswer& answer, const DataKey& key)
{
    uint32_t key_id = key.ref().key_id;
    for (int i = 0; i < answer.count; ++i) {
        LocalBudget& budget = local_for(answer, i, key_id);
        if (budget.remaining == 0)
            refill(budget, answer.specs[i], key);
        budget.remaining--;
        budget.consumed++;
    }
}

} // namespace

// Per value: a cache probe; for a role with limits or a break-glass event, a
// local decrement per budget and a shared-memory lock per batch.
void charge_decrypt(const DataKey& key)
{
    uint32_t key_id = key.ref().key_id;
    Oid role = GetUserId();
    Oid session_role = GetSessionUserId();
    LimitAnswer& answer = g_answers[(key_id * 31u + role * 7u) % kAnswerCacheSize];
    if (!(answer.valid && answer.generation == g_limit_generation && answer.role == role &&
          answer.session_role == session_role && answer.key_id == key_id &&
          (answer.only_for_statement == 0 || answer.only_for_statement == GetCurrentStatementStartTimestamp())))
        read_answer(answer, role, session_role, key_id);
    if (answer.count != 0)
        charge_budgets(answer, key);
}

void register_decrypt_limits()
{
    CacheRegisterRelcacheCallback(on_relcache_invalidation, 0);
    CacheRegisterSyscacheCallback(AUTHOID, on_role_change, 0);
    CacheRegisterSyscacheCallback(AUTHMEMMEMROLE, on_role_change, 0);
    CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, on_role_change, 0);
    RegisterXactCallback(at_xact_end, nullptr);
}

} // namespace pgphi::pg
