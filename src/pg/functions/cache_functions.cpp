// Observability and control of the key broker and the shared DEK cache:
// pgphi.cache_stats, pgphi.broker_status() and pgphi.flush_cache().
#include "shared/postgres.hpp"

extern "C" {
#include "access/htup_details.h"
#include "access/xact.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"
#include "utils/timestamp.h"
}

#include <algorithm>

#include "shared/shared_state.hpp"

using namespace pgphi;
using namespace pgphi::pg;

namespace {

Datum return_row(FunctionCallInfo fcinfo, Datum* values, bool* nulls)
{
    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "return type must be a row type");
    desc = BlessTupleDesc(desc);
    return HeapTupleGetDatum(heap_form_tuple(desc, values, nulls));
}

Datum counter(const std::atomic<uint64_t>& value)
{
    return Int64GetDatum(static_cast<int64>(value.load(std::memory_order_relaxed)));
}

} // namespace

PGPHI_FUNCTION(pgphi_cache_stats)
{
    SharedState* state = shared_state();
    cache::Table table = state->table();
    int64 ready = 0, pending = 0;
    LWLockAcquire(state->lock, LW_SHARED);
    for (uint32_t i = 0; i < table.capacity(); ++i) {
        ready += table.at(i).state == cache::SlotState::Ready;
        pending += table.at(i).state == cache::SlotState::Pending;
    }
    LWLockRelease(state->lock);

    const cache::Stats& stats = state->stats;
    uint64_t calls = stats.key_manager_calls.load();
    double average_ms = calls ? static_cast<double>(stats.key_manager_micros.load()) / calls / 1000.0 : 0.0;
    Datum values[12] = {
        counter(stats.hits),        counter(stats.misses),      counter(stats.key_manager_calls),
        counter(stats.key_manager_errors), Float8GetDatum(average_ms), counter(stats.refreshes),
        counter(stats.evictions),   counter(stats.expirations), Int64GetDatum(ready),
        Int64GetDatum(pending),     Int64GetDatum(table.capacity()), Int64GetDatum(sizeof(cache::Slot)),
    };
    bool nulls[12] = {};
    PG_RETURN_DATUM(return_row(fcinfo, values, nulls));
}

PGPHI_FUNCTION(pgphi_broker_status)
{
    SharedState* state = shared_state();
    cache::Table table = state->table();
    LWLockAcquire(state->lock, LW_SHARED);
    // Broker 0's process; config_reloads is the fewest any running broker applied,
    // so that waiting for it to grow waits for every broker.
    int pid = state->brokers[0].pid;
    int64_t started_ms = state->brokers[0].started_ms;
    uint32_t starts = state->brokers[0].starts;
    uint32_t reloads = state->brokers[0].reloads;
    for (const BrokerProcess& broker : state->brokers)
        if (broker.pid != 0)
            reloads = std::min(reloads, broker.reloads);
    int64 pending = 0, in_flight = 0, admin = 0;
    for (uint32_t i = 0; i < table.capacity(); ++i) {
        pending += table.at(i).state == cache::SlotState::Pending;
        in_flight += table.at(i).in_flight;
    }
    for (const AdminRequest& request : state->admin)
        admin += request.state == AdminRequest::State::Pending || request.state == AdminRequest::State::InFlight;
    LWLockRelease(state->lock);

    Datum values[7] = {BoolGetDatum(pid != 0), Int32GetDatum(pid),
                       TimestampTzGetDatum(static_cast<TimestampTz>(started_ms) * 1000),
                       Int32GetDatum(starts > 0 ? starts - 1 : 0), Int64GetDatum(pending + admin),
                       Int64GetDatum(in_flight), Int64GetDatum(reloads)};
    bool nulls[7] = {false, pid == 0, started_ms == 0, false, false, false, false};
    PG_RETURN_DATUM(return_row(fcinfo, values, nulls));
}

// pgphi.broker_processes(): one row per key broker process: the provider it
// serves ('local' for broker 0, which also serves any other name and does the
// housekeeping), its pid (NULL when not running), start time, restarts, and
// configuration reloads applied.
PGPHI_FUNCTION(pgphi_broker_processes)
{
    ReturnSetInfo* rsinfo = reinterpret_cast<ReturnSetInfo*>(fcinfo->resultinfo);
    InitMaterializedSRF(fcinfo, 0);
    SharedState* state = shared_state();
    BrokerProcess brokers[kBrokers];
    LWLockAcquire(state->lock, LW_SHARED);
    for (int i = 0; i < kBrokers; ++i)
        brokers[i] = state->brokers[i];
    LWLockRelease(state->lock);
    for (int i = 0; i < kBrokers; ++i) {
        if (!broker_registered(i))
            continue; // its provider is served by broker 0
        const BrokerProcess& broker = brokers[i];
        Datum values[5] = {CStringGetTextDatum(kBrokerProviders[i] ? kBrokerProviders[i] : "local"),
                           Int32GetDatum(broker.pid),
                           TimestampTzGetDatum(static_cast<TimestampTz>(broker.started_ms) * 1000),
                           Int32GetDatum(broker.starts > 0 ? static_cast<int32>(broker.starts - 1) : 0),
                           Int64GetDatum(broker.reloads)};
        bool nulls[5] = {false, broker.pid == 0, broker.started_ms == 0, false, false};
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    }
    return static_cast<Datum>(0);
}

namespace {

// Drops every cached DEK in shared memory and in every session, so the next
// use of each key asks the key manager again. Touches only shared memory
// (no ERROR), so it may run from a commit callback.
int64 flush_shared_cache()
{
    SharedState* state = shared_state();
    cache::Table table = state->table();
    int64 flushed = 0;
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    for (uint32_t i = 0; i < table.capacity(); ++i) {
        cache::Slot& slot = table.at(i);
        if (slot.state == cache::SlotState::Ready || slot.state == cache::SlotState::Failed) {
            flushed += slot.state == cache::SlotState::Ready;
            table.wipe(slot); // an in-flight result for it is discarded (generation changed)
        }
    }
    LWLockRelease(state->lock);
    state->invalidation_generation.fetch_add(1);
    state->stats.expirations.fetch_add(flushed, std::memory_order_relaxed);
    return flushed;
}

bool g_flush_at_commit = false;

// A prepared transaction's COMMIT PREPARED runs in another session (or
// after a restart), where no callback of this one runs: the flush would
// never happen, and the flag left behind would flush some later, unrelated
// commit. So a transaction that destroyed a key cannot be prepared, as
// PostgreSQL refuses to prepare one that touched temporary objects.
void flush_after_commit(XactEvent event, void*)
{
    if (event == XACT_EVENT_PRE_PREPARE && g_flush_at_commit)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                        errmsg("cannot PREPARE a transaction that destroys a pgphi key version"),
                        errdetail("The wrapped DEK is erased when the destroying transaction commits."),
                        errhint("Destroy key versions in an ordinary transaction.")));
    if (event == XACT_EVENT_COMMIT && g_flush_at_commit)
        flush_shared_cache();
    if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PREPARE ||
        event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT)
        g_flush_at_commit = false;
}

} // namespace

PGPHI_FUNCTION(pgphi_flush_cache)
{
    PG_RETURN_INT64(flush_shared_cache());
}

// destroy_key: flush once the destruction is committed, so that no session
// can load the DEK again from the catalog row in between.
PGPHI_FUNCTION(pgphi_flush_cache_at_commit)
{
    static bool registered = false;
    if (!registered) {
        RegisterXactCallback(flush_after_commit, nullptr);
        registered = true;
    }
    g_flush_at_commit = true;
    PG_RETURN_VOID();
}

// pgphi._usage_counts(): (key_id, version, encryptions) of this database's
// key versions, from shared memory.
PGPHI_FUNCTION(pgphi_usage_counts)
{
    ReturnSetInfo* rsinfo = reinterpret_cast<ReturnSetInfo*>(fcinfo->resultinfo);
    InitMaterializedSRF(fcinfo, 0);
    SharedState* state = shared_state();
    for (UsageEntry& entry : state->usage) {
        if (!entry.in_use || entry.database != MyDatabaseId)
            continue;
        Datum values[3] = {Int32GetDatum(static_cast<int32>(entry.key_id)),
                           Int32GetDatum(static_cast<int32>(entry.key_version)),
                           Int64GetDatum(static_cast<int64>(entry.seals.load()))};
        bool nulls[3] = {false, false, false};
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    }
    return static_cast<Datum>(0);
}
