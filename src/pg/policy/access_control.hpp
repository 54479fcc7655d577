// Who may use which key: per-key grants (pgphi.key_grants), checked on every
// encrypt and decrypt from a per-backend cache, and the rule on which client
// connections may receive plaintext (pgphi.plaintext_transport).
#pragma once

#include "shared/postgres.hpp"

#include "core/data_key.hpp"
#include "shared/audit.hpp" // KeyUse

namespace pgphi::pg {

// Raises 42501, and queues an audit event, unless the current role holds
// `use` on the key: a grant to it or to a role whose privileges it has
// (superusers always do). Answers come from a cache that grants, revocations
// and role membership changes invalidate, so the catalog is read once per
// role, key and use, not per row.
//
// Returns what the answer stands on, for a caller that keeps it across
// values (a decrypt call site's memo) and revalidates it per value with
// key_use_still_allowed.
struct KeyUseAnswer {
    Oid role;
    uint64_t generation;    // of the grant answers: bumped by every invalidation that can change one
    TimestampTz expires_at; // DT_NOEND, or when the time-limited grant that allows it expires
    TimestampTz only_for_statement; // in parallel mode: good for this statement only; 0 if not
};
KeyUseAnswer check_key_use(const DataKey& key, KeyUse use);

// Whether check_key_use would allow the use again without reading anything:
// the same current role, no invalidation since, and (a time-limited grant)
// still before its expiry, by the same clock check check_key_use makes.
// When false, call check_key_use (which refuses, or gives a new answer).
bool key_use_still_allowed(const KeyUseAnswer& answer);

// Raises 28000, and queues an audit event, when pgphi.plaintext_transport
// forbids returning plaintext over this session's client connection.
void check_plaintext_transport(const DataKey& key);

// The setting's value ("tls" or "tls_or_local") when it refuses plaintext to
// this session's client, else nullptr.
const char* plaintext_transport_refusing();

// From _PG_init: the settings, the invalidation callbacks, and the hook that
// records how the client connected.
void register_access_control();

} // namespace pgphi::pg
