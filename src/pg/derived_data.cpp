// Refuses to decrypt where PostgreSQL would store what is derived from the
// plaintext; see derived_data.hpp for what and why.
#include "postgres.hpp"

extern "C" {
#include "access/htup_details.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_language.h"
#include "catalog/pg_proc.h"
#include "postmaster/autovacuum.h"
#include "tcop/cmdtag.h"
#include "tcop/pquery.h"
#include "utils/guc.h"
#include "utils/portal.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
}

#include <cstring>

#include "audit.hpp"
#include "derived_data.hpp"

namespace pgphi::pg {

namespace {

needs_fmgr_hook_type g_prev_needs_fmgr_hook = nullptr;
fmgr_hook_type g_prev_fmgr_hook = nullptr;

// How many IMMUTABLE functions (not pgphi's, not C or internal) are running
// in this process, and the outermost of them.
int g_immutable_depth = 0;
Oid g_outermost_immutable = InvalidOid;

// Whether calls of the function are counted. C and internal functions are
// left alone: only superusers create those, and pgphi's own hot paths (the
// comparison operators, the type's I/O) are C. Functions in schema pgphi are
// the extension's own.
bool is_guarded(Oid fn_oid)
{
    // PostgreSQL's own SQL-language functions call nothing a user defines.
    if (fn_oid < FirstNormalObjectId)
        return false;
    HeapTuple tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn_oid));
    if (!HeapTupleIsValid(tuple))
        return false;
    Form_pg_proc proc = (Form_pg_proc)GETSTRUCT(tuple);
    bool guarded = proc->provolatile == PROVOLATILE_IMMUTABLE && proc->prolang != ClanguageId &&
                   proc->prolang != INTERNALlanguageId;
    Oid nsp = proc->pronamespace;
    ReleaseSysCache(tuple);
    return guarded && nsp != get_namespace_oid("pgphi", true);
}

// Hooked functions run through fmgr_security_definer, which calls the hook
// around every call (FHET_ABORT when the call raises) and is never inlined.
bool needs_hook(Oid fn_oid)
{
    if (g_prev_needs_fmgr_hook && g_prev_needs_fmgr_hook(fn_oid))
        return true;
    return is_guarded(fn_oid);
}

constexpr Datum kGuarded = 1;
constexpr Datum kNotGuarded = 2;

void on_function_call(FmgrHookEventType event, FmgrInfo* flinfo, Datum* private_data)
{
    if (g_prev_fmgr_hook)
        g_prev_fmgr_hook(event, flinfo, private_data);
    // The per-call slot remembers the answer, unless an earlier hook owns it.
    bool guarded;
    if (g_prev_fmgr_hook) {
        guarded = is_guarded(flinfo->fn_oid);
    } else {
        if (*private_data == 0)
            *private_data = is_guarded(flinfo->fn_oid) ? kGuarded : kNotGuarded;
        guarded = *private_data == kGuarded;
    }
    if (!guarded)
        return;
    if (event == FHET_START) {
        if (g_immutable_depth++ == 0)
            g_outermost_immutable = flinfo->fn_oid;
    } else if (g_immutable_depth > 0) {
        --g_immutable_depth;
    }
}

void reset_at_abort(XactEvent event, void*)
{
    if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT) {
        g_immutable_depth = 0;
        g_outermost_immutable = InvalidOid;
    }
}

// Whether this process serves a client: a client backend (pgphi's
// authentication hook records its transport), a parallel worker of one (it
// inherits the setting), or a single-user server with its operator.
bool serves_client()
{
    static int answer = -1;
    if (answer < 0) {
        if (!IsUnderPostmaster) {
            answer = 1;
        } else if (IsAutoVacuumWorkerProcess()) {
            answer = 0;
        } else {
            const char* transport = GetConfigOption("pgphi.client_transport", true, false);
            answer = transport != nullptr && transport[0] != '\0';
        }
    }
    return answer == 1;
}

// The command that started a security-restricted operation, when the
// running portal says which.
const char* restricted_command()
{
    if (ActivePortal == nullptr)
        return nullptr;
    switch (ActivePortal->commandTag) {
    case CMDTAG_ANALYZE:
    case CMDTAG_VACUUM:
    case CMDTAG_CREATE_INDEX:
    case CMDTAG_REINDEX:
    case CMDTAG_CLUSTER:
    case CMDTAG_CREATE_MATERIALIZED_VIEW:
    case CMDTAG_REFRESH_MATERIALIZED_VIEW:
    case CMDTAG_ALTER_TABLE:
        return GetCommandTagName(ActivePortal->commandTag);
    default:
        return nullptr;
    }
}

constexpr const char* kDetail =
    "Statistics, indexes, generated columns and materialized views store what they compute: plaintext "
    "derived there would be written to disk.";
constexpr const char* kHint =
    "Decrypt in the query that reads the data. To index, analyze or group an encrypted column, use "
    "deterministic encryption or a blind index.";

} // namespace

void check_plaintext_derivation(const DataKey& key)
{
    if (serves_client() && !InSecurityRestrictedOperation() && g_immutable_depth == 0)
        return;

    if (!serves_client()) {
        bool autovacuum = IsAutoVacuumWorkerProcess();
        queue_audit_event("decrypt", AuditOutcome::Refused, key,
                          autovacuum ? "derived data: in autovacuum" : "derived data: in a process without a client");
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                        autovacuum ? errmsg("pgphi does not decrypt in autovacuum")
                                   : errmsg("pgphi does not decrypt in a process without a client connection"),
                        errdetail("%s", kDetail), errhint("%s", kHint)));
    }
    if (InSecurityRestrictedOperation()) {
        const char* command = restricted_command();
        char detail[128];
        snprintf(detail, sizeof(detail), "derived data: inside %s", command ? command : "a security-restricted operation");
        queue_audit_event("decrypt", AuditOutcome::Refused, key, detail);
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                        command ? errmsg("pgphi does not decrypt inside %s", command)
                                : errmsg("pgphi does not decrypt inside a security-restricted operation"),
                        errdetail("%s ANALYZE, VACUUM, CREATE INDEX, REINDEX, CLUSTER and materialized views run as "
                                  "security-restricted operations.",
                                  kDetail),
                        errhint("%s", kHint)));
    }
    char* function = format_procedure_qualified(g_outermost_immutable);
    char detail[160];
    snprintf(detail, sizeof(detail), "derived data: inside IMMUTABLE function %s", function);
    queue_audit_event("decrypt", AuditOutcome::Refused, key, detail);
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("pgphi does not decrypt inside function %s, which is declared IMMUTABLE", function),
                    errdetail("%s Index expressions, extended statistics and generated columns are IMMUTABLE "
                              "functions.",
                              kDetail),
                    errhint("A function that decrypts depends on keys and grants: declare it STABLE. %s", kHint)));
}

void register_derived_data_guard()
{
    g_prev_needs_fmgr_hook = needs_fmgr_hook;
    needs_fmgr_hook = needs_hook;
    g_prev_fmgr_hook = fmgr_hook;
    fmgr_hook = on_function_call;
    RegisterXactCallback(reset_at_abort, nullptr);
}

} // namespace pgphi::pg
