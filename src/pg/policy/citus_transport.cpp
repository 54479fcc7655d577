// Refuses, on a node of a Citus cluster, the statements that could make
// another node decrypt for a client that pgphi.plaintext_transport does not
// allow (see citus_transport.hpp).
#include "shared/postgres.hpp"

extern "C" {
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/transam.h"
#include "catalog/dependency.h"
#include "catalog/pg_language.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "commands/extension.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/planner.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/syscache.h"
}

#include <cstring>

#include "policy/access_control.hpp"
#include "policy/citus_transport.hpp"
#include "shared/audit.hpp"
#include "shared/compat.hpp"
#include "shared/shared_state.hpp"

namespace pgphi::pg {

namespace {

planner_hook_type g_previous_planner = nullptr;

// pgphi's C entry points that return plaintext (functions/encryption_functions.cpp).
const char* const kDecryptingSymbols[] = {"pgphi_decrypt_text", "pgphi_decrypt_bytea", "pgphi_decrypt_jsonb"};

// Citus's functions that send SQL text to other nodes, where it runs on the
// coordinator's internal (TLS) connection.
const char* const kNodeCommandFunctions[] = {
    "master_run_on_worker",      "run_command_on_workers",   "run_command_on_all_nodes",
    "run_command_on_coordinator", "run_command_on_placements", "run_command_on_colocated_placements",
    "run_command_on_shards",
};

bool listed(const char* name, const char* const* names, size_t count)
{
    for (size_t i = 0; i < count; ++i)
        if (strcmp(name, names[i]) == 0)
            return true;
    return false;
}

// What a statement does that matters here, the first of each kind found.
struct Findings {
    Oid pgphi_extension;
    Oid citus_extension;
    Oid decrypting = InvalidOid;     // a pgphi function that returns plaintext
    Oid node_command = InvalidOid;   // a Citus function that runs SQL on other nodes
    Oid user_function = InvalidOid;  // a function of neither PostgreSQL, pgphi nor Citus
    Oid delegated = InvalidOid;      // a user function whose calls Citus runs on a worker
    Oid citus_table = InvalidOid;    // a Citus table in the range table
};

// Whether a row of Citus catalog `catalog` (in pg_catalog) has `column` = key
// (and, when `classid` is valid, classid = it), and, if `nonnull_or_true` is
// given, that column NOT NULL or true: delegation's distribution_argument_index
// or force_delegation.
bool citus_catalog_has(const char* catalog, const char* column, Oid key, Oid classid,
                       const char* const* any_of, size_t any_count)
{
    Oid relid = get_relname_relid(catalog, PG_CATALOG_NAMESPACE);
    if (!OidIsValid(relid))
        return false;
    Relation relation = table_open(relid, AccessShareLock);
    ScanKeyData keys[2];
    int nkeys = 0;
    ScanKeyInit(&keys[nkeys++], get_attnum(relid, column), BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(key));
    if (OidIsValid(classid))
        ScanKeyInit(&keys[nkeys++], get_attnum(relid, "classid"), BTEqualStrategyNumber, F_OIDEQ,
                    ObjectIdGetDatum(classid));
    SysScanDesc scan = systable_beginscan(relation, InvalidOid, false, nullptr, nkeys, keys);
    bool found = false;
    HeapTuple tuple;
    while (!found && HeapTupleIsValid(tuple = systable_getnext(scan))) {
        if (any_count == 0) {
            found = true;
            break;
        }
        for (size_t i = 0; i < any_count && !found; ++i) {
            AttrNumber attnum = get_attnum(relid, any_of[i]);
            if (attnum == InvalidAttrNumber)
                continue;
            bool isnull;
            Datum value = heap_getattr(tuple, attnum, RelationGetDescr(relation), &isnull);
            Oid type = get_atttype(relid, attnum);
            found = !isnull && (type != BOOLOID || DatumGetBool(value));
        }
    }
    systable_endscan(scan);
    table_close(relation, AccessShareLock);
    return found;
}

void classify_function(Oid function, Findings& findings)
{
    if (function < FirstNormalObjectId)
        return; // PostgreSQL's own
    Oid extension = getExtensionOfObject(ProcedureRelationId, function);
    HeapTuple tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(function));
    if (!HeapTupleIsValid(tuple))
        return;
    auto* proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tuple));
    if (OidIsValid(extension) && extension == findings.pgphi_extension) {
        if (proc->prolang == ClanguageId && !OidIsValid(findings.decrypting)) {
            bool isnull;
            Datum source = SysCacheGetAttr(PROCOID, tuple, Anum_pg_proc_prosrc, &isnull);
            char* symbol = isnull ? nullptr : TextDatumGetCString(source);
            if (symbol && listed(symbol, kDecryptingSymbols, lengthof(kDecryptingSymbols)))
                findings.decrypting = function;
            if (symbol)
                pfree(symbol);
        }
    } else if (OidIsValid(extension) && extension == findings.citus_extension) {
        if (proc->pronamespace == PG_CATALOG_NAMESPACE && !OidIsValid(findings.node_command) &&
            listed(NameStr(proc->proname), kNodeCommandFunctions, lengthof(kNodeCommandFunctions)))
            findings.node_command = function;
    } else {
        if (!OidIsValid(findings.user_function))
            findings.user_function = function;
        static const char* const kDelegation[] = {"distribution_argument_index", "force_delegation"};
        if (!OidIsValid(findings.delegated) &&
            citus_catalog_has("pg_dist_object", "objid", function, ProcedureRelationId, kDelegation,
                              lengthof(kDelegation)))
            findings.delegated = function;
    }
    ReleaseSysCache(tuple);
}

bool note_function(Oid function, void* context)
{
    classify_function(function, *static_cast<Findings*>(context));
    return false; // keep walking
}

bool walk(Node* node, void* context)
{
    if (node == nullptr)
        return false;
    auto* findings = static_cast<Findings*>(context);
    if (IsA(node, Query))
        return query_tree_walker(reinterpret_cast<Query*>(node), compat::walker(walk), context,
                                 QTW_EXAMINE_RTES_BEFORE);
    if (IsA(node, RangeTblEntry)) {
        auto* entry = reinterpret_cast<RangeTblEntry*>(node);
        if (entry->rtekind == RTE_RELATION && !OidIsValid(findings->citus_table) &&
            citus_catalog_has("pg_dist_partition", "logicalrelid", entry->relid, InvalidOid, nullptr, 0))
            findings->citus_table = entry->relid;
        return false; // its subquery, functions and values are walked by query_tree_walker
    }
    check_functions_in_node(node, note_function, context);
    return expression_tree_walker(node, compat::walker(walk), context);
}

void refuse(const char* setting, Oid function, const char* why)
{
    char* name = format_procedure(function);
    queue_audit_event("decrypt", AuditOutcome::Refused, 0, 0, "", "client connection without TLS (Citus)");
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
                    errmsg("pgphi does not return plaintext over a connection without TLS"),
                    errdetail("pgphi.plaintext_transport is \"%s\", and the statement calls %s, %s.", setting,
                              name, why),
                    errhint("Connect with sslmode=require or stronger.")));
}

void check_statement(Query* query)
{
    const char* setting = plaintext_transport_refusing();
    if (setting == nullptr || !in_citus_cluster())
        return;
    Findings findings;
    findings.pgphi_extension = get_extension_oid("pgphi", true);
    findings.citus_extension = get_extension_oid("citus", true);
    walk(reinterpret_cast<Node*>(query), &findings);
    if (OidIsValid(findings.decrypting))
        refuse(setting, findings.decrypting, "which decrypts");
    if (OidIsValid(findings.node_command))
        refuse(setting, findings.node_command, "which runs SQL on other nodes of the cluster");
    if (OidIsValid(findings.delegated))
        refuse(setting, findings.delegated, "which Citus runs on a worker, where the client's connection is not known");
    if (OidIsValid(findings.user_function) && OidIsValid(findings.citus_table))
        refuse(setting, findings.user_function,
               "which Citus may run on a worker with the statement on a Citus table, where the client's connection "
               "is not known");
}

PlannedStmt* plan(Query* query, const char* query_string, int cursor_options, ParamListInfo bound_params)
{
    check_statement(query);
    if (g_previous_planner)
        return g_previous_planner(query, query_string, cursor_options, bound_params);
    return standard_planner(query, query_string, cursor_options, bound_params);
}

} // namespace

void register_citus_transport_guard()
{
    g_previous_planner = planner_hook;
    planner_hook = plan;
}

} // namespace pgphi::pg
