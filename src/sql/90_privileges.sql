-- Privileges: PUBLIC gets nothing that touches keys.
--
-- Every routine defined in the files above is taken away from PUBLIC here;
-- each file grants its routines to the pgphi roles that use them. PUBLIC
-- keeps only what reads neither a key nor the key catalog: the type's support
-- functions, and the header reader ciphertext_info.

REVOKE ALL ON ALL ROUTINES IN SCHEMA pgphi FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    pgphi.encrypted_in(cstring), pgphi.encrypted_out(pgphi.encrypted), pgphi.encrypted_recv(internal),
    pgphi.encrypted_send(pgphi.encrypted), pgphi.encrypted(bytea), pgphi.encrypted_analyze(internal),
    pgphi.encrypted_eq(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_ne(pgphi.encrypted, pgphi.encrypted),
    pgphi.encrypted_lt(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_le(pgphi.encrypted, pgphi.encrypted),
    pgphi.encrypted_gt(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_ge(pgphi.encrypted, pgphi.encrypted),
    pgphi.encrypted_cmp(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_hash(pgphi.encrypted),
    pgphi.encrypted_hash_extended(pgphi.encrypted, bigint),
    pgphi.ciphertext_info(bytea), pgphi.ciphertext_info(pgphi.encrypted)
    TO PUBLIC;
