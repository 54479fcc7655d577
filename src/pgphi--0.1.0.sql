-- pgphi 0.1.0: encrypted type, encrypt_phi / decrypt_phi, key catalog.
\echo Use "CREATE EXTENSION pgphi" to load this file. \quit

-- A schema "pgphi" that existed before CREATE EXTENSION is adopted by it; it
-- must then belong to a superuser, or its owner could tamper with the key
-- catalog's surroundings.
DO $schema$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n
              JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
             WHERE n.nspname OPERATOR(pg_catalog.=) 'pgphi') THEN
        RAISE EXCEPTION 'schema pgphi exists and is not owned by a superuser'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Drop the schema, or have a superuser own it, before CREATE EXTENSION pgphi.';
    END IF;
END
$schema$;

-- Roles that hold the coarse privileges. They are cluster-wide and outlive the
-- extension (another database may have created them), so they are created
-- only when missing, and an existing one is refused if it can log in.
DO $roles$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['pgphi_encrypt', 'pgphi_decrypt'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) role_name) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', role_name);
        ELSIF (SELECT rolcanlogin OR rolsuper FROM pg_catalog.pg_roles
                WHERE rolname OPERATOR(pg_catalog.=) role_name) THEN
            RAISE EXCEPTION 'role % exists and can log in', role_name
                USING ERRCODE = 'duplicate_object',
                      HINT = 'pgphi grants privileges to this role; it must be a NOLOGIN group role.';
        END IF;
    END LOOP;
END
$roles$;

GRANT USAGE ON SCHEMA pgphi TO PUBLIC;

------------------------------------------------------------------------------
-- Key catalog. Only wrapped DEKs are stored; the tables are extension
-- configuration, so pg_dump dumps their rows and key ids survive a restore.
------------------------------------------------------------------------------

CREATE SEQUENCE pgphi.keys_key_id_seq AS integer;

CREATE TABLE pgphi.keys (
    key_id      integer PRIMARY KEY DEFAULT pg_catalog.nextval('pgphi.keys_key_id_seq'),
    name        text NOT NULL UNIQUE
                CHECK (name OPERATOR(pg_catalog.~) '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$'),
    provider    text NOT NULL,
    kek_ref     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  name NOT NULL DEFAULT CURRENT_USER
);
ALTER SEQUENCE pgphi.keys_key_id_seq OWNED BY pgphi.keys.key_id;

CREATE TABLE pgphi.key_versions (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    version     integer NOT NULL CHECK (version > 0),
    state       text NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'decrypt_only', 'retired', 'destroyed')),
    wrapped_dek bytea,
    kek_version text,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version),
    -- A destroyed version has no DEK left; every other state has one.
    CHECK ((state = 'destroyed') = (wrapped_dek IS NULL))
);
-- encrypt_phi writes under the one active version of a key.
CREATE UNIQUE INDEX key_versions_one_active ON pgphi.key_versions (key_id) WHERE state = 'active';

SELECT pg_catalog.pg_extension_config_dump('pgphi.keys', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_versions', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.keys_key_id_seq', '');

-- Any committed change to the catalog clears every backend's cached keys.
CREATE FUNCTION pgphi._key_catalog_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'pgphi_key_catalog_changed' LANGUAGE C;
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.keys
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
CREATE TRIGGER key_versions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.key_versions
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
-- Also under session_replication_role = replica (logical replication apply,
-- some restore tools): a missed invalidation would keep a destroyed key alive.
ALTER TABLE pgphi.keys ENABLE ALWAYS TRIGGER keys_changed;
ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_changed;

------------------------------------------------------------------------------
-- The encrypted type: bytea underneath, accepting only pgphi ciphertexts.
------------------------------------------------------------------------------

CREATE TYPE pgphi.encrypted;

CREATE FUNCTION pgphi.encrypted_in(cstring) RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_out(pgphi.encrypted) RETURNS cstring
    AS 'byteaout' LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_recv(internal) RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_send(pgphi.encrypted) RETURNS bytea
    AS 'byteasend' LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE;

CREATE TYPE pgphi.encrypted (
    INPUT = pgphi.encrypted_in,
    OUTPUT = pgphi.encrypted_out,
    RECEIVE = pgphi.encrypted_recv,
    SEND = pgphi.encrypted_send,
    LIKE = bytea
);
COMMENT ON TYPE pgphi.encrypted IS 'a pgphi ciphertext (AES-256-GCM); rejects anything else';

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

------------------------------------------------------------------------------
-- Key administration.
------------------------------------------------------------------------------

CREATE FUNCTION pgphi._generate_wrapped_dek(provider text, kek text, key_id integer,
        version integer, key_name text, may_create_local_kek boolean,
        OUT wrapped_dek bytea, OUT kek_version text)
    AS 'MODULE_PATHNAME', 'pgphi_generate_wrapped_dek' LANGUAGE C VOLATILE STRICT;

-- Creates a named key: version 1 of its DEK, generated and wrapped by the
-- provider's KEK. Returns the key id that ciphertexts carry.
CREATE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_key_id integer;
    kek_ref text := coalesce(create_key.kek, CASE WHEN create_key.provider = 'local' THEN 'default' END);
    dek record;
BEGIN
    IF create_key.name IS NULL OR create_key.name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid pgphi key name "%"', create_key.name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Key names have 1 to 63 letters, digits, "_", "." or "-", and start with a letter or "_".';
    END IF;
    IF create_key.provider IS NULL THEN
        RAISE EXCEPTION 'a pgphi key needs a provider' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kek_ref IS NULL THEN
        RAISE EXCEPTION 'provider % needs the KEK to use', create_key.provider
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass kek => the Vault Transit key name or the AWS KMS key id, ARN or alias.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.keys k WHERE k.name = create_key.name) THEN
        RAISE EXCEPTION 'pgphi key "%" already exists', create_key.name USING ERRCODE = 'duplicate_object';
    END IF;

    INSERT INTO pgphi.keys (name, provider, kek_ref)
        VALUES (create_key.name, create_key.provider, kek_ref)
        RETURNING key_id INTO new_key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(
        create_key.provider, kek_ref, new_key_id, 1, create_key.name,
        NOT EXISTS (SELECT FROM pgphi.keys k WHERE k.provider = 'local' AND k.key_id <> new_key_id));
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (new_key_id, 1, 'active', dek.wrapped_dek, dek.kek_version);
    RETURN new_key_id;
END
$$;

------------------------------------------------------------------------------
-- The key broker and the shared DEK cache.
------------------------------------------------------------------------------

CREATE FUNCTION pgphi.cache_stats(
        OUT hits bigint, OUT misses bigint, OUT key_manager_calls bigint,
        OUT key_manager_errors bigint, OUT avg_key_manager_ms double precision,
        OUT refreshes bigint, OUT evictions bigint, OUT expirations bigint,
        OUT entries bigint, OUT pending bigint, OUT capacity bigint, OUT bytes_per_entry bigint)
    AS 'MODULE_PATHNAME', 'pgphi_cache_stats' LANGUAGE C VOLATILE PARALLEL SAFE;
CREATE VIEW pgphi.cache_stats AS SELECT * FROM pgphi.cache_stats();

CREATE FUNCTION pgphi.broker_status(
        OUT running boolean, OUT pid integer, OUT started_at timestamptz,
        OUT restarts integer, OUT pending_requests bigint, OUT in_flight bigint,
        OUT config_reloads bigint)
    AS 'MODULE_PATHNAME', 'pgphi_broker_status' LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE FUNCTION pgphi.flush_cache() RETURNS bigint
    AS 'MODULE_PATHNAME', 'pgphi_flush_cache' LANGUAGE C VOLATILE;

REVOKE ALL ON FUNCTION pgphi.cache_stats(), pgphi.broker_status(), pgphi.flush_cache() FROM PUBLIC;
REVOKE ALL ON pgphi.cache_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.cache_stats(), pgphi.broker_status() TO pg_monitor;
GRANT SELECT ON pgphi.cache_stats TO pg_monitor;

------------------------------------------------------------------------------
-- Privileges: nothing that touches a key is open to PUBLIC.
------------------------------------------------------------------------------

REVOKE ALL ON FUNCTION pgphi._generate_wrapped_dek(text, text, integer, integer, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgphi.create_key(text, text, text) FROM PUBLIC;

REVOKE ALL ON FUNCTION pgphi.encrypt_phi(text, text, text), pgphi.encrypt_phi(bytea, text, text),
    pgphi.encrypt_phi(jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.encrypt_phi(text, text, text), pgphi.encrypt_phi(bytea, text, text),
    pgphi.encrypt_phi(jsonb, text, text) TO pgphi_encrypt;

REVOKE ALL ON FUNCTION
    pgphi.decrypt_phi(pgphi.encrypted), pgphi.decrypt_phi(pgphi.encrypted, text, text),
    pgphi.decrypt_phi(bytea), pgphi.decrypt_phi(bytea, text, text),
    pgphi.decrypt_phi_bytea(pgphi.encrypted), pgphi.decrypt_phi_bytea(pgphi.encrypted, text, text),
    pgphi.decrypt_phi_bytea(bytea), pgphi.decrypt_phi_bytea(bytea, text, text),
    pgphi.decrypt_phi_jsonb(pgphi.encrypted), pgphi.decrypt_phi_jsonb(pgphi.encrypted, text, text),
    pgphi.decrypt_phi_jsonb(bytea), pgphi.decrypt_phi_jsonb(bytea, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgphi.decrypt_phi(pgphi.encrypted), pgphi.decrypt_phi(pgphi.encrypted, text, text),
    pgphi.decrypt_phi(bytea), pgphi.decrypt_phi(bytea, text, text),
    pgphi.decrypt_phi_bytea(pgphi.encrypted), pgphi.decrypt_phi_bytea(pgphi.encrypted, text, text),
    pgphi.decrypt_phi_bytea(bytea), pgphi.decrypt_phi_bytea(bytea, text, text),
    pgphi.decrypt_phi_jsonb(pgphi.encrypted), pgphi.decrypt_phi_jsonb(pgphi.encrypted, text, text),
    pgphi.decrypt_phi_jsonb(bytea), pgphi.decrypt_phi_jsonb(bytea, text, text)
    TO pgphi_decrypt;
