-- The encrypted type, and encryption and decryption.
--
-- pgphi.encrypted is bytea underneath and accepts only pgphi ciphertexts.
-- Equality, ordering and hashing (for deterministic values) are in
-- 60_searchable_columns.sql; re-encryption in 50_rotation_and_batches.sql.

CREATE TYPE pgphi.encrypted;

CREATE FUNCTION pgphi.encrypted_in(cstring) RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.encrypted_out(pgphi.encrypted) RETURNS cstring
    AS 'byteaout' LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.encrypted_recv(internal) RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.encrypted_send(pgphi.encrypted) RETURNS bytea
    AS 'byteasend' LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE;

-- ANALYZE keeps working on randomized columns: their samples are not sorted.
CREATE FUNCTION pgphi.encrypted_analyze(internal) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_typanalyze' LANGUAGE C STRICT;

CREATE TYPE pgphi.encrypted (
    INPUT = pgphi.encrypted_in,
    OUTPUT = pgphi.encrypted_out,
    RECEIVE = pgphi.encrypted_recv,
    SEND = pgphi.encrypted_send,
    ANALYZE = pgphi.encrypted_analyze,
    LIKE = bytea
);

COMMENT ON TYPE pgphi.encrypted IS
    'a pgphi ciphertext (AES-256-GCM randomized, or AES-256-SIV deterministic); rejects anything else';

-- Both casts are binary-coercible but only in assignment: encrypted values
-- fill bytea columns and back, yet randomized ciphertexts borrow no equality
-- or ordering from bytea.
CREATE FUNCTION pgphi.encrypted(bytea) RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_from_bytea' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE CAST (bytea AS pgphi.encrypted) WITH FUNCTION pgphi.encrypted(bytea) AS ASSIGNMENT;

CREATE CAST (pgphi.encrypted AS bytea) WITHOUT FUNCTION AS ASSIGNMENT;

------------------------------------------------------------------------------
-- Encryption and decryption.
------------------------------------------------------------------------------
-- Randomized encryption (AES-256-GCM). The deterministic forms, which take a
-- `deterministic` argument, are in 60_searchable_columns.sql.
CREATE FUNCTION pgphi.encrypt_phi(value text, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypt_phi(value bytea, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypt_phi(value jsonb, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

-- Each decrypt function takes the encrypted type or a plain bytea column, with
-- or without the key name to check and the context to authenticate.
CREATE FUNCTION pgphi.decrypt_phi(value pgphi.encrypted) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_text' LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.decrypt_phi(value pgphi.encrypted, key_name text, context text DEFAULT '') RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_text' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi(value bytea) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_text' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi(value bytea, key_name text, context text DEFAULT '') RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_text' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_bytea(value pgphi.encrypted) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_bytea' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_bytea(value pgphi.encrypted, key_name text, context text DEFAULT '') RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_bytea' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_bytea(value bytea) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_bytea' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_bytea(value bytea, key_name text, context text DEFAULT '') RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_bytea' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_jsonb(value pgphi.encrypted) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_jsonb' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_jsonb(value pgphi.encrypted, key_name text, context text DEFAULT '') RETURNS jsonb
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_jsonb' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_jsonb(value bytea) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_jsonb' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.decrypt_phi_jsonb(value bytea, key_name text, context text DEFAULT '') RETURNS jsonb
    AS 'MODULE_PATHNAME', 'pgphi_decrypt_jsonb' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Header of a value, without decrypting it (which key and version, how long).
CREATE FUNCTION pgphi.ciphertext_info(value bytea,
        OUT format_version integer, OUT algorithm text, OUT key_id integer,
        OUT key_version integer, OUT plaintext_bytes integer)
    AS 'MODULE_PATHNAME', 'pgphi_ciphertext_info' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.ciphertext_info(value pgphi.encrypted,
        OUT format_version integer, OUT algorithm text, OUT key_id integer,
        OUT key_version integer, OUT plaintext_bytes integer)
    AS 'MODULE_PATHNAME', 'pgphi_ciphertext_info' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Encrypting goes with pgphi_encrypt, decrypting with pgphi_decrypt (each
-- value also passes the key's grants); the type's support functions and
-- ciphertext_info stay PUBLIC (90_privileges.sql).
GRANT EXECUTE ON FUNCTION pgphi.encrypt_phi(text, text, text), pgphi.encrypt_phi(bytea, text, text),
    pgphi.encrypt_phi(jsonb, text, text) TO pgphi_encrypt;

GRANT EXECUTE ON FUNCTION
    pgphi.decrypt_phi(pgphi.encrypted), pgphi.decrypt_phi(pgphi.encrypted, text, text),
    pgphi.decrypt_phi(bytea), pgphi.decrypt_phi(bytea, text, text),
    pgphi.decrypt_phi_bytea(pgphi.encrypted), pgphi.decrypt_phi_bytea(pgphi.encrypted, text, text),
    pgphi.decrypt_phi_bytea(bytea), pgphi.decrypt_phi_bytea(bytea, text, text),
    pgphi.decrypt_phi_jsonb(pgphi.encrypted), pgphi.decrypt_phi_jsonb(pgphi.encrypted, text, text),
    pgphi.decrypt_phi_jsonb(bytea), pgphi.decrypt_phi_jsonb(bytea, text, text)
    TO pgphi_decrypt;
