// Plaintext is never derived for storage without a client asking for it.
//
// PostgreSQL stores what some expressions compute: statistics (ANALYZE, also
// run by autovacuum, including extended statistics on expressions), index
// expressions and predicates (CREATE INDEX, REINDEX, CLUSTER, and every row
// inserted into the index), generated columns, and materialized views. A
// decrypt inside any of them would write plaintext to disk, where it
// outlives the key and can be read back without pgphi (an index-only scan,
// pg_statistic_ext_data). So pgphi refuses to decrypt
//
//  * inside a security-restricted operation, which is how PostgreSQL runs
//    ANALYZE, VACUUM, CREATE INDEX, REINDEX, CLUSTER and the creation and
//    refresh of materialized views;
//  * in a process without a client: autovacuum and other background workers
//    (a parallel worker counts as its leader's client);
//  * inside a function declared IMMUTABLE (other than pgphi's own), which is
//    what index expressions, extended statistics and generated columns must
//    be made of. A function that decrypts depends on keys and grants, so it
//    is STABLE at most; one declared IMMUTABLE is a lie that would let
//    PostgreSQL store its result.
#pragma once

#include "shared/postgres.hpp"

#include "core/data_key.hpp"

namespace pgphi::pg {

// Raises 42501, and queues an audit event, when plaintext would be derived
// for storage (see above). Costs two flag tests on the hot path.
void check_plaintext_derivation(const DataKey& key);

// From _PG_init: the function-manager hooks that track IMMUTABLE functions.
void register_derived_data_guard();

} // namespace pgphi::pg
