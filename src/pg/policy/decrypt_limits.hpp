// Exfiltration limits and break-glass counts on the decrypt path: each value
// decrypted by a role is charged against every decrypt limit on that role (or
// on a role whose privileges it, or the session's login role, has) and
// against the role's break-glass event in force on the key. Values are taken
// from shared budgets in batches (shared/alerts.hpp) and counted locally in
// between; the batches' unused values go back when the transaction ends.
#pragma once

#include "shared/postgres.hpp"

#include "core/data_key.hpp"

namespace pgphi::pg {

// Charges one decrypt under `key`. Raises 53400 (and alerts, once per
// window) when a limit is reached and pgphi.decrypt_limit_action is refuse.
void charge_decrypt(const DataKey& key);

// From _PG_init: the invalidation callbacks and the transaction callbacks.
void register_decrypt_limits();

} // namespace pgphi::pg
