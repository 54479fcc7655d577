// Who is writing pgphi's catalog: the facts the catalog audit triggers (0.3.0
// script, section "catalog audit") cannot learn from SQL without trusting
// something the writer controls.
//
// pgphi._catalog_writer() names the pgphi function that is running the
// current statement, or NULL when no pgphi function is: then the change is
// direct DML (or a function somebody else wrote) and is audited as such. It
// is tracked through PostgreSQL's function manager hooks, which run around
// every SECURITY DEFINER function and every function with a SET clause (all
// of pgphi's catalog writers are one or the other) and, through
// needs_fmgr_hook, around pgphi's procedures, which run as their caller and
// commit between batches. Nothing a SQL caller can set (a setting, a name in
// the call stack) decides it. A function counts as pgphi's only if it is a
// member of the extension and lives in schema pgphi. pgphi's own trigger
// functions are transparent (a trigger acts for the statement that fired
// it); any other hooked function on top of the stack (somebody's SECURITY
// DEFINER function called from inside a pgphi function) hides the pgphi
// function below it.
//
// pgphi._queue_catalog_refusal(action, detail) queues a refused DDL command
// for the audit log through the audit writer, which survives the abort of
// the refused command's transaction.
#include "shared/postgres.hpp"

extern "C" {
#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/deparse_utility.h"
#include "utils/inval.h"
#include "utils/syscache.h"
}

#include "policy/catalog_audit.hpp"
#include "shared/audit.hpp"

namespace {

// What a hooked function is, for the writer stack.
enum class FunctionKind : uint8_t { Foreign, Writer, Transparent, Procedure };

// A small cache of function kinds (the hook runs on every call of every
// hooked function; looking at pg_depend each time would be wasteful).
// Cleared whenever pg_proc changes.
struct KindEntry {
    Oid function;
    FunctionKind kind;
};
constexpr int kind_cache_size = 256;
KindEntry g_kinds[kind_cache_size];
bool g_invalidation_registered = false;

void clear_kinds(Datum, int, uint32)
{
    for (KindEntry& entry : g_kinds)
        entry.function = InvalidOid;
}

// Looks at the catalogs: only in a transaction (function calls always are).
FunctionKind lookup_kind(Oid function)
{
    HeapTuple tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(function));
    if (!HeapTupleIsValid(tuple))
        return FunctionKind::Foreign;
    Form_pg_proc proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tuple));
    Oid ns = proc->pronamespace;
    bool procedure = proc->prokind == PROKIND_PROCEDURE;
    bool trigger = proc->prorettype == TRIGGEROID || proc->prorettype == EVENT_TRIGGEROID;
    ReleaseSysCache(tuple);

    // The schema first (a syscache lookup): most functions are not in it.
    Oid pgphi_ns = get_namespace_oid("pgphi", true);
    if (!OidIsValid(pgphi_ns) || ns != pgphi_ns)
        return FunctionKind::Foreign;
    Oid extension = get_extension_oid("pgphi", true);
    if (!OidIsValid(extension) || getExtensionOfObject(ProcedureRelationId, function) != extension)
        return FunctionKind::Foreign;
    if (trigger)
        return FunctionKind::Transparent;
    return procedure ? FunctionKind::Procedure : FunctionKind::Writer;
}

FunctionKind kind_of(Oid function)
{
    if (!g_invalidation_registered) {
        CacheRegisterSyscacheCallback(PROCOID, clear_kinds, 0);
        g_invalidation_registered = true;
        clear_kinds(0, 0, 0);
    }
    KindEntry& entry = g_kinds[function % kind_cache_size];
    if (entry.function != function) {
        FunctionKind kind = lookup_kind(function);
        entry.function = function;
        entry.kind = kind;
    }
    return entry.kind;
}

// The hooked calls now running in this backend, innermost last. Deeper
// nesting than the array holds is counted, and reported as no writer.
struct Frame {
    Oid function;
    FunctionKind kind;
};
constexpr int max_frames = 64;
Frame g_frames[max_frames];
int g_depth = 0;

needs_fmgr_hook_type g_prev_needs_hook = nullptr;
fmgr_hook_type g_prev_fmgr_hook = nullptr;

bool needs_hook(Oid function)
{
    if (g_prev_needs_hook && g_prev_needs_hook(function))
        return true;
    // Only pgphi's procedures need routing through the hook: the functions
    // that write the catalog are SECURITY DEFINER or have a SET clause, and
    // are hooked anyway.
    if (!IsTransactionState())
        return false;
    return kind_of(function) == FunctionKind::Procedure;
}

void track_call(FmgrHookEventType event, FmgrInfo* flinfo, Datum* arg)
{
    if (event == FHET_START) {
        // The lookup may raise; it comes before the earlier hook runs and the
        // frame is pushed only after both, so a START that raised has nothing
        // to pop (END and ABORT do not follow).
        FunctionKind kind = kind_of(flinfo->fn_oid);
        if (g_prev_fmgr_hook)
            g_prev_fmgr_hook(event, flinfo, arg);
        if (g_depth < max_frames)
            g_frames[g_depth] = Frame{flinfo->fn_oid, kind};
        g_depth++;
    } else {
        // END or ABORT: no catalog access here (ABORT runs while an error
        // is being raised). Pop first, so that a raising previous hook
        // cannot leave the frame behind.
        if (g_depth > 0)
            g_depth--;
        if (g_prev_fmgr_hook)
            g_prev_fmgr_hook(event, flinfo, arg);
    }
}

} // namespace

namespace pgphi::pg {

// A frame left by a hook that raised after this one pushed (another
// extension's) would credit later direct DML to a pgphi function; an aborted
// transaction ends every call, so nothing survives it.
void forget_frames_at_abort(XactEvent event, void*)
{
    if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
        g_depth = 0;
}

void register_catalog_writer_tracking()
{
    RegisterXactCallback(forget_frames_at_abort, nullptr);
    g_prev_needs_hook = needs_fmgr_hook;
    needs_fmgr_hook = needs_hook;
    g_prev_fmgr_hook = fmgr_hook;
    fmgr_hook = track_call;
}

} // namespace pgphi::pg

// pgphi._catalog_writer() RETURNS regprocedure: the pgphi function running
// the current statement, or NULL.
PGPHI_FUNCTION(pgphi_catalog_writer)
{
    if (g_depth > max_frames)
        PG_RETURN_NULL();
    for (int i = g_depth - 1; i >= 0; i--) {
        switch (g_frames[i].kind) {
        case FunctionKind::Transparent:
            continue;
        case FunctionKind::Writer:
        case FunctionKind::Procedure:
            PG_RETURN_OID(g_frames[i].function);
        case FunctionKind::Foreign:
            PG_RETURN_NULL();
        }
    }
    PG_RETURN_NULL();
}

// pgphi._in_extension_script() RETURNS boolean: whether CREATE or ALTER
// EXTENSION is running a script (whose DDL on pgphi's objects is allowed),
// or pg_upgrade is restoring the extension into a new cluster: in binary
// upgrade mode pg_restore recreates each member and adds it with ALTER
// EXTENSION pgphi ADD, the work CREATE EXTENSION's script would have done.
// Only pg_upgrade connects to a server started in that mode (postgres -b).
PGPHI_FUNCTION(pgphi_in_extension_script) { PG_RETURN_BOOL(creating_extension || IsBinaryUpgrade); }

// pgphi._queue_catalog_refusal(action text, detail text) RETURNS void:
// queues a refused command for pgphi.audit_log (outcome "refused"), with
// the session's login role and the current role.
PGPHI_FUNCTION(pgphi_queue_catalog_refusal)
{
    if (PG_ARGISNULL(0))
        PG_RETURN_VOID();
    char* action = text_to_cstring(PG_GETARG_TEXT_PP(0));
    char* detail = PG_ARGISNULL(1) ? pstrdup("") : text_to_cstring(PG_GETARG_TEXT_PP(1));
    pgphi::pg::queue_audit_event(action, pgphi::pg::AuditOutcome::Refused, 0, 0, "", detail);
    PG_RETURN_VOID();
}

// pgphi._changes_pgphi_members(pg_ddl_command) RETURNS boolean: whether an
// ALTER EXTENSION command adds objects to pgphi or takes them out of it
// (ALTER EXTENSION pgphi UPDATE does neither).
PGPHI_FUNCTION(pgphi_changes_pgphi_members)
{
    const CollectedCommand* command = reinterpret_cast<const CollectedCommand*>(PG_GETARG_POINTER(0));
    if (command == nullptr || command->parsetree == nullptr || !IsA(command->parsetree, AlterExtensionContentsStmt))
        PG_RETURN_BOOL(false);
    const AlterExtensionContentsStmt* stmt = reinterpret_cast<const AlterExtensionContentsStmt*>(command->parsetree);
    PG_RETURN_BOOL(stmt->extname != nullptr && strcmp(stmt->extname, "pgphi") == 0);
}
