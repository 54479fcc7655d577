// How a backend gets a ready DataKey: from its local KeyRing, or on a miss
// from the key catalog (pgphi.keys, pgphi.key_versions) and the key provider.
// These functions raise PostgreSQL errors; the pointers they return stay valid
// until the next call into this module.
#pragma once

#include "postgres.hpp"

#include "../core/ciphertext_format.hpp"
#include "../core/data_key.hpp"

namespace pgphi::pg {

// The active version of the key named `key_name`, for encrypting.
DataKey* key_for_encrypt(const text* key_name);

// The key version a value's header refers to, for decrypting.
DataKey* key_for_decrypt(format::KeyRef ref);

// A given version of the key named `key_name`, for computing the values an
// older version gave (lookups during rotation). Only active and decrypt-only
// versions are returned.
DataKey* key_for_version(const text* key_name, uint32 version);

// Raises 42809 when `key` is not meant for `purpose` (a blind-index key
// asked to encrypt, or the reverse).
void require_purpose(const DataKey& key, KeyPurpose purpose);

// Counts how often this process's key cache was cleared. Pointers from the
// functions above survive only while it stays the same; a caller that needs
// two keys at once checks it (see reencrypt).
uint64_t key_cache_clears();

// The process's nonce source, shared by every encrypting call.
NonceSource& nonce_source();

// Hooks catalog changes (committed by any backend) to the local KeyRing.
void register_key_invalidation();

} // namespace pgphi::pg
