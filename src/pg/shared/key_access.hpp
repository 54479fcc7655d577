// How a backend gets a ready DataKey: from its local KeyRing, or on a miss
// from the key catalog (pgphi.keys, pgphi.key_versions) and the key provider.
// These functions raise PostgreSQL errors; the pointers they return stay valid
// until the next call into this module.
#pragma once

#include "shared/postgres.hpp"

extern "C" {
#include "access/htup.h"
#include "access/tupdesc.h"
#include "executor/spi.h"
}

#include "core/ciphertext_format.hpp"
#include "core/data_key.hpp"

namespace pgphi::pg {

// The active version of the key named `key_name`, for encrypting.
DataKey* key_for_encrypt(const text* key_name);

// The key version a value's header refers to, for decrypting. A version
// marked compromised is refused unless `for_reencrypt` (reencrypt_value,
// which seals the plaintext again at once under the active version).
DataKey* key_for_decrypt(format::KeyRef ref, bool for_reencrypt = false);

// A given version of the key named `key_name`, for computing the values an
// older version gave (lookups during rotation). Only active and decrypt-only
// versions are returned.
DataKey* key_for_version(const text* key_name, uint32 version);

// Raises 42809 when `key` is not meant for `purpose` (a blind-index key
// asked to encrypt, or the reverse).
void require_purpose(const DataKey& key, KeyPurpose purpose);

// Counts how often this process's key cache was cleared or a key in it
// replaced. Pointers from the functions above survive only while it stays
// the same; a caller that needs two keys at once checks it (see reencrypt).
uint64_t key_cache_clears();

// For a caller that keeps a key from key_for_decrypt across values (a
// decrypt call site's memo): takes in pending changes, as every lookup does,
// and says whether a lookup would still give that key, i.e. the cache has not
// changed since key_cache_clears() gave `changes` and the statement is still
// the one that started at `statement` (a key's time in this process is
// checked against the statement's start). If so the use is reported as a
// lookup's would be.
bool key_still_current(DataKey* key, uint64_t changes, TimestampTz statement);

// Runs a read-only query on pgphi's catalog as the catalog's owner (so
// callers need no privilege on it), preparing it into *plan once. Calls
// on_row for up to max_rows rows, in the caller's memory context, and returns
// how many there were. *from_latest_snapshot (if given) says whether the
// latest snapshot was used (not in parallel mode): only then may the result
// be cached beyond the current statement.
using CatalogRowFn = void (*)(HeapTuple row, TupleDesc desc, void* arg);
uint64 query_catalog(SPIPlanPtr* plan, const char* query, int nargs, Oid* argtypes, Datum* args, long max_rows,
                     CatalogRowFn on_row, void* arg, bool* from_latest_snapshot);

// The process's nonce source, shared by every encrypting call.
NonceSource& nonce_source();

// Hooks catalog changes (committed by any backend) to the local KeyRing.
void register_key_invalidation();

} // namespace pgphi::pg
