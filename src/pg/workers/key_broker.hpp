// The key brokers: one static background worker per remote key manager that
// is configured at server start, and broker 0 for the local provider and the
// housekeeping (see key_broker.cpp for why one process per provider).
#pragma once

namespace pgphi::pg {

// From _PG_init: registers the brokers. Each takes a slot of
// max_worker_processes.
void register_key_brokers();

} // namespace pgphi::pg
