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
#include "catalog/namespace.h"
#include "catalog/pg_language.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "commands/extension.h"
#include "nodes/execnodes.h"
#include "nodes/nodeFuncs.h"
#include "nodes/parsenodes.h"
#include "parser/parsetree.h"
#include "tcop/utility.h"
#include "optimizer/planner.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/typcache.h"
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
ProcessUtility_hook_type g_previous_utility = nullptr;

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

// Whether Citus catalog `catalog` (in pg_catalog) has a row with `column` =
// key (and classid = `classid`, when valid) in which, if `any_of` names
// columns, one of them is set: NOT NULL, and true for a boolean (for
// delegation: distribution_argument_index, colocationid, force_delegation).
bool citus_catalog_has(const char* catalog, const char* column, Oid key, Oid classid,
                       const char* const* any_of, size_t any_count)
{
    Oid relid = get_relname_relid(catalog, PG_CATALOG_NAMESPACE);
    if (!OidIsValid(relid))
        return false;
    Relation relation = table_open(relid, AccessShareLock);
    TupleDesc descriptor = RelationGetDescr(relation);
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
        found = any_count == 0;
        for (size_t i = 0; i < any_count && !found; ++i) {
            AttrNumber attnum = get_attnum(relid, any_of[i]);
            if (attnum == InvalidAttrNumber)
                continue; // a column this Citus version lacks
            bool isnull;
            Datum value = heap_getattr(tuple, attnum, descriptor, &isnull);
            found = !isnull && (TupleDescAttr(descriptor, attnum - 1)->atttypid != BOOLOID || DatumGetBool(value));
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
        // Citus delegates a call to a worker when the function is colocated
        // with a table (distributed, reference or single-shard), or forced.
        static const char* const kDelegation[] = {"distribution_argument_index", "colocationid",
                                                  "force_delegation"};
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

bool is_citus_table(Oid relid)
{
    return citus_catalog_has("pg_dist_partition", "logicalrelid", relid, InvalidOid, nullptr, 0);
}

void walk_domain_checks(Oid domain, Findings* findings);
void walk_target_table(Oid relid, Findings* findings);

bool walk(Node* node, void* context)
{
    if (node == nullptr)
        return false;
    auto* findings = static_cast<Findings*>(context);
    if (IsA(node, Query)) {
        auto* query = reinterpret_cast<Query*>(node);
        if (query->resultRelation > 0 && query->commandType != CMD_SELECT) {
            RangeTblEntry* target = rt_fetch(query->resultRelation, query->rtable);
            if (target->rtekind == RTE_RELATION && is_citus_table(target->relid))
                walk_target_table(target->relid, findings);
        }
        return query_tree_walker(query, compat::walker(walk), context, QTW_EXAMINE_RTES_BEFORE);
    }
    if (IsA(node, RangeTblEntry)) {
        auto* entry = reinterpret_cast<RangeTblEntry*>(node);
        if (entry->rtekind == RTE_RELATION && !OidIsValid(findings->citus_table) && is_citus_table(entry->relid))
            findings->citus_table = entry->relid;
        return false; // its subquery, functions and values are walked by query_tree_walker
    }
    if (IsA(node, CoerceToDomain))
        walk_domain_checks(reinterpret_cast<CoerceToDomain*>(node)->resulttype, findings);
    check_functions_in_node(node, note_function, context);
    return expression_tree_walker(node, compat::walker(walk), context);
}

// A domain's CHECK constraints (its base domains' too) run where the value
// is coerced, which for a pushed-down statement is a worker.
void walk_domain_checks(Oid domain, Findings* findings)
{
    // In the memory context, not on the stack: the context's reset callback
    // points into it.
    auto* constraints = static_cast<DomainConstraintRef*>(palloc0(sizeof(DomainConstraintRef)));
    InitDomainConstraintRef(domain, constraints, CurrentMemoryContext, false);
    ListCell* cell;
    foreach (cell, constraints->constraints) {
        auto* constraint = static_cast<DomainConstraintState*>(lfirst(cell));
        if (constraint->constrainttype == DOM_CONSTRAINT_CHECK)
            walk(reinterpret_cast<Node*>(constraint->check_expr), findings);
    }
}

// What a write into a Citus table runs on the workers besides the statement:
// CHECK constraints, generated columns and defaults, and triggers.
void walk_target_table(Oid relid, Findings* findings)
{
    Relation relation = table_open(relid, AccessShareLock);
    TupleConstr* constr = RelationGetDescr(relation)->constr;
    if (constr != nullptr) {
        for (int i = 0; i < constr->num_check; ++i)
            walk(static_cast<Node*>(stringToNode(constr->check[i].ccbin)), findings);
        for (int i = 0; i < constr->num_defval; ++i)
            walk(static_cast<Node*>(stringToNode(constr->defval[i].adbin)), findings);
    }
    if (relation->trigdesc != nullptr)
        for (int i = 0; i < relation->trigdesc->numtriggers; ++i)
            classify_function(relation->trigdesc->triggers[i].tgfoid, *findings);
    table_close(relation, AccessShareLock);
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

// The setting's value when this session's statements are to be checked.
const char* refusing_setting()
{
    const char* setting = plaintext_transport_refusing();
    return setting != nullptr && in_citus_cluster() ? setting : nullptr;
}

Findings new_findings()
{
    Findings findings;
    findings.pgphi_extension = get_extension_oid("pgphi", true);
    findings.citus_extension = get_extension_oid("citus", true);
    return findings;
}

void decide(const char* setting, const Findings& findings)
{
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

void check_statement(Query* query)
{
    const char* setting = refusing_setting();
    if (setting == nullptr)
        return;
    Findings findings = new_findings();
    walk(reinterpret_cast<Node*>(query), &findings);
    decide(setting, findings);
}

// Utility statements are not planned: CALL, which Citus sends whole to a
// worker for a distributed procedure, and COPY into a Citus table, whose
// constraints, defaults and triggers run on the workers.
void check_utility(Node* statement)
{
    const char* setting = refusing_setting();
    if (setting == nullptr)
        return;
    Findings findings = new_findings();
    if (IsA(statement, CallStmt)) {
        FuncExpr* call = reinterpret_cast<CallStmt*>(statement)->funcexpr;
        if (call != nullptr && citus_catalog_has("pg_dist_object", "objid", call->funcid, ProcedureRelationId,
                                                 nullptr, 0))
            refuse(setting, call->funcid, "a distributed procedure, which Citus runs on a worker, where the "
                                          "client's connection is not known");
    } else if (IsA(statement, CopyStmt)) {
        auto* copy = reinterpret_cast<CopyStmt*>(statement);
        if (!copy->is_from || copy->relation == nullptr)
            return;
        Oid relid = RangeVarGetRelid(copy->relation, AccessShareLock, true);
        if (!OidIsValid(relid) || !is_citus_table(relid))
            return;
        findings.citus_table = relid;
        walk_target_table(relid, &findings);
    }
    decide(setting, findings);
}

void on_utility(PlannedStmt* planned, const char* query, bool read_only, ProcessUtilityContext context,
                ParamListInfo params, QueryEnvironment* environment, DestReceiver* dest, QueryCompletion* completion)
{
    check_utility(planned->utilityStmt);
    if (g_previous_utility)
        g_previous_utility(planned, query, read_only, context, params, environment, dest, completion);
    else
        standard_ProcessUtility(planned, query, read_only, context, params, environment, dest, completion);
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
    g_previous_utility = ProcessUtility_hook;
    ProcessUtility_hook = on_utility;
}

} // namespace pgphi::pg
