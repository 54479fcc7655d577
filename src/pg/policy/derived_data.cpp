// Refuses to decrypt where PostgreSQL would store what is derived from the
// plaintext; see derived_data.hpp for what and why.
#include "shared/postgres.hpp"

extern "C" {
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_attrdef.h"
#include "catalog/pg_cast.h"
#include "catalog/pg_class.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_statistic_ext.h"
#include "executor/spi.h"
#include "catalog/pg_language.h"
#include "catalog/pg_proc.h"
#include "postmaster/autovacuum.h"
#include "tcop/cmdtag.h"
#include "tcop/pquery.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/portal.h"
#include "utils/regproc.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
}

#include <cstring>

#include "policy/derived_data.hpp"
#include "shared/audit.hpp"
#include "shared/compat.hpp"

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

// Whether each hooked call now running was guarded, innermost last; the
// answer is looked up at FHET_START only, since FHET_ABORT runs while an
// error is being raised and must not touch the catalogs. Deeper nesting than
// the array holds is still counted (and treated as guarded: fail closed).
constexpr int kMaxCalls = 256;
bool g_call_guarded[kMaxCalls];
int g_call_depth = 0;

void on_function_call(FmgrHookEventType event, FmgrInfo* flinfo, Datum* private_data)
{
    if (event == FHET_START) {
        // Look up first: if it raises, no hook has pushed anything for this
        // call, and no END or ABORT will follow.
        bool guarded = is_guarded(flinfo->fn_oid);
        if (g_prev_fmgr_hook)
            g_prev_fmgr_hook(event, flinfo, private_data);
        if (g_call_depth < kMaxCalls)
            g_call_guarded[g_call_depth] = guarded;
        g_call_depth++;
        if (guarded && g_immutable_depth++ == 0)
            g_outermost_immutable = flinfo->fn_oid;
        return;
    }
    // END or ABORT: pop first, so that a raising earlier hook cannot leave
    // this call's entry behind.
    if (g_call_depth > 0) {
        g_call_depth--;
        bool guarded = g_call_depth >= kMaxCalls || g_call_guarded[g_call_depth];
        if (guarded && g_immutable_depth > 0)
            --g_immutable_depth;
    }
    if (g_prev_fmgr_hook)
        g_prev_fmgr_hook(event, flinfo, private_data);
}

// An index, extended statistics or stored generated column keeps using a
// function after it is replaced. Only an IMMUTABLE function is watched at
// run time, so one they depend on (directly, or through an operator or a
// cast) must stay IMMUTABLE: else a body that decrypts would fill them.
object_access_hook_type g_prev_object_access_hook = nullptr;

// The function's row as this command left it (the catalog update is not yet
// visible to other scans: no CommandCounterIncrement has happened).
bool leaves_immutable(Oid fn_oid)
{
    Relation rel = table_open(ProcedureRelationId, AccessShareLock);
    ScanKeyData key;
    ScanKeyInit(&key, Anum_pg_proc_oid, BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(fn_oid));
    SysScanDesc scan = systable_beginscan(rel, ProcedureOidIndexId, true, SnapshotSelf, 1, &key);
    HeapTuple tuple = systable_getnext(scan);
    bool leaves = false;
    if (HeapTupleIsValid(tuple)) {
        Form_pg_proc proc = (Form_pg_proc)GETSTRUCT(tuple);
        leaves = proc->provolatile != PROVOLATILE_IMMUTABLE && proc->prolang != ClanguageId &&
                 proc->prolang != INTERNALlanguageId;
    }
    systable_endscan(scan);
    table_close(rel, AccessShareLock);
    return leaves;
}

// What stores the function's results, if anything: its description.
char* stored_dependent(Oid fn_oid)
{
    char query[2048];
    snprintf(query, sizeof(query),
             "WITH RECURSIVE dependents(classid, objid) AS ("
             " SELECT d.classid, d.objid FROM pg_catalog.pg_depend d"
             "  WHERE d.refclassid OPERATOR(pg_catalog.=) %u::pg_catalog.oid AND d.refobjid OPERATOR(pg_catalog.=) $1"
             " UNION"
             " SELECT d.classid, d.objid FROM pg_catalog.pg_depend d JOIN dependents x"
             "   ON d.refclassid OPERATOR(pg_catalog.=) x.classid AND d.refobjid OPERATOR(pg_catalog.=) x.objid"
             "  WHERE x.classid OPERATOR(pg_catalog.=) %u::pg_catalog.oid OR x.classid OPERATOR(pg_catalog.=) %u::pg_catalog.oid)"
             " SELECT pg_catalog.pg_describe_object(x.classid, x.objid, 0) FROM dependents x"
             "  WHERE x.classid OPERATOR(pg_catalog.=) %u::pg_catalog.oid"
             "     OR (x.classid OPERATOR(pg_catalog.=) %u::pg_catalog.oid AND EXISTS (SELECT FROM pg_catalog.pg_class c"
             "         WHERE c.oid OPERATOR(pg_catalog.=) x.objid"
             "           AND c.relkind OPERATOR(pg_catalog.=) ANY ('{i,I}'::pg_catalog.\"char\"[])))"
             "     OR (x.classid OPERATOR(pg_catalog.=) %u::pg_catalog.oid AND EXISTS (SELECT FROM pg_catalog.pg_attrdef ad"
             "         JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) ad.adrelid"
             "          AND a.attnum OPERATOR(pg_catalog.=) ad.adnum"
             "         WHERE ad.oid OPERATOR(pg_catalog.=) x.objid"
             "           AND a.attgenerated OPERATOR(pg_catalog.<>) ''::pg_catalog.\"char\"))"
             "  LIMIT 1",
             ProcedureRelationId, OperatorRelationId, CastRelationId, StatisticExtRelationId, RelationRelationId,
             AttrDefaultRelationId);
    MemoryContext caller_context = CurrentMemoryContext;
    char* found = nullptr;
    if (SPI_connect() != SPI_OK_CONNECT)
        elog(ERROR, "pgphi: SPI_connect failed");
    Oid argtypes[1] = {OIDOID};
    Datum args[1] = {ObjectIdGetDatum(fn_oid)};
    int rc = SPI_execute_with_args(query, 1, argtypes, args, nullptr, true, 1);
    if (rc != SPI_OK_SELECT)
        elog(ERROR, "pgphi: dependency lookup failed: %s", SPI_result_code_string(rc));
    if (SPI_processed > 0) {
        char* description = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
        if (description) {
            MemoryContext spi_context = MemoryContextSwitchTo(caller_context);
            found = pstrdup(description);
            MemoryContextSwitchTo(spi_context);
        }
    }
    SPI_finish();
    return found;
}

void on_object_access(ObjectAccessType access, Oid class_id, Oid object_id, int sub_id, void* arg)
{
    if (g_prev_object_access_hook)
        g_prev_object_access_hook(access, class_id, object_id, sub_id, arg);
    if ((access != OAT_POST_CREATE && access != OAT_POST_ALTER) || class_id != ProcedureRelationId ||
        object_id < FirstNormalObjectId || !leaves_immutable(object_id))
        return;
    if (char* dependent = stored_dependent(object_id))
        ereport(ERROR, (errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
                        errmsg("function %s must stay IMMUTABLE", format_procedure_qualified(object_id)),
                        errdetail("PostgreSQL stores what it computes for %s; pgphi refuses to decrypt there only "
                                  "while the function is IMMUTABLE.",
                                  dependent),
                        errhint("Change or drop %s first, or keep the function IMMUTABLE.", dependent)));
}

void reset_at_abort(XactEvent event, void*)
{
    if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT) {
        g_immutable_depth = 0;
        g_outermost_immutable = InvalidOid;
        g_call_depth = 0;
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
        } else if (compat::is_autovacuum_worker()) {
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
        bool autovacuum = compat::is_autovacuum_worker();
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
    g_prev_object_access_hook = object_access_hook;
    object_access_hook = on_object_access;
}

} // namespace pgphi::pg
