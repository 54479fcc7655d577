// pgphi's shared memory: the DEK cache table (src/core/dek_cache.hpp), the
// admin requests that create keys through the broker, the broker's latch,
// statistics, and the invalidation generation every backend checks before
// using its own key cache. Reserved at server start (hence the preload).
#pragma once

#include "shared/postgres.hpp"

extern "C" {
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "port/atomics.h"
#include "storage/lwlock.h"
}

#include <atomic>

#include "core/data_key.hpp"
#include "core/dek_cache.hpp"

namespace pgphi::pg {

// A request that is not an unwrap: generate a new DEK (create_key,
// rotate_key), rewrap one under the KEK's newest version (rewrap_keys), or
// create a KEK in the key manager (create_kek: key.kek_ref is its name, and
// kek_version returns the new KEK's own reference).
struct AdminRequest {
    enum class State : uint8_t { Free, Pending, InFlight, Done };
    // CreateDedicatedKek, DeleteDedicatedKek: a KEK of one pgphi key alone
    // (create_key(..., dedicated_kek => true), and its last version destroyed).
    enum class Operation : uint8_t { Generate, Rewrap, CreateKek, Rekey, CreateDedicatedKek, DeleteDedicatedKek };
    State state;
    Operation operation;
    uint64_t ticket;              // identifies the requester's use of the slot
    int64_t done_at_ms;
    cache::UnwrapRequest key;     // provider, KEK, key identity; the wrapped DEK to rewrap
    bool may_create_local_kek;
    // Rekey (pgphi.rekey): the destination, and the plaintext DEK on its way
    // from the source provider's broker to the destination's (`handed_over`:
    // the destination's broker takes the request from there). Zeroed as soon
    // as the destination has wrapped it; never read by a backend.
    char to_provider[cache::kMaxProvider];
    char to_kek_ref[cache::kMaxKekRef];
    bool handed_over;
    uint8_t dek_in_transit[cache::kDekSize];
    // Results
    bool ok;
    bool created_local_kek_file;
    cache::FailureRecord failure;
    uint16_t wrapped_size;
    uint8_t wrapped[cache::kMaxWrapped];
    char kek_version[cache::kMaxKekRef];
};

inline constexpr int kAdminRequests = 8;

// How many values each DEK version has sealed, cluster-wide: random 96-bit
// nonces make a DEK safe for a bounded number of values. Backends add their
// counts without a lock; the broker persists them and has keys rotated.
// The two flags are written by backends and rotation workers without the
// lock, hence atomics (0 or 1).
struct UsageEntry {
    bool in_use;
    pg_atomic_uint32 rotation_requested; // the threshold was crossed
    pg_atomic_uint32 rotated;            // a rotation worker rotated the key
    int64_t rotation_launched_ms; // 0: no rotation worker started yet
    Oid database;
    uint32_t key_id;
    uint32_t key_version;
    std::atomic<uint64_t> seals;
    // The WAL-logged reservation (pgphi.seal_reservations): the version seals
    // only while its count, plus what sessions may hold unreported, stays
    // under `reserved`. Read from the catalog at first use (`synced`);
    // `trusted` says the count is complete (kept in this server's life or
    // loaded from a clean shutdown of a primary); an untrusted count starts
    // at the reservation instead.
    std::atomic<bool> synced;
    std::atomic<bool> trusted;
    std::atomic<uint64_t> reserved;
    pg_atomic_uint32 reservation_requested; // a reservation worker is wanted
};

inline constexpr int kUsageEntries = 1024;

// The key brokers: one process per remote key manager, so that one that
// hangs delays only its own keys (src/pg/workers/key_broker.cpp explains the choice).
// Broker 0, "the" broker of pgphi.broker_status(), serves the local provider
// (and any other name, to report it unknown) and does the housekeeping: seal
// counts, rotation workers, audit writers.
inline constexpr int kBrokers = 5;
inline constexpr const char* kBrokerProviders[kBrokers] = {nullptr, "vault", "aws_kms", "kmip", "pkcs11"};

// Whether broker `index` serves keys of `provider`. A remote provider's
// broker is registered only when that provider is configured at server start
// (pgphi.vault_addr, pgphi.aws_region or pgphi.aws_kms_endpoint, pgphi.kmip_host); otherwise
// broker 0 serves its keys (one configured later, by a reload).
bool broker_serves(int index, const char* provider);
bool broker_registered(int index);
void set_broker_registered(int index); // from _PG_init, in the postmaster

struct BrokerProcess {                  // all under lock
    Latch* latch;                       // set while the broker runs
    int pid;
    int64_t started_ms;
    uint32_t starts;
    uint32_t reloads;                   // configuration reloads it has applied
};

struct SharedState {
    LWLock* lock;                       // guards the table, admin requests and brokers
    ConditionVariable changed;          // broadcast by the brokers after each batch
    BrokerProcess brokers[kBrokers];
    std::atomic<uint64_t> invalidation_generation; // bumped when keys must be dropped everywhere
    std::atomic<uint64_t> next_ticket;
    cache::Stats stats;
    uint32_t capacity;
    AdminRequest admin[kAdminRequests];
    UsageEntry usage[kUsageEntries];
    std::atomic<bool> usage_dirty;      // counts changed since the broker last saved them
    bool usage_file_clean;              // the counts loaded were saved at a primary's clean shutdown
    uint64_t incarnation;               // random, per shared memory (so per server life)
    char test_fault_fired[32];          // the pgphi.test_fault that fired (broker only; test-only)
    alignas(cache::Slot) unsigned char table_memory[FLEXIBLE_ARRAY_MEMBER]; // slots, then hash index

    cache::Table table() { return cache::Table(table_memory, capacity); }
};

SharedState* shared_state();
void request_shared_memory();      // from _PG_init
int64_t now_ms();                  // PostgreSQL's clock, in ms since 2000
// The kernel's coarse clock as a PostgreSQL timestamp: the time at the last
// tick (a vDSO read without a timer read, so cheaper than
// GetCurrentTimestamp() per value), behind the real clock by at most a tick.
TimestampTz coarse_timestamp();

// Wakes the brokers that run. Takes the lock: the caller must not hold it.
void wake_broker();


// The DEK for a wrapped DEK, from the shared cache or, on a miss, from the
// broker (one key-manager call however many backends ask at once). Waits up
// to pgphi.key_wait_timeout, honouring cancel. Raises the key manager's error.
// `valid_until_ms` says how long the backend may keep using its own copy.
void get_dek(const cache::UnwrapRequest& request, uint8_t* dek, int64_t* valid_until_ms, uint32_t* slot_index);

// Marks a cached key as in use (no lock): the broker refreshes keys in use
// and lets idle ones expire.
void report_key_use(uint32_t slot_index, int64_t now_ms);

// Sessions count seals locally and add them to the shared count every this
// many; a session may thus hold up to this many unreported.
inline constexpr uint64_t kSealReportBatch = 256;

// The seals a reservation adds: a quarter of the rotation threshold, and at
// least twice what all sessions together may hold unreported.
uint64_t seal_reservation_block();

// Whether this database is a node of a Citus cluster that pgphi serves
// (pgphi.citus_setup() has run: docs/citus.md). Looked up once per transaction.
bool in_citus_cluster();
uint64_t unreported_seal_headroom();

// Records the first reservation of a new key version, in the transaction
// that creates it (pgphi._generate_wrapped_dek).
void reserve_first_seals(uint32 key_id, uint32 version);
// Writes a version's reservation through pgphi._reserve_seals (SPI, in a
// transaction); returns what is reserved, 0 when there was nothing to raise.
uint64_t write_reservation(uint32 key_id, uint32 version, uint64_t at_least, bool first);

// Adds a key's unreported seals to the shared usage count, asking for a
// rotation once pgphi.dek_rotation_threshold is passed.
void report_seals(DataKey& key, Oid database);

// Raises an error when the key's version has sealed as many values as random
// nonces allow (a backstop: rotation normally happens long before), and when
// its seals cannot be counted at all (the table of counts is full): an
// uncounted version would escape the limit and automatic rotation.
void check_seal_budget(DataKey& key, Oid database);

// The audit action of a failed admin request ("generate", "rewrap", ...).
const char* admin_action(AdminRequest::Operation operation);

// Asks the broker to generate and wrap a new DEK, to rewrap key.wrapped, or
// to create or delete a KEK (its reference or outcome in result->kek_version);
// raises on failure.
void run_admin_request(AdminRequest::Operation operation, const cache::UnwrapRequest& key,
                       bool may_create_local_kek, AdminRequest* result);

// Rekey: the broker of `source`'s provider unwraps its DEK, the broker of
// `to_provider` wraps it under `to_kek_ref`; `result` holds the new wrapped
// DEK and KEK version, never the DEK. Raises as run_admin_request does.
void run_rekey_request(const cache::UnwrapRequest& source, const char* to_provider, const char* to_kek_ref,
                       AdminRequest* result);

} // namespace pgphi::pg
