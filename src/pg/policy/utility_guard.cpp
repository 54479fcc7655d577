// Puts on record what switches pgphi's DDL guard off.
//
// The guard on pgphi's catalog (the event triggers pgphi_guard_catalog_ddl
// and pgphi_guard_catalog_drop, see the "catalog audit" SQL) refuses and
// records DDL on pgphi's tables. Event triggers do not fire for commands on
// event triggers, and PostgreSQL 17 added the setting event_triggers, so a
// superuser could switch the guard off, then the tables' audit triggers, and
// change the catalog with nothing on record. A superuser cannot be stopped,
// but this ProcessUtility hook, which no event trigger setting reaches,
// queues an audit event (written even if the transaction then aborts) for
//   - ALTER EVENT TRIGGER (enable, disable, rename, owner) on any event
//     trigger of extension pgphi;
//   - SET event_triggers = off (and RESET of it to off), on 17 and later;
//   - the first command of a session in which event_triggers is already off
//     (from the connection, a role or database setting, or the server).
// The hash chain and its anchors then show whether the trail was cut after.
//
// It also keeps pgphi.key_grant_members true after REVOKE, ALTER GROUP and
// DROP ROLE in this database: a role that left a group no longer counts as
// covered by the group's key grants, so adding it again later needs a
// custodian again (pgphi._prune_grant_members, which expire_key_grants()
// runs too, for role changes made while connected to another database).
#include "shared/postgres.hpp"

extern "C" {
#include "access/htup_details.h"
#include "catalog/dependency.h"
#include "catalog/pg_event_trigger.h"
#include "catalog/pg_extension.h"
#include "commands/event_trigger.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/guc.h"
#include "utils/syscache.h"
}

#include "policy/utility_guard.hpp"
#include "shared/audit.hpp"
#include "shared/compat.hpp"

namespace pgphi::pg {

namespace {

ProcessUtility_hook_type g_previous_utility = nullptr;
bool g_reported_guard_off = false; // this session's "event triggers are off" is on record

// Whether `name` is an event trigger that belongs to extension pgphi.
bool is_pgphi_event_trigger(const char* name)
{
    Oid extension = get_extension_oid("pgphi", true);
    if (!OidIsValid(extension))
        return false;
    HeapTuple tuple = SearchSysCache1(EVENTTRIGGERNAME, CStringGetDatum(name));
    if (!HeapTupleIsValid(tuple))
        return false;
    Oid trigger = reinterpret_cast<Form_pg_event_trigger>(GETSTRUCT(tuple))->oid;
    ReleaseSysCache(tuple);
    return getExtensionOfObject(EventTriggerRelationId, trigger) == extension;
}

bool pgphi_installed() { return OidIsValid(get_extension_oid("pgphi", true)); }

void record(const char* detail)
{
    queue_audit_event("catalog_guard", AuditOutcome::Ok, 0, 0, "", detail);
}

const char* enabled_word(char how)
{
    switch (how) {
    case TRIGGER_DISABLED: return "disabled";
    case TRIGGER_FIRES_ALWAYS: return "enabled always";
    case TRIGGER_FIRES_ON_REPLICA: return "enabled for replica sessions only";
    default: return "enabled for origin sessions only";
    }
}

// True for SET / RESET / SET LOCAL of event_triggers that leaves it off.
bool switches_event_triggers_off(const VariableSetStmt* set)
{
    if (set->name == nullptr || pg_strcasecmp(set->name, "event_triggers") != 0)
        return false;
    if (set->kind != VAR_SET_VALUE || set->args == nullptr)
        return set->kind == VAR_SET_DEFAULT || set->kind == VAR_RESET; // back to a default that may be off
    const Node* arg = static_cast<const Node*>(linitial(set->args));
    if (!IsA(arg, A_Const))
        return true;
    const A_Const* value = reinterpret_cast<const A_Const*>(arg);
    if (value->isnull)
        return true;
    bool on = true;
    if (IsA(&value->val, String))
        return !parse_bool(strVal(&value->val), &on) || !on;
    if (IsA(&value->val, Integer))
        return intVal(&value->val) == 0;
    return true;
}

// What the statement does to the guard, if anything, as a detail for the
// audit trail; nullptr otherwise.
const char* guard_change(const Node* statement)
{
    switch (nodeTag(statement)) {
    case T_AlterEventTrigStmt: {
        auto* alter = reinterpret_cast<const AlterEventTrigStmt*>(statement);
        if (!is_pgphi_event_trigger(alter->trigname))
            return nullptr;
        return psprintf("event trigger %s %s by ALTER EVENT TRIGGER", alter->trigname, enabled_word(alter->tgenabled));
    }
    case T_RenameStmt: {
        auto* rename = reinterpret_cast<const RenameStmt*>(statement);
        if (rename->renameType != OBJECT_EVENT_TRIGGER || !is_pgphi_event_trigger(strVal(rename->object)))
            return nullptr;
        return psprintf("event trigger %s renamed to %s", strVal(rename->object), rename->newname);
    }
    case T_AlterOwnerStmt: {
        auto* owner = reinterpret_cast<const AlterOwnerStmt*>(statement);
        if (owner->objectType != OBJECT_EVENT_TRIGGER)
            return nullptr;
        const char* name = strVal(owner->object);
        if (!is_pgphi_event_trigger(name))
            return nullptr;
        return psprintf("event trigger %s given to another owner", name);
    }
    case T_VariableSetStmt: {
        auto* set = reinterpret_cast<const VariableSetStmt*>(statement);
        if (switches_event_triggers_off(set) && pgphi_installed())
            return "event triggers switched off for the session (SET event_triggers)";
        return nullptr;
    }
    default:
        break;
    }
    return nullptr;
}

// Whether the statement can end role memberships.
bool ends_memberships(const Node* statement)
{
    switch (nodeTag(statement)) {
    case T_GrantRoleStmt:
        return !reinterpret_cast<const GrantRoleStmt*>(statement)->is_grant;
    case T_DropRoleStmt:
    case T_AlterRoleStmt:
        return true;
    default:
        return false;
    }
}

// Drops the grant records of roles that are no longer members, as the
// extension's owner (whoever may REVOKE or DROP ROLE may not otherwise call
// pgphi's functions), audited as forget_member. A catalog without them (before
// 0.3.0) has nothing to prune.
void prune_grant_members()
{
    if (!pgphi_installed())
        return;
    SPI_connect();
    bool isnull = true;
    Oid owner = InvalidOid;
    if (SPI_execute("SELECT e.extowner FROM pg_catalog.pg_extension e "
                    "WHERE e.extname OPERATOR(pg_catalog.=) 'pgphi' "
                    "AND pg_catalog.to_regprocedure('pgphi._prune_grant_members()') IS NOT NULL",
                    true, 1) == SPI_OK_SELECT &&
        SPI_processed == 1)
        owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
    if (OidIsValid(owner) && !isnull) {
        // An error aborts the (sub)transaction, which restores the user.
        Oid saved_user;
        int saved_context;
        GetUserIdAndSecContext(&saved_user, &saved_context);
        SetUserIdAndSecContext(owner, saved_context | SECURITY_LOCAL_USERID_CHANGE);
        if (SPI_execute("SELECT pgphi._prune_grant_members()", false, 0) != SPI_OK_SELECT)
            elog(ERROR, "pgphi: could not prune the key grant records");
        SetUserIdAndSecContext(saved_user, saved_context);
    }
    SPI_finish();
}

void guard_utility(PlannedStmt* planned, const char* query, bool read_only, ProcessUtilityContext context,
                   ParamListInfo params, QueryEnvironment* environment, DestReceiver* dest, QueryCompletion* completion)
{
    const Node* statement = planned->utilityStmt;
    if (!creating_extension)
        if (const char* change = guard_change(statement))
            record(change);
    if (!g_reported_guard_off && !compat::event_triggers_enabled() && pgphi_installed()) {
        record("a session ran commands with event triggers off (event_triggers = off)");
        g_reported_guard_off = true;
    }
    if (g_previous_utility)
        g_previous_utility(planned, query, read_only, context, params, environment, dest, completion);
    else
        standard_ProcessUtility(planned, query, read_only, context, params, environment, dest, completion);
    if (!creating_extension && ends_memberships(statement))
        prune_grant_members();
}

} // namespace

void register_utility_guard()
{
    g_previous_utility = ProcessUtility_hook;
    ProcessUtility_hook = guard_utility;
}

} // namespace pgphi::pg
