// pgphi.plaintext_transport on a Citus cluster.
//
// pgphi checks the client's transport where a value is decrypted. On Citus
// that is usually a worker, whose client is the coordinator's internal
// connection, always TLS: a client that reached the coordinator without TLS
// would pass. The worker cannot learn how the original client connected, so
// the node the client is connected to refuses, when it plans a statement,
// what could make another node return plaintext to it:
//   - a call of pgphi's decrypting functions (views that decrypt included:
//     the planner sees them expanded);
//   - a call of Citus's functions that run SQL text on other nodes
//     (run_command_on_workers and the like);
//   - a call of a user-defined function that Citus may run on a worker: in
//     a statement on a Citus table (its expressions are pushed down), or a
//     distributed function whose calls Citus delegates.
// Only in a cluster (pgphi.citus_setup() has run), only for a client that
// pgphi.plaintext_transport does not allow: 28000, audited. A change of the
// setting makes the backend plan its cached statements again
// (access_control.cpp), so none keeps a plan checked against an older value.
#pragma once

#include "shared/postgres.hpp"

namespace pgphi::pg {

// From _PG_init: the planner hook.
void register_citus_transport_guard();

} // namespace pgphi::pg
