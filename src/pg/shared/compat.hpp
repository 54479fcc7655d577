// Differences between the PostgreSQL major versions pgphi supports (15, 17
// and 18), kept in this one header so the rest of src/pg reads as if there
// were a single version. Each entry names the version that changed and why
// pgphi cares. Include after postgres.hpp.
#pragma once

extern "C" {
#include "catalog/pg_proc.h"
#include "nodes/nodeFuncs.h"
#include "commands/event_trigger.h"
#include "commands/vacuum.h"
#include "miscadmin.h"
#include "postmaster/autovacuum.h"
#include "utils/acl.h"
#include "utils/wait_event.h"
}

namespace pgphi::compat {

// The wait event a session shows in pg_stat_activity while it waits for the
// key broker. PostgreSQL 17 lets an extension name its own wait events
// ("PgphiKeyBroker"); before that, only the generic "Extension" exists.
uint32 key_broker_wait_event();

// Lets ANALYZE's cost-based delay (and interrupts) in while a custom
// statistics function loops over the sample. PostgreSQL 18 asks whether the
// caller is ANALYZE, which has its own delay setting there.
inline void analyze_delay_point()
{
#if PG_VERSION_NUM >= 180000
    vacuum_delay_point(true);
#else
    vacuum_delay_point();
#endif
}

// Whether event triggers fire in this session. PostgreSQL 17 added the
// superuser setting event_triggers, which can switch them all off.
inline bool event_triggers_enabled()
{
#if PG_VERSION_NUM >= 170000
    return event_triggers;
#else
    return true;
#endif
}

// Whether this process is an autovacuum worker. PostgreSQL 17 renamed the
// test (IsAutoVacuumWorkerProcess became AmAutoVacuumWorkerProcess, with the
// other process kinds, in miscadmin.h).
inline bool is_autovacuum_worker()
{
#if PG_VERSION_NUM >= 170000
    return AmAutoVacuumWorkerProcess();
#else
    return IsAutoVacuumWorkerProcess();
#endif
}

// Whether ROLE may execute function FUNC. PostgreSQL 16 replaced the
// per-catalog pg_*_aclcheck functions by object_aclcheck.
inline bool may_execute(Oid func, Oid role)
{
#if PG_VERSION_NUM >= 160000
    return object_aclcheck(ProcedureRelationId, func, role, ACL_EXECUTE) == ACLCHECK_OK;
#else
    return pg_proc_aclcheck(func, role, ACL_EXECUTE) == ACLCHECK_OK;
#endif
}

// A node walker for expression_tree_walker and query_tree_walker, which take
// it as `bool (*)()` before PostgreSQL 16 and as a tree_walker_callback since.
using NodeWalker = bool (*)(Node*, void*);
#if PG_VERSION_NUM >= 160000
inline tree_walker_callback walker(NodeWalker function) { return function; }
#else
// Through void (*)(), the type GCC accepts any function pointer cast from.
inline bool (*walker(NodeWalker function))()
{
    return reinterpret_cast<bool (*)()>(reinterpret_cast<void (*)()>(function));
}
#endif

} // namespace pgphi::compat
