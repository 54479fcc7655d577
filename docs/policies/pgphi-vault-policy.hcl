# pgphi's Vault policy: the Transit key "pgphi-kek" on the mount "transit".
# New DEKs (create_key, rotate_key), rewrap_keys and rekey into this key: encrypt,
# with associated data that binds each DEK to its pgphi key. Unwrapping: decrypt.
# KEK version shown in key_versions: read the key.
path "transit/encrypt/pgphi-kek"         { capabilities = ["update"] }
path "transit/decrypt/pgphi-kek"         { capabilities = ["update"] }
path "transit/keys/pgphi-kek"            { capabilities = ["read"] }
# Audit anchors (pgphi.audit_anchor_provider = 'vault'), when the anchor key is this key.
path "transit/hmac/pgphi-kek/sha2-256"   { capabilities = ["update"] }
path "transit/verify/pgphi-kek/sha2-256" { capabilities = ["update"] }
# Dedicated KEKs (create_key(..., dedicated_kek => true)), which pgphi names
# pgphi-dedicated-<key>-<random>: create and read the Transit key, allow and
# perform its deletion (config, delete) when the pgphi key is destroyed, and
# use it. Drop these when no key has a KEK of its own.
path "transit/keys/pgphi-dedicated-*"    { capabilities = ["create", "read", "update", "delete"] }
path "transit/encrypt/pgphi-dedicated-*" { capabilities = ["update"] }
path "transit/decrypt/pgphi-dedicated-*" { capabilities = ["update"] }
