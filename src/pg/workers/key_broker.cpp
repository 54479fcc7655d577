// The key broker: a background worker, and the only process that talks to
// key managers or reads their credentials. Backends post requests in shared
// memory (src/pg/shared/shared_state.cpp) and sleep on a condition variable; the
// broker answers them, refreshes keys in use before their TTL ends, rides
// out key-manager outages for the grace period, and evicts keys the key
// manager refuses. It needs no database connection: requests carry the
// wrapped DEK.
//
// The main loop is C-style glue: key-manager calls run through run_core(),
// and no C++ object lives in a frame that CHECK_FOR_INTERRUPTS could leave.
// Nothing that can throw runs outside run_core() either (a C++ exception
// there would reach std::terminate and restart the whole cluster): the
// broker never hashes a request itself, it keeps the digest the backend
// computed when it claimed the slot.
//
// One broker process per remote key manager (Vault, AWS KMS), and broker 0
// for the local provider and the housekeeping (seal counts, rotation and
// audit workers): a key manager that hangs delays its own keys only. The
// alternative, libcurl's multi interface in a single process, would need
// every provider's request sequences (Vault login and token renewal, AWS
// credential refresh from the metadata service, retries) rewritten as state
// machines; separate processes keep the providers' code synchronous and
// simple, cost one idle process per provider, and need no threads. Every
// broker takes only the slots and admin requests of its own provider from
// the one shared table; backends wake them all.
//
// An ERROR in the broker does not end it: like the checkpointer it has its
// own sigsetjmp handler, which releases its LWLocks and condition-variable
// sleep, gives the slots it had in hand back to the queue, and carries on.
// Without it the bgworker default exits (proc_exit) with the lock still
// held: the broker restarts a second later, and on minor releases whose
// shmem_exit does not release LWLocks before the exit callbacks, the callback
// that clears the broker's latch would wait forever on the lock the broker
// itself holds, with every backend then waiting for it. (15.20 releases
// them first; forget_broker releases them too, for the others.)
#include "shared/postgres.hpp"

extern "C" {
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/condition_variable.h"
#include "storage/lwlock.h"
#include "tcop/tcopprot.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/wait_event.h"
}

#include <chrono>
#include <csetjmp>
#include <cstring>
#include <optional>

#include <unistd.h>

#include "core/dek_cache.hpp"
#include "core/http_client.hpp"
#include "core/local_provider.hpp"
#include "shared/audit.hpp"
#include "shared/error_bridge.hpp"
#include "shared/providers.hpp"
#include "shared/settings.hpp"
#include "shared/shared_state.hpp"
#include "workers/audit_anchor_service.hpp"
#include "workers/audit_writer.hpp"
#include "workers/key_broker.hpp"
#include "workers/rotation_worker.hpp"
#include "workers/seal_reservation_worker.hpp"

namespace pgphi::pg {

namespace {

constexpr int kMaxJobs = 64;
constexpr int64_t kAbandonedRequestMs = 60'000;
constexpr int64_t kUsageSaveIntervalMs = 5'000;
constexpr const char* kUsageFile = "pgphi_dek_usage";   // in the data directory

int64_t g_usage_saved_ms = 0;

struct UnwrapJob {
    uint32_t slot;
    uint64_t generation;
    bool refresh;
    cache::Digest digest;     // the slot's, when the job was taken
    cache::UnwrapRequest request;
};

UnwrapJob g_jobs[kMaxJobs]; // static: about 100 kB, too much for the stack
// The DEK a key manager just unwrapped, on its way into the shared table.
// Static rather than on the stack so the error handler can wipe it.
uint8_t g_unwrapped[cache::kDekSize];

// pgphi.test_fault (test-only, see shared/settings.cpp): a fault the broker
// injects into itself once, until the setting is cleared. Which fault fired
// is kept in shared memory, so that a broker restarted after the fault does
// not inject it again.
bool g_fault_armed_here = false;

bool test_fault(const char* name)
{
    SharedState* state = shared_state();
    if (!test_fault_setting || strcmp(test_fault_setting, name) != 0 || strcmp(state->test_fault_fired, name) == 0)
        return false;
    strlcpy(state->test_fault_fired, name, sizeof(state->test_fault_fired));
    return true;
}

// A fault armed once in every broker process (whichever gets the job).
bool test_fault_in_each_broker(const char* name)
{
    if (g_fault_armed_here || !test_fault_setting || strcmp(test_fault_setting, name) != 0)
        return false;
    g_fault_armed_here = true;
    return true;
}

// This process's broker number (0 .. kBrokers - 1) and what it serves.
int g_broker = 0;

bool mine(const cache::UnwrapRequest& request) { return broker_serves(g_broker, request.provider); }

// An admin request is for the broker of its key's provider, but a rekey's
// second step, once the source's broker handed the DEK over, is for the
// destination's.
bool mine(const AdminRequest& request)
{
    return broker_serves(g_broker, request.handed_over ? request.to_provider : request.key.provider);
}

// Under the exclusive lock: after an ERROR in this broker, or when it starts,
// the work of its provider that was in hand goes back to the queue (the next
// loop takes it again).
void requeue_in_flight(SharedState* state)
{
    cache::Table table = state->table();
    for (uint32_t i = 0; i < table.capacity(); ++i)
        if (table.at(i).in_flight && mine(table.at(i).request))
            table.at(i).in_flight = false;
    for (AdminRequest& request : state->admin)
        if (request.state == AdminRequest::State::InFlight && mine(request))
            request.state = AdminRequest::State::Pending;
}

void forget_broker(int, Datum)
{
    SharedState* state = shared_state();
    // before_shmem_exit callbacks run before ProcKill releases LWLocks (and,
    // on older minor releases, before shmem_exit does): an exit while the
    // broker held the lock would otherwise wait here on itself.
    LWLockReleaseAll();
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    state->brokers[g_broker].latch = nullptr;
    state->brokers[g_broker].pid = 0;
    LWLockRelease(state->lock);
}

void announce_broker(SharedState* state)
{
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    BrokerProcess& me = state->brokers[g_broker];
    me.latch = MyLatch;
    me.pid = MyProcPid;
    me.started_ms = now_ms();
    me.starts++;
    // Work the previous broker had in hand when it died is simply redone.
    requeue_in_flight(state);
    LWLockRelease(state->lock);
    before_shmem_exit(forget_broker, 0);
}

// Under the exclusive lock: expire dead keys and pick up the work to do.
// An expiry (past its grace period, or idle past its TTL) needs no word to
// the backends: their own copies end no later than the shared one. Only a
// denial or a destruction bumps the invalidation generation, which makes
// every backend drop every key it holds.
int collect_work(SharedState* state, int64_t now, int* admin_jobs, int* admin_count)
{
    cache::Table table = state->table();
    int64_t ttl = static_cast<int64_t>(cache_ttl_s) * 1000;
    int jobs = 0;
    // Requests that backends are waiting for come first, then refreshes.
    for (int pass = 0; pass < 2; ++pass)
        for (uint32_t i = 0; i < table.capacity() && jobs < kMaxJobs; ++i) {
            cache::Slot& slot = table.at(i);
            if (slot.state == cache::SlotState::Free || !mine(slot.request))
                continue;
            bool take = pass == 0 ? slot.state == cache::SlotState::Pending && !slot.in_flight
                                  : table.wants_refresh(slot, now, ttl);
            if (pass == 1 && table.is_dead(slot, now, ttl)) {
                table.wipe(slot);
                state->stats.expirations.fetch_add(1, std::memory_order_relaxed);
                continue;
            }
            if (!take)
                continue;
            slot.in_flight = true;
            g_jobs[jobs++] = UnwrapJob{i, slot.generation, pass == 1, slot.digest, slot.request};
        }
    *admin_count = 0;
    for (int i = 0; i < kAdminRequests; ++i) {
        AdminRequest& request = state->admin[i];
        if (request.state == AdminRequest::State::Pending && mine(request)) {
            request.state = AdminRequest::State::InFlight;
            admin_jobs[(*admin_count)++] = i;
        } else if (request.state == AdminRequest::State::Done && now - request.done_at_ms > kAbandonedRequestMs) {
            explicit_bzero(&request, sizeof(request)); // its requester was cancelled
        }
    }
    return jobs;
}

// An explicit "no" from the key manager about this key, as opposed to not
// being able to ask: only these end a cached key before its grace period.
bool is_refusal(ErrorCode code)
{
    return code == ErrorCode::KeyManagerDenied || code == ErrorCode::KeyManagerKeyDisabled ||
           code == ErrorCode::KeyNotFound || code == ErrorCode::WrappedDekInvalid;
}

DekBinding binding_of(const cache::UnwrapRequest& request)
{
    return DekBinding{request.key_id, request.key_version, request.key_name, request.wrapped_by};
}

void log_failure(const char* operation, const cache::UnwrapRequest& request, const CoreFailure& failure)
{
    ereport(LOG, (errmsg("pgphi key broker: %s of key \"%s\" version %u through provider %s failed: %s", operation,
                         request.key_name, request.key_version, request.provider, failure.message)));
}

void run_unwrap(SharedState* state, UnwrapJob& job)
{
    uint8_t* dek = g_unwrapped;
    CoreFailure failure;
    TimestampTz started_at = GetCurrentTimestamp();
    bool ok = run_core(failure, [&] {
        SecureBytes plaintext = provider_named(job.request.provider)
                                    .unwrap(job.request.kek_ref,
                                            ByteView(job.request.wrapped, job.request.wrapped_size),
                                            binding_of(job.request));
        if (plaintext.size() != cache::kDekSize)
            throw Error(ErrorCode::WrappedDekInvalid, "the key provider unwrapped a DEK of the wrong size");
        std::memcpy(dek, plaintext.data(), cache::kDekSize);
    });
    state->stats.key_manager_calls.fetch_add(1, std::memory_order_relaxed);
    state->stats.key_manager_micros.fetch_add(GetCurrentTimestamp() - started_at, std::memory_order_relaxed);
    if (!ok && ProcDiePending) {
        // Abandoned because we are told to exit: leave the request to the
        // next broker rather than failing the sessions waiting for it.
        LWLockAcquire(state->lock, LW_EXCLUSIVE);
        cache::Slot& slot = state->table().at(job.slot);
        if (slot.generation == job.generation)
            slot.in_flight = false;
        LWLockRelease(state->lock);
        return;
    }
    if (!ok) {
        state->stats.key_manager_errors.fetch_add(1, std::memory_order_relaxed);
        log_failure(job.refresh ? "re-validation" : "unwrap", job.request, failure);
    }

    bool drop_everywhere = false;
    int64_t now = now_ms();
    cache::Table table = state->table();
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    if (test_fault("error_under_lock"))
        elog(ERROR, "pgphi test fault: an error in the key broker while it holds its lock");
    cache::Slot& slot = table.at(job.slot);
    // The call is over for this slot whatever happened to it meanwhile; its
    // result applies only if the slot was not flushed or reused.
    if (slot.state != cache::SlotState::Free && slot.digest == job.digest)
        slot.in_flight = false;
    if (slot.generation == job.generation && slot.state != cache::SlotState::Free) {
        if (ok) {
            table.make_ready(slot, dek, now, static_cast<int64_t>(cache_ttl_s) * 1000);
            if (job.refresh)
                state->stats.refreshes.fetch_add(1, std::memory_order_relaxed);
        } else if (job.refresh && !is_refusal(failure.code)) {
            // Unreachable, failing, misconfigured: ride it out for the grace period.
            table.ride_out_outage(slot, now, static_cast<int64_t>(key_manager_grace_s) * 1000,
                                  std::min<int64_t>(5000, static_cast<int64_t>(cache_ttl_s) * 250));
        } else if (job.refresh) {
            // The key manager said no: the key stops working everywhere now.
            table.wipe(slot);
            state->stats.expirations.fetch_add(1, std::memory_order_relaxed);
            drop_everywhere = true;
        } else {
            cache::FailureRecord record;
            record.set(static_cast<int32_t>(failure.code), failure.message, failure.detail, failure.hint);
            table.make_failed(slot, record);
        }
    }
    LWLockRelease(state->lock);
    explicit_bzero(g_unwrapped, sizeof(g_unwrapped));
    if (drop_everywhere)
        state->invalidation_generation.fetch_add(1);
}

// What an admin request's provider call gave: the new wrapped DEK and KEK
// version, or the failure. Written into the request (under the lock) by
// finish(), which marks it done.
struct AdminResult {
    bool ok = false;
    CoreFailure failure;
    uint8_t wrapped[cache::kMaxWrapped];
    size_t wrapped_size = 0;
    char kek_version[cache::kMaxKekRef] = "";

    // Inside run_core: throws when the answer does not fit the request.
    void take(const WrappedDek& result)
    {
        if (result.blob.size() > sizeof(wrapped) || result.kek_version.size() >= sizeof(kek_version))
            throw Error(ErrorCode::ProviderError, "the key provider returned an oversized wrapped DEK");
        std::memcpy(wrapped, result.blob.data(), result.blob.size());
        wrapped_size = result.blob.size();
        std::strcpy(kek_version, result.kek_version.c_str());
    }

    void finish(AdminRequest& shared) const
    {
        shared.ok = ok;
        if (ok) {
            std::memcpy(shared.wrapped, wrapped, wrapped_size);
            shared.wrapped_size = static_cast<uint16_t>(wrapped_size);
            std::strcpy(shared.kek_version, kek_version);
        } else {
            shared.failure.set(static_cast<int32_t>(failure.code), failure.message, failure.detail, failure.hint);
        }
        shared.state = AdminRequest::State::Done;
        shared.done_at_ms = now_ms();
    }
};

// pgphi.rekey moves a DEK to another provider or KEK. The broker of the
// source unwraps it and, when another broker serves the destination, hands it
// over in the request (shared memory, like the DEK cache); the destination's
// broker wraps it. One broker serving both does both steps, and a key manager
// that can move the DEK between its own keys does it without the DEK leaving
// (KMS ReEncrypt). The backend gets the new wrapped DEK, never the DEK.
void run_rekey(SharedState* state, int index)
{
    AdminRequest& shared = state->admin[index];
    cache::UnwrapRequest key;
    char to_provider[cache::kMaxProvider];
    char to_kek_ref[cache::kMaxKekRef];
    uint8_t dek[cache::kDekSize];
    LWLockAcquire(state->lock, LW_SHARED);
    key = shared.key;
    std::memcpy(to_provider, shared.to_provider, sizeof(to_provider));
    std::memcpy(to_kek_ref, shared.to_kek_ref, sizeof(to_kek_ref));
    bool handed_over = shared.handed_over;
    std::memcpy(dek, shared.dek_in_transit, sizeof(dek));
    uint64_t ticket = shared.ticket;
    LWLockRelease(state->lock);
    to_provider[sizeof(to_provider) - 1] = '\0';
    to_kek_ref[sizeof(to_kek_ref) - 1] = '\0';

    AdminResult outcome;
    bool hand_over = false;
    bool wrapping = handed_over; // which step a failure belongs to
    outcome.ok = run_core(outcome.failure, [&] {
        std::optional<WrappedDek> result;
        if (!handed_over) {
            KeyProvider& source = provider_named(key.provider);
            if (std::strcmp(key.provider, to_provider) == 0)
                result = source.rewrap_to(key.kek_ref, to_kek_ref, ByteView(key.wrapped, key.wrapped_size),
                                          binding_of(key));
            if (!result) {
                SecureBytes plaintext =
                    source.unwrap(key.kek_ref, ByteView(key.wrapped, key.wrapped_size), binding_of(key));
                if (plaintext.size() != cache::kDekSize)
                    throw Error(ErrorCode::WrappedDekInvalid, "the key provider unwrapped a DEK of the wrong size");
                std::memcpy(dek, plaintext.data(), cache::kDekSize);
                if (!broker_serves(g_broker, to_provider)) {
                    hand_over = true;
                    return;
                }
            }
        }
        if (!result) {
            wrapping = true;
            result = provider_named(to_provider).wrap(to_kek_ref, SecureBytes(dek, sizeof(dek)), binding_of(key));
        }
        outcome.take(*result);
    });
    state->stats.key_manager_calls.fetch_add(1, std::memory_order_relaxed);
    if (!outcome.ok) {
        state->stats.key_manager_errors.fetch_add(1, std::memory_order_relaxed);
        cache::UnwrapRequest logged = key;
        if (wrapping) {
            strlcpy(logged.provider, to_provider, sizeof(logged.provider));
            strlcpy(logged.kek_ref, to_kek_ref, sizeof(logged.kek_ref));
        }
        log_failure(wrapping ? "rekey (wrapping under the new KEK)" : "rekey (unwrapping under the old KEK)", logged,
                    outcome.failure);
    }

    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    if (shared.ticket == ticket && shared.state == AdminRequest::State::InFlight) {
        if (outcome.ok && hand_over) {
            std::memcpy(shared.dek_in_transit, dek, sizeof(dek));
            shared.handed_over = true;
            shared.state = AdminRequest::State::Pending;
        } else {
            explicit_bzero(shared.dek_in_transit, sizeof(shared.dek_in_transit));
            outcome.finish(shared);
        }
    }
    LWLockRelease(state->lock);
    explicit_bzero(dek, sizeof(dek));
    explicit_bzero(&key, sizeof(key));
    if (hand_over)
        wake_broker(); // the destination's broker
}

// What the server log calls a failed admin request.
const char* operation_label(AdminRequest::Operation operation)
{
    switch (operation) {
    case AdminRequest::Operation::Rewrap: return "rewrap";
    case AdminRequest::Operation::CreateKek: return "KEK creation";
    case AdminRequest::Operation::CreateDedicatedKek: return "dedicated KEK creation";
    case AdminRequest::Operation::DeleteDedicatedKek: return "dedicated KEK deletion";
    case AdminRequest::Operation::Rekey: return "rekey";
    case AdminRequest::Operation::Generate: break;
    }
    return "creation";
}

void run_admin(SharedState* state, int index)
{
    AdminRequest& shared = state->admin[index];
    if (shared.operation == AdminRequest::Operation::Rekey) {
        run_rekey(state, index);
        return;
    }
    LWLockAcquire(state->lock, LW_SHARED);
    cache::UnwrapRequest key = shared.key;
    bool may_create = shared.may_create_local_kek;
    AdminRequest::Operation operation = shared.operation;
    uint64_t ticket = shared.ticket;
    LWLockRelease(state->lock);

    AdminResult outcome;
    bool created = false;
    outcome.ok = run_core(outcome.failure, [&] {
        KeyProvider& provider = provider_named(key.provider);
        WrappedDek result;
        if (operation == AdminRequest::Operation::CreateKek) {
            // A new KEK in the key manager; its own reference comes back as the "KEK version".
            result.kek_version = provider.create_kek(key.kek_ref);
        } else if (operation == AdminRequest::Operation::CreateDedicatedKek) {
            result.kek_version = provider.create_dedicated_kek(key.kek_ref, key.key_name);
        } else if (operation == AdminRequest::Operation::DeleteDedicatedKek) {
            // What the key manager did comes back for the catalog and the audit trail.
            result.kek_version = provider.delete_dedicated_kek(key.kek_ref);
        } else if (operation == AdminRequest::Operation::Rewrap) {
            // Inside the key manager where it can (KMS ReEncrypt); Vault, KMIP
            // and PKCS#11 unwrap and wrap in this process (Vault's rewrap
            // cannot keep the DEK's binding), and the DEK is wiped after.
            result = provider.rewrap(key.kek_ref, ByteView(key.wrapped, key.wrapped_size), binding_of(key));
        } else {
            auto* local = dynamic_cast<LocalKeyProvider*>(&provider);
            if (local && may_create)
                created = local->ensure_kek_file();
            result = provider.generate_dek(key.kek_ref, binding_of(key)).wrapped;
        }
        outcome.take(result);
    });
    state->stats.key_manager_calls.fetch_add(1, std::memory_order_relaxed);
    if (!outcome.ok) {
        state->stats.key_manager_errors.fetch_add(1, std::memory_order_relaxed);
        log_failure(operation_label(operation), key, outcome.failure);
    }

    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    if (shared.ticket == ticket && shared.state == AdminRequest::State::InFlight) {
        shared.created_local_kek_file = created;
        outcome.finish(shared);
    }
    LWLockRelease(state->lock);
}

// The seal counts survive restarts in a small text file in the data
// directory, replaced atomically: a header line, then "database key_id
// version seals rotated" per line. The header says whether a primary wrote
// it at a clean shutdown: only then are the counts complete. After a crash,
// or in a copy of a standby or of a base backup, they may be behind, and
// each version's count starts at its WAL-logged reservation instead
// (pgphi.seal_reservations, see check_seal_budget).
//
// When the file cannot be written (disk full, a file-size limit, no
// permission), the counts stay in shared memory, the previous file stays
// intact, and saving is retried every interval until it works: only a
// shutdown before then loses the counts made since the last save. The
// failure is logged once a minute, not at every retry, and its end is logged.
constexpr int64_t kUsageFailureLogIntervalMs = 60'000;
int64_t g_usage_failing_since_ms = 0;   // 0 while saving works
int64_t g_usage_failure_logged_ms = 0;

// Writes every entry to `path`; false with errno set when that failed.
constexpr const char* kUsageHeader = "pgphi seal counts 2";

bool write_usage_file(SharedState* state, const char* path, bool clean)
{
    FILE* out = AllocateFile(path, PG_BINARY_W);
    if (!out)
        return false;
    fprintf(out, "%s clean=%d\n", kUsageHeader, clean ? 1 : 0);
    for (UsageEntry& entry : state->usage)
        if (entry.in_use)
            fprintf(out, "%u %u %u %llu %d\n", entry.database, entry.key_id, entry.key_version,
                    static_cast<unsigned long long>(entry.seals.load()), pg_atomic_read_u32(&entry.rotated) ? 1 : 0);
    // fclose reports only the last flush: an earlier failed write shows in ferror.
    bool ok = fflush(out) == 0 && !ferror(out);
    int err = errno;
    if (FreeFile(out) != 0 && ok) {
        ok = false;
        err = errno;
    }
    errno = err;
    return ok;
}

void save_usage(SharedState* state, bool at_exit)
{
    // At a primary's clean shutdown the file is always rewritten, to say
    // that its counts are complete.
    bool clean = at_exit && !RecoveryInProgress();
    if (!state->usage_dirty.exchange(false) && !clean)
        return;
    char temp[MAXPGPATH];
    snprintf(temp, sizeof(temp), "%s.tmp", kUsageFile);
    int64_t now = now_ms();
    bool report = at_exit || g_usage_failing_since_ms == 0 ||
                  now - g_usage_failure_logged_ms >= kUsageFailureLogIntervalMs;
    bool written = write_usage_file(state, temp, clean);
    if (!written) {
        int err = errno;
        unlink(temp); // a partial file must not linger
        errno = err;
        if (report)
            ereport(LOG, (errcode_for_file_access(),
                          errmsg("pgphi could not save the key usage counts to \"%s\": %m", kUsageFile),
                          at_exit ? errdetail("The counts made since the last save are lost; \"%s\" keeps the "
                                              "previous ones.", kUsageFile)
                                  : errdetail("The counts are kept in shared memory and saved as soon as "
                                              "writing works again; \"%s\" keeps the previous ones.",
                                              kUsageFile),
                          errhint("Free disk space in the data directory.")));
    }
    // durable_rename reports its own failure.
    if (!written || durable_rename(temp, kUsageFile, report ? LOG : DEBUG1) != 0) {
        state->usage_dirty.store(true);
        if (g_usage_failing_since_ms == 0)
            g_usage_failing_since_ms = now;
        if (report)
            g_usage_failure_logged_ms = now;
        return;
    }
    if (g_usage_failing_since_ms != 0) {
        ereport(LOG, (errmsg("pgphi saved the key usage counts to \"%s\" again, after %lld s of failures",
                             kUsageFile, static_cast<long long>((now - g_usage_failing_since_ms) / 1000))));
        g_usage_failing_since_ms = 0;
    }
}

void load_usage(SharedState* state)
{
    FILE* in = AllocateFile(kUsageFile, PG_BINARY_R);
    if (!in)
        return;
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    bool loaded_before = false;
    for (UsageEntry& entry : state->usage)
        loaded_before |= entry.in_use;
    unsigned database, key_id, version;
    unsigned long long seals;
    int rotated;
    int next = 0;
    // A file without the header is 0.2.0's: complete or not, nobody knows.
    char header[64] = "";
    int clean = 0;
    if (fgets(header, sizeof(header), in) == nullptr ||
        strncmp(header, kUsageHeader, strlen(kUsageHeader)) != 0 ||
        sscanf(header + strlen(kUsageHeader), " clean=%d", &clean) != 1) {
        clean = 0;
        rewind(in);
    }
    if (!loaded_before)
        state->usage_file_clean = clean == 1;
    while (!loaded_before && next < kUsageEntries &&
           fscanf(in, "%u %u %u %llu %d", &database, &key_id, &version, &seals, &rotated) == 5) {
        UsageEntry& entry = state->usage[next++];
        entry.in_use = true;
        entry.database = database;
        entry.key_id = key_id;
        entry.key_version = version;
        entry.seals.store(seals);
        pg_atomic_write_u32(&entry.rotated, rotated != 0 ? 1 : 0);
        pg_atomic_write_u32(&entry.rotation_requested, 0);
        entry.rotation_launched_ms = 0;
        entry.synced = false;
        entry.trusted = state->usage_file_clean;
        entry.reserved.store(0);
        pg_atomic_write_u32(&entry.reservation_requested, 0);
    }
    LWLockRelease(state->lock);
    FreeFile(in);
    // From now on a crash must not find the file saying "clean".
    state->usage_dirty.store(true);
    save_usage(state, false);
}

void do_work(SharedState* state)
{
    int admin_jobs[kAdminRequests];
    int admin_count = 0;
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    int jobs = collect_work(state, now_ms(), admin_jobs, &admin_count);
    LWLockRelease(state->lock);
    if (test_fault_in_each_broker("broker_digest"))
        cache::fail_next_digest_for_testing(); // the next digest_of() in this process throws

    for (int i = 0; i < admin_count; ++i) {
        run_admin(state, admin_jobs[i]);
        ConditionVariableBroadcast(&state->changed);
        CHECK_FOR_INTERRUPTS();
    }
    for (int i = 0; i < jobs; ++i) {
        run_unwrap(state, g_jobs[i]);
        explicit_bzero(&g_jobs[i], sizeof(g_jobs[i]));
        ConditionVariableBroadcast(&state->changed);
        CHECK_FOR_INTERRUPTS();
    }
    if (g_broker != 0)
        return; // the housekeeping is broker 0's
    launch_rotations(state);
    launch_reservations(state);
    launch_audit_writers();
    serve_audit_anchors();
    if (now_ms() - g_usage_saved_ms >= kUsageSaveIntervalMs) {
        save_usage(state, false);
        g_usage_saved_ms = now_ms();
    }
}

void save_usage_at_exit(int, Datum) { save_usage(shared_state(), true); }

// The backoff between a key manager's retries (src/core/http_client.cpp):
// a latch wait, so that a shutdown or the postmaster's death ends it at once
// (WL_EXIT_ON_PM_DEATH exits from here, inside run_core's C++ frames: the
// process is gone, with its memory, and the exit callbacks touch no C++
// object). A wakeup meant for the main loop is not lost: the latch is set
// again before returning. Runs inside run_core, so it must not raise:
// WaitLatch raises only when epoll itself fails.
void sleep_on_latch(std::chrono::milliseconds delay)
{
    bool woken = false;
    TimestampTz end = GetCurrentTimestamp() + static_cast<TimestampTz>(delay.count()) * 1000;
    for (;;) {
        long left_ms = static_cast<long>((end - GetCurrentTimestamp()) / 1000);
        if (left_ms <= 0 || ProcDiePending)
            break;
        int rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, left_ms, PG_WAIT_EXTENSION);
        if (rc & WL_LATCH_SET) {
            ResetLatch(MyLatch);
            woken = true;
        }
    }
    if (woken)
        SetLatch(MyLatch);
}

// The broker's error handler, as the checkpointer's: what an ERROR left
// behind is released and the loop goes on. Returns after a second's pause, so
// that a persistent error does not spin.
void recover_from_error(SharedState* state, MemoryContext loop_context)
{
    error_context_stack = nullptr;
    HOLD_INTERRUPTS();
    EmitErrorReport();
    LWLockReleaseAll();
    ConditionVariableCancelSleep();
    pgstat_report_wait_end();
    AtEOXact_Files(false);
    explicit_bzero(g_unwrapped, sizeof(g_unwrapped));
    explicit_bzero(g_jobs, sizeof(g_jobs));
    LWLockAcquire(state->lock, LW_EXCLUSIVE);
    requeue_in_flight(state);
    LWLockRelease(state->lock);
    ConditionVariableBroadcast(&state->changed);
    MemoryContextSwitchTo(loop_context);
    FlushErrorState();
    MemoryContextReset(loop_context);
    RESUME_INTERRUPTS();
    (void)WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1000, PG_WAIT_EXTENSION);
}

} // namespace

void register_key_brokers()
{
    // A remote provider gets its own broker when it is configured; if it is
    // configured only later (by a reload), broker 0 serves it until the next
    // restart. Each broker takes a slot of max_worker_processes.
    auto set = [](const char* value) { return value && value[0] != '\0'; };
    bool configured[kBrokers] = {true, set(vault_addr), set(aws_region) || set(aws_kms_endpoint), set(kmip_host),
                                 set(pkcs11_module)};
    for (int i = 0; i < kBrokers; ++i) {
        if (!configured[i])
            continue;
        set_broker_registered(i);
        BackgroundWorker worker;
        std::memset(&worker, 0, sizeof(worker));
        worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
        // Needs no database, so it also serves standbys during recovery.
        worker.bgw_start_time = BgWorkerStart_PostmasterStart;
        worker.bgw_restart_time = 1;
        worker.bgw_main_arg = Int32GetDatum(i);
        strlcpy(worker.bgw_library_name, "pgphi", sizeof(worker.bgw_library_name));
        strlcpy(worker.bgw_function_name, "pgphi_broker_main", sizeof(worker.bgw_function_name));
        if (i == 0)
            strlcpy(worker.bgw_name, "pgphi key broker", sizeof(worker.bgw_name));
        else
            snprintf(worker.bgw_name, sizeof(worker.bgw_name), "pgphi key broker for %s",
                     kBrokerProviders[i]);
        strlcpy(worker.bgw_type, worker.bgw_name, sizeof(worker.bgw_type)); // pg_stat_activity.backend_type
        RegisterBackgroundWorker(&worker);
    }
}

} // namespace pgphi::pg

extern "C" PGDLLEXPORT void pgphi_broker_main(Datum);

void pgphi_broker_main(Datum argument)
{
    using namespace pgphi::pg;
    pqsignal(SIGHUP, SignalHandlerForConfigReload);
    pqsignal(SIGTERM, die);
    BackgroundWorkerUnblockSignals();

    g_broker = DatumGetInt32(argument);
    if (g_broker < 0 || g_broker >= kBrokers)
        elog(FATAL, "pgphi key broker: invalid broker number %d", g_broker);
    SharedState* state = shared_state();
    announce_broker(state);
    if (g_broker == 0) {
        load_usage(state);
        before_shmem_exit(save_usage_at_exit, 0);
    }
    pgphi::set_transfer_abort_check([] { return ProcDiePending != 0; });
    pgphi::set_retry_sleep(sleep_on_latch);
    if (g_broker == 0)
        ereport(LOG, (errmsg("pgphi key broker started")));
    else
        ereport(LOG, (errmsg("pgphi key broker for provider %s started", kBrokerProviders[g_broker])));

    // Everything the loop allocates goes here, and is reset after an ERROR.
    // No C++ object with a destructor lives in this frame or its callees
    // across a call that can raise, so the longjmp skips no destructor.
    static MemoryContext loop_context =
        AllocSetContextCreate(TopMemoryContext, "pgphi key broker", ALLOCSET_DEFAULT_SIZES);
    MemoryContextSwitchTo(loop_context);
    sigjmp_buf local_sigjmp_buf;
    if (sigsetjmp(local_sigjmp_buf, 1) != 0)
        recover_from_error(state, loop_context);
    PG_exception_stack = &local_sigjmp_buf;

    for (;;) {
        // Keys in use are refreshed in the last quarter of their TTL: wake at
        // least twice within it, or a short TTL (under 4 s) lets them expire
        // unrefreshed, and an outage then fails sessions inside the grace period.
        long wake_ms = std::min<long>(1000, std::max<long>(50, cache_ttl_s * 1000L / 8));
        (void)WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, wake_ms, PG_WAIT_EXTENSION);
        ResetLatch(MyLatch);
        CHECK_FOR_INTERRUPTS();
        if (ConfigReloadPending) {
            ConfigReloadPending = false;
            ProcessConfigFile(PGC_SIGHUP);
            if (!test_fault_setting || test_fault_setting[0] == '\0') {
                state->test_fault_fired[0] = '\0';
                g_fault_armed_here = false;
            }
            LWLockAcquire(state->lock, LW_EXCLUSIVE);
            state->brokers[g_broker].reloads++;
            LWLockRelease(state->lock);
        }
        do_work(state);
    }
}
