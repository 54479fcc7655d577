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
