# pgphi's Vault policy: the Transit key "pgphi-kek" on the mount "transit".
# New DEKs (create_key, rotate_key): datakey/wrapped. Unwrapping: decrypt.
# rewrap_keys: rewrap. KEK version shown in key_versions: read the key.
path "transit/datakey/wrapped/pgphi-kek" { capabilities = ["update"] }
path "transit/decrypt/pgphi-kek"         { capabilities = ["update"] }
path "transit/rewrap/pgphi-kek"          { capabilities = ["update"] }
path "transit/keys/pgphi-kek"            { capabilities = ["read"] }
# pgphi.rekey into this key from another key manager: encrypt (drop it when no such move is planned).
path "transit/encrypt/pgphi-kek"         { capabilities = ["update"] }
# Audit anchors (pgphi.audit_anchor_provider = 'vault'), when the anchor key is this key.
path "transit/hmac/pgphi-kek/sha2-256"   { capabilities = ["update"] }
path "transit/verify/pgphi-kek/sha2-256" { capabilities = ["update"] }
