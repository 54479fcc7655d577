// The audit trail's shared memory, as the pieces that use it see it: the
// sessions that queue events and count key uses (shared/audit.cpp), the audit
// writer that moves them into the database (workers/audit_writer.cpp), the
// broker that MACs audit anchors (workers/audit_anchor_service.cpp) and the
// SQL functions that report on it (functions/audit_functions.cpp). Nothing
// outside those includes this header; the rest of pgphi uses audit.hpp.
#pragma once

#include "shared/postgres.hpp"

extern "C" {
#include "storage/condition_variable.h"
#include "storage/lwlock.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
}

#include <atomic>

#include "shared/audit.hpp"
#include "shared/error_bridge.hpp" // CoreFailure

namespace pgphi::pg::audit_detail {

constexpr int kAuditEvents = 256;     // distinct events (identical ones coalesce)
constexpr int kOverflowEvents = 64;   // when those are full: counts per role and action
constexpr int kEventSlots = kAuditEvents + kOverflowEvents;
constexpr int kVolumeEntries = 2048;


// Identical events (same database, roles, action, outcome, key and detail)
// coalesce into one entry that counts them, with the first and last time.
// An entry a writer has claimed (`claim` is its ticket) takes no more
// occurrences: the next identical event starts a new entry.
struct AuditEvent {
    bool in_use;
    AuditOutcome outcome;
    uint8_t failed_writers;
    uint64_t claim;
    uint64_t id;
    uint64_t occurrences;
    Oid database;
    Oid login_role;
    Oid acting_role;
    TimestampTz first_at;
    TimestampTz last_at;
    uint32_t key_id;
    uint32_t key_version;
    char action[16];
    char key_name[64];
    char detail[128];
};

// Encryptions and decryptions by one role under one key in one time window.
struct VolumeEntry {
    bool in_use;
    uint8_t failed_writers;
    uint64_t claim;
    Oid database;
    Oid role;
    uint32_t key_id;
    TimestampTz window_start;
    std::atomic<uint64_t> counts[2]; // indexed by KeyUse
};

// A MAC over an audit anchor's message, or the check of one, asked of the
// key broker: the only process that holds key-manager credentials (and the
// local provider's KEK).
constexpr int kAnchorRequests = 8;
constexpr size_t kAnchorMessageSize = 512;
constexpr size_t kAnchorMacSize = 256;
struct AnchorRequest {
    enum class State : uint8_t { Free, Pending, InFlight, Done };
    State state;
    bool verify;
    bool certificate;               // a destruction certificate's MAC, not an anchor's
    uint64_t ticket;
    int64_t done_at_ms;
    Oid database;
    int64_t anchor_seq;
    int64_t audit_seq;
    char provider[16];              // in for a check; out for a MAC (the broker's setting)
    char key_ref[256];
    uint16_t message_size;
    char message[kAnchorMessageSize];
    char mac[kAnchorMacSize];       // in for a check, out for a MAC
    // Results
    bool ok;
    bool valid;                     // a check: the MAC is authentic
    bool regressed;                 // a MAC refused: the anchor would go back
    int64_t last_anchor_seq;        // ... behind this one
    CoreFailure failure;
};

// Per database: the last anchor known to be committed (the broker refuses
// to MAC that number or a lower one again: anchors removed and redone; an
// anchor whose transaction rolled back may be made again), and when the
// chain changed and was last anchored (the schedule). The committed state
// is saved by the broker in kAnchorStateFile and survives restarts.
constexpr int kAnchorDatabases = 64;
constexpr const char* kAnchorStateFile = "pgphi_audit_anchors"; // in the data directory
struct AnchorDatabase {
    Oid database;
    bool chain_changed;
    int64_t anchored_ms;            // last scheduled anchoring
    int64_t committed_seq;          // the last committed anchor (0: none known)
    int64_t committed_audit_seq;    // ... and the row it anchored
    int64_t failure_logged_ms;      // a failing scheduled anchor is logged once an hour
};

struct AuditShared {
    LWLock* lock; // allocating and freeing entries; counts are atomics
    uint64_t next_event_id;
    uint64_t next_claim;
    uint32_t queued_events;
    std::atomic<uint64_t> dropped_events;   // not recorded at all (overflow full, or writers failing)
    std::atomic<uint64_t> overflow_events;  // recorded only in an overflow entry
    std::atomic<uint64_t> dropped_counts;
    AuditEvent events[kEventSlots];
    VolumeEntry volume[kVolumeEntries];
    uint64_t next_anchor_ticket;
    ConditionVariable anchor_done;  // broadcast by the broker after each answer
    AnchorRequest anchors[kAnchorRequests];
    AnchorDatabase anchor_databases[kAnchorDatabases];
    std::atomic<bool> anchor_state_dirty; // committed anchors not yet saved to the file
    bool anchor_state_loaded;
};


extern AuditShared* g_audit;

// Settings (defined in shared/audit.cpp).
extern int g_key_use_window_s;
extern int g_anchor_interval_s;
extern int g_anchor_provider;
extern char* g_anchor_key;
extern const struct config_enum_entry kAnchorProviders[];

// The start of the pgphi.key_use_window that `now` falls in.
TimestampTz current_window(TimestampTz now);

// Under the lock (exclusive when `create`): the database's anchor state.
AnchorDatabase* anchor_database(Oid database, bool create);
bool anchor_due(const AnchorDatabase& entry, int64_t now);
const char* anchor_provider_name();
bool known_provider(const char* name);

// The text an anchor's MAC covers. False when it does not fit.
bool build_anchor_message(AnchorRequest& request, int64_t anchor_seq, TimestampTz anchored_at, int64_t audit_seq,
                          const uint8_t* hash, size_t hash_size, const char* prev_mac);

// The text a destruction certificate's MAC covers: a label of its own (so no
// certificate MAC passes for an anchor's, nor the reverse) and the SHA-256,
// in hex, of the certificate's canonical text without its signature.
bool build_certificate_message(AnchorRequest& request, const char* body_sha256_hex);

// Posts the request to the broker and waits for its answer (at most
// pgphi.key_wait_timeout; cancel works). `request` comes back answered.
void ask_broker(AnchorRequest& request);

struct AnchorResult {
    bool exists;         // false: the chain is empty
    int64_t anchor_seq;
    int64_t audit_seq;
    char audit_hash[2 * 64 + 1];
    char mac[kAnchorMacSize];
};

// Anchors the chain's head, unless the last anchor already covers it. Runs
// inside a transaction with SPI connected, as the extension's owner.
void anchor_chain(AnchorResult* result);

// Whether the database's chain is due for a scheduled anchor; if so, it is
// marked as anchored now (a failing anchor is retried an interval later).
bool take_due_anchor(Oid database);

} // namespace pgphi::pg::audit_detail
