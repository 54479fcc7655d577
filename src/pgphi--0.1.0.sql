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
    FOREACH role_name IN ARRAY ARRAY['pgphi_encrypt', 'pgphi_decrypt', 'pgphi_key_custodian'] LOOP
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
    created_by  name NOT NULL DEFAULT CURRENT_USER,
    rotated_at  timestamptz
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
    retired_at  timestamptz,
    destroyed_at timestamptz,
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
-- Key administration functions run as the extension's owner (SECURITY
-- DEFINER), so key custodians need no rights on the catalog tables; each pins
-- its search_path and qualifies every name.
CREATE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
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

CREATE FUNCTION pgphi._rewrap_dek(provider text, kek text, key_id integer, version integer,
        key_name text, wrapped bytea, OUT wrapped_dek bytea, OUT kek_version text)
    AS 'MODULE_PATHNAME', 'pgphi_rewrap_dek' LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION pgphi._key_id(name text) RETURNS integer
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT key_id FROM pgphi.keys WHERE keys.name = _key_id.name $$;

-- Catalog facts the batch procedures (which run as their caller) need,
-- without giving callers read access to the key catalog.
CREATE FUNCTION pgphi._key_name(key_id integer) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT name FROM pgphi.keys WHERE keys.key_id = _key_name.key_id $$;
CREATE FUNCTION pgphi._active_version(key_id integer) RETURNS integer
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT version FROM pgphi.key_versions v WHERE v.key_id = _active_version.key_id AND v.state = 'active' $$;

-- A new DEK version becomes active; the previous one stays for decryption.
-- Sessions encrypt under the new version from their next statement on.
CREATE FUNCTION pgphi.rotate_key(name text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
    new_version integer;
    dek record;
BEGIN
    SELECT * INTO key FROM pgphi.keys k WHERE k.name = rotate_key.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', rotate_key.name USING ERRCODE = 'undefined_object';
    END IF;
    SELECT max(v.version) + 1 INTO new_version FROM pgphi.key_versions v WHERE v.key_id = key.key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(key.provider, key.kek_ref, key.key_id, new_version,
                                                        key.name, false);
    UPDATE pgphi.key_versions v SET state = 'decrypt_only' WHERE v.key_id = key.key_id AND v.state = 'active';
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (key.key_id, new_version, 'active', dek.wrapped_dek, dek.kek_version);
    UPDATE pgphi.keys k SET rotated_at = pg_catalog.now() WHERE k.key_id = key.key_id;
    RETURN new_version;
END
$$;

-- Rewraps every DEK (of one key, or of all keys) under its KEK's newest
-- version, after the KEK was rotated in the key manager. Vault and KMS do it
-- without the DEK leaving them. No table data is touched. Returns the number
-- of DEK versions rewrapped.
CREATE FUNCTION pgphi.rewrap_keys(name text DEFAULT NULL) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    rewrapped record;
    done integer := 0;
BEGIN
    FOR v IN SELECT k.key_id, k.name, k.provider, k.kek_ref, kv.version, kv.wrapped_dek
               FROM pgphi.keys k JOIN pgphi.key_versions kv USING (key_id)
              WHERE kv.wrapped_dek IS NOT NULL AND (rewrap_keys.name IS NULL OR k.name = rewrap_keys.name)
              ORDER BY k.key_id, kv.version
                FOR UPDATE OF kv
    LOOP
        SELECT * INTO rewrapped FROM pgphi._rewrap_dek(v.provider, v.kek_ref, v.key_id, v.version, v.name,
                                                        v.wrapped_dek);
        UPDATE pgphi.key_versions kv SET wrapped_dek = rewrapped.wrapped_dek, kek_version = rewrapped.kek_version
         WHERE kv.key_id = v.key_id AND kv.version = v.version;
        done := done + 1;
    END LOOP;
    IF rewrap_keys.name IS NOT NULL AND done = 0 AND pgphi._key_id(rewrap_keys.name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', rewrap_keys.name USING ERRCODE = 'undefined_object';
    END IF;
    RETURN done;
END
$$;

-- Called by pgphi's rotation worker once a version has encrypted
-- pgphi.dek_rotation_threshold values: rotates the key unless that version is
-- no longer the active one (someone rotated it meanwhile). NULL then.
CREATE FUNCTION pgphi._rotate_if_active(key_id integer, version integer) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_name text;
BEGIN
    -- Both rows locked, so a rotation that committed while this waited is
    -- seen: the version is then no longer active, and nothing is done.
    SELECT k.name INTO key_name FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id)
     WHERE k.key_id = _rotate_if_active.key_id AND v.version = _rotate_if_active.version AND v.state = 'active'
       FOR UPDATE OF k, v;
    IF key_name IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN pgphi.rotate_key(key_name);
END
$$;

CREATE FUNCTION pgphi._usage_counts(OUT key_id integer, OUT version integer, OUT encryptions bigint)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'pgphi_usage_counts' LANGUAGE C VOLATILE;

-- How many values each key version of this database has encrypted, cluster
-- wide, against the threshold at which pgphi rotates the key by itself.
CREATE FUNCTION pgphi.key_usage(OUT key_name text, OUT version integer, OUT state text,
        OUT encryptions bigint, OUT rotation_threshold bigint)
    RETURNS SETOF record
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.name, v.version, v.state, coalesce(u.encryptions, 0),
           current_setting('pgphi.dek_rotation_threshold')::bigint
      FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id)
      LEFT JOIN pgphi._usage_counts() u ON u.key_id = v.key_id AND u.version = v.version
     ORDER BY k.name, v.version
$$;

------------------------------------------------------------------------------
-- Re-encryption, retirement and destruction.
------------------------------------------------------------------------------

CREATE FUNCTION pgphi.reencrypt_value(value pgphi.encrypted, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_reencrypt_value' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.reencrypt_value(value bytea, key_name text, context text DEFAULT '')
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_reencrypt_value' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi._key_version_of(value bytea, key_id integer) RETURNS integer
    AS 'MODULE_PATHNAME', 'pgphi_key_version_of' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Helpers of the batch procedures below. A column's type, or an error
-- naming what is missing.
CREATE FUNCTION pgphi._column_type(tbl regclass, col name) RETURNS regtype
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found regtype;
BEGIN
    SELECT a.atttypid::regtype INTO found FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF found IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', col, tbl USING ERRCODE = 'undefined_column';
    END IF;
    RETURN found;
END
$$;

-- A table's size in pages, and how many pages hold about batch_size rows
-- (from the planner's statistics).
CREATE FUNCTION pgphi._page_batches(tbl regclass, batch_size integer,
        OUT relation_pages bigint, OUT pages_per_batch bigint)
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_relation_size(tbl) / current_setting('block_size')::bigint,
           greatest(1, (batch_size / greatest(1, c.reltuples / greatest(1, c.relpages)))::bigint)
      FROM pg_class c WHERE c.oid = tbl
$$;

-- Where each re-encryption stands; a CALL that was interrupted continues from
-- next_page.
CREATE TABLE pgphi.reencrypt_progress (
    relation     regclass NOT NULL,
    column_name  name NOT NULL,
    key_id       integer NOT NULL,
    target_version integer NOT NULL,
    next_page    bigint NOT NULL DEFAULT 0,
    total_pages  bigint NOT NULL,
    rows_reencrypted bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at  timestamptz,
    PRIMARY KEY (relation, column_name)
);

-- Moves every value of a column to its key's active version, online: batches
-- of table pages, each its own transaction holding only row locks, then sweeps
-- for values that concurrent writers copied from old rows. Concurrent updates
-- are never lost (each UPDATE re-checks rows that changed under it). Call it
-- again after a crash or cancel and it continues where it stopped.
-- (It runs as its caller and commits between batches, which a procedure with
-- a SET clause cannot: names are qualified instead of pinning search_path.)
CREATE PROCEDURE pgphi.reencrypt(tbl regclass, col name, batch_size integer DEFAULT 10000,
                                 context_column name DEFAULT NULL, key_name text DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    col_type regtype;
    target_key text := reencrypt.key_name;
    target_id integer;
    active integer;
    progress record;
    pages_per_batch bigint;
    relation_pages bigint;
    page bigint;
    moved bigint;
    sweep_moved bigint;
    context_sql text := CASE WHEN context_column IS NULL THEN ''
                             ELSE pg_catalog.format(', %I::text', context_column) END;
    update_sql text;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    col_type := pgphi._column_type(tbl, col);
    IF col_type NOT IN ('pgphi.encrypted'::regtype, 'bytea'::regtype) THEN
        RAISE EXCEPTION 'column "%" of relation % is of type %, not pgphi.encrypted or bytea', col, tbl, col_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF target_key IS NULL THEN
        -- The key of the column: the one its first encrypted value names.
        EXECUTE pg_catalog.format('SELECT pgphi._key_name(i.key_id) FROM %s t, pgphi.ciphertext_info(t.%I::bytea) i
                                    WHERE t.%I IS NOT NULL LIMIT 1', tbl, col, col)
            INTO target_key;
        IF target_key IS NULL THEN
            RAISE NOTICE 'column "%" of % holds no encrypted values', col, tbl;
            RETURN;
        END IF;
    END IF;
    target_id := pgphi._key_id(target_key);
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', target_key USING ERRCODE = 'undefined_object';
    END IF;
    active := pgphi._active_version(target_id);
    IF active IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" has no active version', target_key USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    SELECT b.relation_pages, b.pages_per_batch INTO relation_pages, pages_per_batch
      FROM pgphi._page_batches(tbl, batch_size) b;
    SELECT * INTO progress FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = col;
    IF NOT FOUND OR progress.finished_at IS NOT NULL OR progress.target_version <> active
       OR progress.key_id <> target_id THEN
        DELETE FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = col;
        INSERT INTO pgphi.reencrypt_progress (relation, column_name, key_id, target_version, total_pages)
            VALUES (tbl, col, target_id, active, relation_pages)
            RETURNING * INTO progress;
    ELSE
        RAISE NOTICE 'resuming re-encryption of %.% at page % of %', tbl, col, progress.next_page, relation_pages;
        UPDATE pgphi.reencrypt_progress p SET total_pages = relation_pages
         WHERE p.relation = tbl AND p.column_name = col;
    END IF;
    COMMIT;

    update_sql := pg_catalog.format(
        'UPDATE %s SET %I = pgphi.reencrypt_value(%I, $1%s)
          WHERE %%s AND pgphi._key_version_of(%I::bytea, $2) <> $3', tbl, col, col, context_sql, col);

    page := progress.next_page;
    WHILE page < relation_pages LOOP
        EXECUTE pg_catalog.format(update_sql, 'ctid >= $4 AND ctid < $5')
            USING target_key, target_id, active,
                  pg_catalog.format('(%s,0)', page)::tid, pg_catalog.format('(%s,0)', page + pages_per_batch)::tid;
        GET DIAGNOSTICS moved = ROW_COUNT;
        page := page + pages_per_batch;
        UPDATE pgphi.reencrypt_progress p
           SET next_page = least(page, relation_pages), rows_reencrypted = rows_reencrypted + moved,
               updated_at = pg_catalog.clock_timestamp()
         WHERE p.relation = tbl AND p.column_name = col;
        COMMIT;
    END LOOP;

    -- Rows that moved to pages already passed still carry old versions when a
    -- writer copied the value (an update of another column). Sweep until none.
    FOR pass IN 1..1000 LOOP
        EXECUTE pg_catalog.format(update_sql, pg_catalog.format(
            'ctid = ANY (ARRAY(SELECT ctid FROM %s WHERE pgphi._key_version_of(%I::bytea, $2) <> $3 LIMIT %s))',
            tbl, col, batch_size))
            USING target_key, target_id, active;
        GET DIAGNOSTICS sweep_moved = ROW_COUNT;
        UPDATE pgphi.reencrypt_progress p
           SET rows_reencrypted = rows_reencrypted + sweep_moved, updated_at = pg_catalog.clock_timestamp()
         WHERE p.relation = tbl AND p.column_name = col;
        COMMIT;
        EXIT WHEN sweep_moved = 0;
    END LOOP;
    UPDATE pgphi.reencrypt_progress p SET finished_at = pg_catalog.clock_timestamp()
     WHERE p.relation = tbl AND p.column_name = col;
    COMMIT;
END
$$;

-- Keeps the shadow column of a column being protected in step with writes
-- (arguments: plaintext column, shadow column, key, context column or '').
CREATE FUNCTION pgphi._protect_column_sync() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    row_json jsonb := pg_catalog.to_jsonb(NEW);
    plaintext text := row_json ->> TG_ARGV[0];
    context text := CASE WHEN TG_ARGV[3] = '' THEN '' ELSE coalesce(row_json ->> TG_ARGV[3], '') END;
BEGIN
    NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(TG_ARGV[1],
        CASE WHEN plaintext IS NULL THEN NULL
             ELSE pgphi.encrypt_phi(plaintext, TG_ARGV[2], context)::bytea::text END));
    RETURN NEW;
END
$$;

-- Converts a plaintext text column of a live table into a pgphi.encrypted
-- column of the same name, online: a shadow column is added and kept in step
-- with writes by a trigger, filled in committed batches of pages (resumable:
-- CALL it again after an interruption), and finally swapped in with one
-- short exclusive lock. The old column is dropped, but its bytes stay in the
-- table's pages until they are rewritten (VACUUM FULL, pg_repack), and in WAL
-- and backups: the procedure says so when it ends.
CREATE PROCEDURE pgphi.protect_column(tbl regclass, col name, key_name text, batch_size integer DEFAULT 10000,
                                      context_column name DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    col_type regtype;
    shadow name := pg_catalog.left('pgphi_protecting_' || col, 63);
    trigger_name name := pg_catalog.left('pgphi_protect_' || col, 63);
    -- The generated SQL's context argument: an empty string literal, or the column.
    context_sql text := CASE WHEN context_column IS NULL THEN pg_catalog.quote_literal('')
                             ELSE pg_catalog.format('%I::text', context_column) END;
    relation_pages bigint;
    pages_per_batch bigint;
    page bigint := 0;
    filled bigint;
    fill_sql text;
BEGIN
    col_type := pgphi._column_type(tbl, col);
    IF col_type NOT IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype) THEN
        RAISE EXCEPTION 'column "%" of relation % is of type %; protect_column converts text columns', col, tbl, col_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF pgphi._key_id(key_name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_name USING ERRCODE = 'undefined_object';
    END IF;
    IF pg_catalog.length(col) > 46 THEN
        RAISE EXCEPTION 'protect_column needs a column name of at most 46 characters' USING ERRCODE = 'name_too_long';
    END IF;

    -- 1. The shadow column and the trigger (kept if a previous call made them,
    --    which must then have used the same key and context).
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = trigger_name
                  AND pg_catalog.string_to_array(pg_catalog.encode(t.tgargs, 'escape'), '\000')
                      IS DISTINCT FROM ARRAY[col::text, shadow::text, key_name, coalesce(context_column::text, ''), '']) THEN
        RAISE EXCEPTION 'a conversion of column "%" of % is under way with another key or context', col, tbl
            USING ERRCODE = 'object_in_use', HINT = 'Call protect_column with the arguments of the first call.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attname = shadow
                      AND NOT a.attisdropped) THEN
        EXECUTE pg_catalog.format('ALTER TABLE %s ADD COLUMN %I pgphi.encrypted', tbl, shadow);
        EXECUTE pg_catalog.format(
            -- UPDATE OF the plaintext and context columns only: the backfill
            -- below, which sets the shadow column alone, does not fire it.
            'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %s ON %s FOR EACH ROW
             EXECUTE FUNCTION pgphi._protect_column_sync(%L, %L, %L, %L)',
            trigger_name,
            CASE WHEN context_column IS NULL THEN pg_catalog.quote_ident(col)
                 ELSE pg_catalog.format('%I, %I', col, context_column) END,
            tbl, col, shadow, key_name, coalesce(context_column, ''));
    END IF;
    COMMIT;

    -- 2. Fill it, a batch of pages per transaction, then sweep what is left.
    SELECT b.relation_pages, b.pages_per_batch INTO relation_pages, pages_per_batch
      FROM pgphi._page_batches(tbl, batch_size) b;
    fill_sql := pg_catalog.format('UPDATE %s SET %I = pgphi.encrypt_phi(%I::text, $1, %s) WHERE %%s AND %I IS NULL AND %I IS NOT NULL',
                                  tbl, shadow, col, context_sql, shadow, col);
    WHILE page < relation_pages LOOP
        EXECUTE pg_catalog.format(fill_sql, 'ctid >= $2 AND ctid < $3')
            USING key_name, pg_catalog.format('(%s,0)', page)::tid, pg_catalog.format('(%s,0)', page + pages_per_batch)::tid;
        page := page + pages_per_batch;
        COMMIT;
    END LOOP;
    LOOP
        EXECUTE pg_catalog.format(fill_sql, pg_catalog.format(
            'ctid = ANY (ARRAY(SELECT ctid FROM %s WHERE %I IS NULL AND %I IS NOT NULL LIMIT %s))',
            tbl, shadow, col, batch_size)) USING key_name;
        GET DIAGNOSTICS filled = ROW_COUNT;
        COMMIT;
        EXIT WHEN filled = 0;
    END LOOP;

    -- 3. The swap, under a short exclusive lock: last stragglers, then the
    --    shadow column takes the plaintext column's place.
    EXECUTE pg_catalog.format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', tbl);
    EXECUTE pg_catalog.format(fill_sql, 'true') USING key_name;
    EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', trigger_name, tbl);
    EXECUTE pg_catalog.format('ALTER TABLE %s DROP COLUMN %I', tbl, col);
    EXECUTE pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I', tbl, shadow, col);
    COMMIT;
    RAISE NOTICE 'column "%" of % is now encrypted with pgphi key "%"', col, tbl, key_name
        USING DETAIL = 'The plaintext stays in the table''s pages until they are rewritten, and in WAL and backups.',
              HINT = pg_catalog.format('Run VACUUM FULL %s (or pg_repack) to remove it from the table.', tbl);
END
$$;

-- How many values of every encrypted or bytea column in this database use a
-- key version. Scans every such column; returns counts only.
CREATE FUNCTION pgphi.key_version_usage(name text, version integer)
    RETURNS TABLE (relation regclass, column_name name, "values" bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_version_usage.name);
    c record;
    n bigint;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_version_usage.name USING ERRCODE = 'undefined_object';
    END IF;
    FOR c IN SELECT a.attrelid::regclass AS rel, a.attname
               FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
               JOIN pg_namespace s ON s.oid = r.relnamespace
              WHERE r.relkind IN ('r', 'm') AND a.attnum > 0 AND NOT a.attisdropped
                AND a.atttypid IN ('pgphi.encrypted'::regtype, 'bytea'::regtype)
                AND s.nspname NOT IN ('pg_catalog', 'information_schema', 'pgphi')
                AND s.nspname NOT LIKE 'pg_toast%' AND s.nspname NOT LIKE 'pg_temp%'
              ORDER BY 1, 2
    LOOP
        EXECUTE pg_catalog.format('SELECT count(*) FROM ONLY %s WHERE pgphi._key_version_of(%I::bytea, $1) = $2',
                                  c.rel, c.attname)
            INTO n USING target_id, key_version_usage.version;
        IF n > 0 THEN
            relation := c.rel; column_name := c.attname; "values" := n;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- Marks a decrypt-only version retired once a scan of the whole database
-- finds no value under it; refuses, naming where values remain, otherwise.
CREATE FUNCTION pgphi.retire_key_version(name text, version integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(retire_key_version.name);
    state text;
    remaining bigint;
    places text;
BEGIN
    SELECT v.state INTO state FROM pgphi.key_versions v
     WHERE v.key_id = target_id AND v.version = retire_key_version.version FOR UPDATE;
    IF state IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" has no version %', retire_key_version.name, retire_key_version.version
            USING ERRCODE = 'undefined_object';
    ELSIF state = 'active' THEN
        RAISE EXCEPTION 'pgphi key "%" version % is active', retire_key_version.name, retire_key_version.version
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Rotate the key first.';
    ELSIF state <> 'decrypt_only' THEN
        RAISE EXCEPTION 'pgphi key "%" version % is already %', retire_key_version.name,
            retire_key_version.version, state USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT sum(u."values"), string_agg(pg_catalog.format('%s.%I: %s', u.relation, u.column_name, u."values"), ', ')
      INTO remaining, places
      FROM pgphi.key_version_usage(retire_key_version.name, retire_key_version.version) u;
    IF remaining > 0 THEN
        RAISE EXCEPTION 'pgphi key "%" version % is still used by % values', retire_key_version.name,
            retire_key_version.version, remaining
            USING ERRCODE = 'object_in_use', DETAIL = places,
                  HINT = 'Re-encrypt those columns with CALL pgphi.reencrypt(...) first.';
    END IF;
    UPDATE pgphi.key_versions v SET state = 'retired', retired_at = pg_catalog.now()
     WHERE v.key_id = target_id AND v.version = retire_key_version.version;
END
$$;

-- Dual control: destroying a key version needs the approval of two different
-- key custodians, each given with approve_destroy, within the last day.
CREATE TABLE pgphi.destroy_approvals (
    key_id      integer NOT NULL,
    version     integer NOT NULL,
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version, approved_by)
);

CREATE FUNCTION pgphi.approve_destroy(name text, version integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(approve_destroy.name);
    approver name := session_user;
BEGIN
    IF NOT EXISTS (SELECT FROM pgphi.key_versions v WHERE v.key_id = target_id
                      AND v.version = approve_destroy.version AND v.state <> 'destroyed') THEN
        RAISE EXCEPTION 'pgphi key "%" has no version % to destroy', approve_destroy.name, approve_destroy.version
            USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT pg_catalog.pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve destroying a key'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    INSERT INTO pgphi.destroy_approvals (key_id, version, approved_by)
        VALUES (target_id, approve_destroy.version, approver)
        ON CONFLICT ON CONSTRAINT destroy_approvals_pkey DO UPDATE SET approved_at = pg_catalog.now();
END
$$;

-- Crypto-shredding: erases a key version's wrapped DEK and drops it from
-- every cache. Values under it can never be decrypted again.
CREATE FUNCTION pgphi.destroy_key(name text, version integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(destroy_key.name);
    approvers name[];
BEGIN
    PERFORM FROM pgphi.key_versions v WHERE v.key_id = target_id AND v.version = destroy_key.version
       AND v.state <> 'destroyed' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key "%" has no version % to destroy', destroy_key.name, destroy_key.version
            USING ERRCODE = 'undefined_object';
    END IF;
    SELECT array_agg(a.approved_by ORDER BY a.approved_by) INTO approvers
      FROM pgphi.destroy_approvals a
     WHERE a.key_id = target_id AND a.version = destroy_key.version
       AND a.approved_at > pg_catalog.now() - interval '1 day'
       AND pg_catalog.pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
    IF coalesce(pg_catalog.cardinality(approvers), 0) < 2 THEN
        RAISE EXCEPTION 'destroying pgphi key "%" version % needs the approval of two key custodians',
            destroy_key.name, destroy_key.version
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = pg_catalog.format('Approved by: %s.', coalesce(pg_catalog.array_to_string(approvers, ', '), 'nobody')),
                  HINT = 'Two different members of pgphi_key_custodian must call pgphi.approve_destroy().';
    END IF;
    UPDATE pgphi.key_versions v SET state = 'destroyed', wrapped_dek = NULL, destroyed_at = pg_catalog.now()
     WHERE v.key_id = target_id AND v.version = destroy_key.version;
    DELETE FROM pgphi.destroy_approvals a WHERE a.key_id = target_id AND a.version = destroy_key.version;
    -- Wipe the plaintext DEK from shared memory and every session once this
    -- commits (before, a concurrent decrypt could load it again).
    PERFORM pgphi._flush_cache_at_commit();
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
CREATE FUNCTION pgphi._flush_cache_at_commit() RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_flush_cache_at_commit' LANGUAGE C VOLATILE;

REVOKE ALL ON FUNCTION pgphi.cache_stats(), pgphi.broker_status(), pgphi.flush_cache(),
    pgphi._flush_cache_at_commit() FROM PUBLIC;
REVOKE ALL ON pgphi.cache_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.cache_stats(), pgphi.broker_status() TO pg_monitor;
GRANT SELECT ON pgphi.cache_stats TO pg_monitor;

------------------------------------------------------------------------------
-- Privileges: nothing that touches a key is open to PUBLIC.
------------------------------------------------------------------------------

REVOKE ALL ON FUNCTION pgphi._generate_wrapped_dek(text, text, integer, integer, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgphi.create_key(text, text, text), pgphi.rotate_key(text), pgphi.rewrap_keys(text),
    pgphi.retire_key_version(text, integer), pgphi.approve_destroy(text, integer),
    pgphi.destroy_key(text, integer), pgphi.key_version_usage(text, integer),
    pgphi._rewrap_dek(text, text, integer, integer, text, bytea), pgphi._key_id(text),
    pgphi._rotate_if_active(integer, integer), pgphi._usage_counts(), pgphi.key_usage() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.key_usage() TO pgphi_key_custodian, pg_monitor;
GRANT EXECUTE ON FUNCTION pgphi.create_key(text, text, text), pgphi.rotate_key(text), pgphi.rewrap_keys(text),
    pgphi.retire_key_version(text, integer), pgphi.approve_destroy(text, integer),
    pgphi.destroy_key(text, integer), pgphi.key_version_usage(text, integer) TO pgphi_key_custodian;
-- Re-encryption returns ciphertext only; whoever may update a table's rows may run it.
GRANT EXECUTE ON FUNCTION pgphi._protect_column_sync(), pgphi._key_id(text), pgphi._key_name(integer),
    pgphi._active_version(integer) TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON FUNCTION pgphi.reencrypt_value(pgphi.encrypted, text, text),
    pgphi.reencrypt_value(bytea, text, text) TO pgphi_key_custodian, pgphi_encrypt;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgphi.reencrypt_progress TO pgphi_key_custodian, pgphi_encrypt;

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
