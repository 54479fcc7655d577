// The parts of pgphi's audit trail that cannot be written by the transaction
// they describe: refused and failed key uses (whose transaction is about to
// abort), and how many values each role encrypted and decrypted under each
// key (counted on the hot path, where a table write per value is out of the
// question). Both are kept in shared memory and written to the database's
// pgphi.audit_log and pgphi.key_use_stats by a short-lived "audit writer"
// worker that the key broker starts. Successful key administration is
// audited in SQL, in the same transaction as the change (see the 0.2.0 script).
#pragma once

#include "shared/postgres.hpp"

#include "core/data_key.hpp"

namespace pgphi::pg {

// Encrypting or decrypting one value: what is granted per key
// (policy/access_control.hpp) and counted per role (count_key_use).
enum class KeyUse : uint8_t { Encrypt = 0, Decrypt = 1 };

// Ok: a change that happened but must be on record (see utility_guard.cpp).
enum class AuditOutcome : uint8_t { Refused, Failed, Ok };

// Queues an event for pgphi.audit_log in this database. Never raises, and
// logs only an alert (a WARNING, once per window: shared/alerts.hpp) when a
// refused key use or failed decrypt passes its alert threshold. Identical events coalesce into one entry with a count and the
// first and last time; when too many distinct events wait, the rest are
// counted per role, action and outcome in overflow entries (their key and
// detail are not kept); only when those are full too is an event dropped,
// and then counted. The broker logs a summary of both at most once a minute.
void queue_audit_event(const char* action, AuditOutcome outcome, const DataKey& key, const char* detail);
void queue_audit_event(const char* action, AuditOutcome outcome, uint32_t key_id, uint32_t key_version,
                       const char* key_name, const char* detail);

// Counts one value encrypted or decrypted by the current role. Counts stay in
// the backend until its transaction ends, then go to shared memory.
void count_key_use(uint32_t key_id, KeyUse use);

// Shared memory, from shared_state's hooks.
Size audit_shared_size();
void request_audit_lwlock();
void init_audit_shared_memory(void* memory, bool found);

// What broker_status() reports.
struct AuditCounters {
    uint32_t queued_events;
    uint64_t dropped_events;
    uint64_t dropped_counts;
    uint64_t overflow_events;
};
AuditCounters audit_counters();

// From _PG_init.
void define_audit_settings();

} // namespace pgphi::pg
