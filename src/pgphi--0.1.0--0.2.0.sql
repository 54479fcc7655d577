-- pgphi 0.1.0 -> 0.2.0. 0.1.0 is released: its script never changes again,
-- and a new installation of 0.2.0 runs it followed by this one, so fresh and
-- upgraded databases get exactly the same objects.
\echo Use "ALTER EXTENSION pgphi UPDATE" to load this file. \quit

------------------------------------------------------------------------------
-- Searchable encrypted columns (issue 7): deterministic encryption
-- (AES-256-SIV, ciphertext algorithm 2) and blind indexes.
------------------------------------------------------------------------------

-- Every key has a purpose, fixed when it is created: 'encryption' (encrypt_phi,
-- decrypt_phi) or 'blind_index' (pgphi.blind_index). A blind-index key also
-- fixes its normalisation and length, so that every caller computes the same
-- index for a value. No function changes them afterwards.
ALTER TABLE pgphi.keys
    ADD COLUMN purpose text NOT NULL DEFAULT 'encryption' CHECK (purpose IN ('encryption', 'blind_index')),
    ADD COLUMN normalization text CHECK (normalization IN ('none', 'trim', 'lower', 'trim_lower', 'digits')),
    ADD COLUMN index_bytes integer CHECK (index_bytes BETWEEN 8 AND 32),
    ADD CONSTRAINT keys_blind_index_settings
        CHECK ((purpose = 'blind_index') = (normalization IS NOT NULL)
               AND (purpose = 'blind_index') = (index_bytes IS NOT NULL));

-- Creates a blind-index key: a key like any other (DEK versions wrapped by the
-- provider's KEK, rotation, retirement), whose DEK keys HMAC-SHA-256 instead
-- of a cipher. Returns its key id.
CREATE FUNCTION pgphi.create_blind_index_key(name text, normalization text DEFAULT 'none',
        index_bytes integer DEFAULT 16, provider text DEFAULT 'local', kek text DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_key_id integer;
BEGIN
    IF create_blind_index_key.normalization IS NULL
       OR create_blind_index_key.normalization NOT IN ('none', 'trim', 'lower', 'trim_lower', 'digits') THEN
        RAISE EXCEPTION 'unknown blind index normalization "%"', create_blind_index_key.normalization
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use none, trim, lower, trim_lower or digits.';
    END IF;
    IF create_blind_index_key.index_bytes IS NULL OR create_blind_index_key.index_bytes NOT BETWEEN 8 AND 32 THEN
        RAISE EXCEPTION 'a blind index has 8 to 32 bytes, not %', create_blind_index_key.index_bytes
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The default, 16 bytes, makes accidental matches of distinct values practically impossible.';
    END IF;
    new_key_id := pgphi.create_key(create_blind_index_key.name, create_blind_index_key.provider,
                                   create_blind_index_key.kek);
    UPDATE pgphi.keys k
       SET purpose = 'blind_index', normalization = create_blind_index_key.normalization,
           index_bytes = create_blind_index_key.index_bytes
     WHERE k.key_id = new_key_id;
    RETURN new_key_id;
END
$$;

CREATE FUNCTION pgphi._key_purpose(key_id integer) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT purpose FROM pgphi.keys WHERE keys.key_id = _key_purpose.key_id $$;

-- Deterministic encryption. STABLE (the randomized forms are VOLATILE), so
-- that "col = encrypt_phi(..., deterministic => true)" is an index condition.
-- deterministic => false gives a randomized value.
CREATE FUNCTION pgphi.encrypt_phi(value text, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypt_phi(value bytea, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypt_phi(value jsonb, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- The deterministic value under one active or decrypt-only version.
CREATE FUNCTION pgphi._encrypt_phi_version(value text, key_name text, context text, version integer)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_version' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_version(value bytea, key_name text, context text, version integer)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_version' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- A key's active and decrypt-only versions, the active one first.
CREATE FUNCTION pgphi._live_versions(key_name text) RETURNS integer[]
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    versions integer[];
BEGIN
    SELECT array_agg(v.version ORDER BY v.state <> 'active', v.version DESC) INTO versions
      FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id)
     WHERE k.name = _live_versions.key_name AND v.state IN ('active', 'decrypt_only');
    IF versions IS NULL AND NOT EXISTS (SELECT FROM pgphi.keys k WHERE k.name = _live_versions.key_name) THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', _live_versions.key_name USING ERRCODE = 'undefined_object';
    END IF;
    RETURN coalesce(versions, '{}');
END
$$;

-- Lookups while a rotation is under way: the deterministic value under every
-- live version, for "col = ANY (pgphi.encrypt_phi_all_versions(...))", which
-- also finds rows that are not re-encrypted yet.
CREATE FUNCTION pgphi.encrypt_phi_all_versions(value text, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT coalesce(pg_catalog.array_agg(pgphi._encrypt_phi_version(value, key_name, context, u.version)
                                         ORDER BY u.n), '{}')
      FROM pg_catalog.unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;
CREATE FUNCTION pgphi.encrypt_phi_all_versions(value bytea, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT coalesce(pg_catalog.array_agg(pgphi._encrypt_phi_version(value, key_name, context, u.version)
                                         ORDER BY u.n), '{}')
      FROM pg_catalog.unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;

-- Equality, ordering and hashing of pgphi.encrypted, for deterministic values
-- under one key only: anything else is refused when compared (randomized
-- values 0A000, different keys 42804). Values of one key but different
-- versions compare unequal. The order is that of the bytes: total, and
-- meaningless for the plaintexts.
CREATE FUNCTION pgphi.encrypted_eq(pgphi.encrypted, pgphi.encrypted) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_eq' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_ne(pgphi.encrypted, pgphi.encrypted) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_ne' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_lt(pgphi.encrypted, pgphi.encrypted) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_lt' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_le(pgphi.encrypted, pgphi.encrypted) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_le' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_gt(pgphi.encrypted, pgphi.encrypted) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_gt' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_ge(pgphi.encrypted, pgphi.encrypted) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_ge' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_cmp(pgphi.encrypted, pgphi.encrypted) RETURNS integer
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_cmp' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_hash(pgphi.encrypted) RETURNS integer
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_hash' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.encrypted_hash_extended(pgphi.encrypted, bigint) RETURNS bigint
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_hash_extended' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE OPERATOR pgphi.= (
    LEFTARG = pgphi.encrypted, RIGHTARG = pgphi.encrypted, FUNCTION = pgphi.encrypted_eq,
    COMMUTATOR = OPERATOR(pgphi.=), NEGATOR = OPERATOR(pgphi.<>),
    RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES);
CREATE OPERATOR pgphi.<> (
    LEFTARG = pgphi.encrypted, RIGHTARG = pgphi.encrypted, FUNCTION = pgphi.encrypted_ne,
    COMMUTATOR = OPERATOR(pgphi.<>), NEGATOR = OPERATOR(pgphi.=),
    RESTRICT = neqsel, JOIN = neqjoinsel);
CREATE OPERATOR pgphi.< (
    LEFTARG = pgphi.encrypted, RIGHTARG = pgphi.encrypted, FUNCTION = pgphi.encrypted_lt,
    COMMUTATOR = OPERATOR(pgphi.>), NEGATOR = OPERATOR(pgphi.>=),
    RESTRICT = scalarltsel, JOIN = scalarltjoinsel);
CREATE OPERATOR pgphi.<= (
    LEFTARG = pgphi.encrypted, RIGHTARG = pgphi.encrypted, FUNCTION = pgphi.encrypted_le,
    COMMUTATOR = OPERATOR(pgphi.>=), NEGATOR = OPERATOR(pgphi.>),
    RESTRICT = scalarlesel, JOIN = scalarlejoinsel);
CREATE OPERATOR pgphi.> (
    LEFTARG = pgphi.encrypted, RIGHTARG = pgphi.encrypted, FUNCTION = pgphi.encrypted_gt,
    COMMUTATOR = OPERATOR(pgphi.<), NEGATOR = OPERATOR(pgphi.<=),
    RESTRICT = scalargtsel, JOIN = scalargtjoinsel);
CREATE OPERATOR pgphi.>= (
    LEFTARG = pgphi.encrypted, RIGHTARG = pgphi.encrypted, FUNCTION = pgphi.encrypted_ge,
    COMMUTATOR = OPERATOR(pgphi.<=), NEGATOR = OPERATOR(pgphi.<),
    RESTRICT = scalargesel, JOIN = scalargejoinsel);

-- Default classes, so that CREATE INDEX ON t (col) and USING hash (col) need
-- no class name. Equality is equality of bytes, so btree deduplication is safe.
CREATE OPERATOR CLASS pgphi.encrypted_ops DEFAULT FOR TYPE pgphi.encrypted USING btree AS
    OPERATOR 1 pgphi.<,
    OPERATOR 2 pgphi.<=,
    OPERATOR 3 pgphi.=,
    OPERATOR 4 pgphi.>=,
    OPERATOR 5 pgphi.>,
    FUNCTION 1 pgphi.encrypted_cmp(pgphi.encrypted, pgphi.encrypted),
    FUNCTION 4 pg_catalog.btequalimage(oid);
CREATE OPERATOR CLASS pgphi.encrypted_hash_ops DEFAULT FOR TYPE pgphi.encrypted USING hash AS
    OPERATOR 1 pgphi.=,
    FUNCTION 1 pgphi.encrypted_hash(pgphi.encrypted),
    FUNCTION 2 pgphi.encrypted_hash_extended(pgphi.encrypted, bigint);

-- ANALYZE keeps working on randomized columns: their samples are not sorted.
CREATE FUNCTION pgphi.encrypted_analyze(internal) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_encrypted_typanalyze' LANGUAGE C STRICT;
ALTER TYPE pgphi.encrypted SET (ANALYZE = pgphi.encrypted_analyze);
COMMENT ON TYPE pgphi.encrypted IS
    'a pgphi ciphertext (AES-256-GCM randomized, or AES-256-SIV deterministic); rejects anything else';

-- Blind indexes: HMAC-SHA-256 of the normalised value under a blind-index
-- key, truncated, after the key id and version (8 bytes, big-endian).
CREATE FUNCTION pgphi.blind_index(value text, key_name text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_blind_index' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.blind_index(value text, key_name text, version integer) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_blind_index_version' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.blind_index_all_versions(value text, key_name text) RETURNS bytea[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT coalesce(pg_catalog.array_agg(pgphi.blind_index(value, key_name, u.version) ORDER BY u.n), '{}')
      FROM pg_catalog.unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;
CREATE FUNCTION pgphi._blind_index_version_of(value bytea, key_id integer) RETURNS integer
    AS 'MODULE_PATHNAME', 'pgphi_blind_index_version_of' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Fills a blind index column from its source column (encrypted, or plain
-- text), and after the blind-index key was rotated recomputes every value not
-- under the active version: batches of pages, each its own transaction,
-- resumable like reencrypt (progress in pgphi.reencrypt_progress, under the
-- index column's name). Values already under the active version are kept.
-- The caller must be able to decrypt the source (pgphi_decrypt) and compute
-- blind indexes (pgphi_encrypt).
CREATE PROCEDURE pgphi.rebuild_blind_index(tbl regclass, index_column name, source_column name, key_name text,
                                           batch_size integer DEFAULT 10000, context_column name DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    index_type regtype;
    source_type regtype;
    target_id integer;
    active integer;
    source_key text;
    plaintext_sql text;
    update_head text;
    stale_sql text;
    progress record;
    relation_pages bigint;
    pages_per_batch bigint;
    page bigint;
    moved bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    index_type := pgphi._column_type(tbl, index_column);
    IF index_type <> 'bytea'::regtype THEN
        RAISE EXCEPTION 'column "%" of relation % is of type %; a blind index column is bytea', index_column, tbl,
            index_type USING ERRCODE = 'wrong_object_type';
    END IF;
    source_type := pgphi._column_type(tbl, source_column);
    target_id := pgphi._key_id(key_name);
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_name USING ERRCODE = 'undefined_object';
    END IF;
    IF pgphi._key_purpose(target_id) IS DISTINCT FROM 'blind_index' THEN
        RAISE EXCEPTION 'pgphi key "%" is not a blind-index key', key_name
            USING ERRCODE = 'wrong_object_type', HINT = 'Make one with pgphi.create_blind_index_key().';
    END IF;
    active := pgphi._active_version(target_id);
    IF active IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" has no active version', key_name
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    -- The plaintext of the source column, as SQL.
    IF source_type IN ('pgphi.encrypted'::regtype, 'bytea'::regtype) THEN
        -- The key of the source column: the one its first encrypted value names.
        EXECUTE pg_catalog.format('SELECT pgphi._key_name(i.key_id) FROM %s t, pgphi.ciphertext_info(t.%I::bytea) i
                                    WHERE t.%I IS NOT NULL LIMIT 1', tbl, source_column, source_column)
            INTO source_key;
        plaintext_sql := pg_catalog.format('pgphi.decrypt_phi(%I::bytea, %L, %s)', source_column, source_key,
            CASE WHEN context_column IS NULL THEN pg_catalog.quote_literal('')
                 ELSE pg_catalog.format('%I::text', context_column) END);
    ELSIF source_type IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype) THEN
        IF context_column IS NOT NULL THEN
            RAISE EXCEPTION 'a context column applies only to an encrypted source column'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        plaintext_sql := pg_catalog.format('%I::text', source_column);
    ELSE
        RAISE EXCEPTION 'column "%" of relation % is of type %, not pgphi.encrypted, bytea or text', source_column,
            tbl, source_type USING ERRCODE = 'wrong_object_type';
    END IF;

    -- A row is stale when its index is missing, left over, or not under the
    -- active version.
    stale_sql := pg_catalog.format(
        'CASE WHEN %1$I IS NULL THEN %2$I IS NOT NULL
              ELSE pgphi._blind_index_version_of(%2$I, $2) IS DISTINCT FROM $3 END', source_column, index_column);
    -- (Concatenated, not formatted again: names may contain "%".)
    update_head := pg_catalog.format(
        'UPDATE %s SET %I = CASE WHEN %I IS NULL THEN NULL ELSE pgphi.blind_index(%s, $1) END WHERE ',
        tbl, index_column, source_column, plaintext_sql);

    SELECT b.relation_pages, b.pages_per_batch INTO relation_pages, pages_per_batch
      FROM pgphi._page_batches(tbl, batch_size) b;
    SELECT * INTO progress FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = index_column;
    IF NOT FOUND OR progress.finished_at IS NOT NULL OR progress.target_version <> active
       OR progress.key_id <> target_id THEN
        DELETE FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = index_column;
        INSERT INTO pgphi.reencrypt_progress (relation, column_name, key_id, target_version, total_pages)
            VALUES (tbl, index_column, target_id, active, relation_pages)
            RETURNING * INTO progress;
    ELSE
        RAISE NOTICE 'resuming the blind index rebuild of %.% at page % of %', tbl, index_column,
            progress.next_page, relation_pages;
        UPDATE pgphi.reencrypt_progress p SET total_pages = relation_pages
         WHERE p.relation = tbl AND p.column_name = index_column;
    END IF;
    COMMIT;

    page := progress.next_page;
    WHILE page < relation_pages LOOP
        EXECUTE update_head || 'ctid >= $4 AND ctid < $5 AND ' || stale_sql
            USING key_name, target_id, active,
                  pg_catalog.format('(%s,0)', page)::tid, pg_catalog.format('(%s,0)', page + pages_per_batch)::tid;
        GET DIAGNOSTICS moved = ROW_COUNT;
        page := page + pages_per_batch;
        UPDATE pgphi.reencrypt_progress p
           SET next_page = least(page, relation_pages), rows_reencrypted = rows_reencrypted + moved,
               updated_at = pg_catalog.clock_timestamp()
         WHERE p.relation = tbl AND p.column_name = index_column;
        COMMIT;
    END LOOP;

    -- Rows that moved behind the scan, or that writers indexed under an old
    -- version meanwhile: sweep until none is left.
    FOR pass IN 1..1000 LOOP
        EXECUTE update_head || pg_catalog.format('ctid = ANY (ARRAY(SELECT ctid FROM %s WHERE ', tbl) || stale_sql
                || pg_catalog.format(' LIMIT %s)) AND ', batch_size) || stale_sql
            USING key_name, target_id, active;
        GET DIAGNOSTICS moved = ROW_COUNT;
        UPDATE pgphi.reencrypt_progress p
           SET rows_reencrypted = rows_reencrypted + moved, updated_at = pg_catalog.clock_timestamp()
         WHERE p.relation = tbl AND p.column_name = index_column;
        COMMIT;
        EXIT WHEN moved = 0;
    END LOOP;
    UPDATE pgphi.reencrypt_progress p SET finished_at = pg_catalog.clock_timestamp()
     WHERE p.relation = tbl AND p.column_name = index_column;
    COMMIT;
END
$$;

-- The retirement scan also counts blind index values: for a blind-index key,
-- the bytea columns holding values of its shape under the version.
CREATE OR REPLACE FUNCTION pgphi.key_version_usage(name text, version integer)
    RETURNS TABLE (relation regclass, column_name name, "values" bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_version_usage.name);
    blind_index boolean;
    version_of text;
    c record;
    n bigint;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_version_usage.name USING ERRCODE = 'undefined_object';
    END IF;
    blind_index := pgphi._key_purpose(target_id) = 'blind_index';
    version_of := CASE WHEN blind_index THEN 'pgphi._blind_index_version_of' ELSE 'pgphi._key_version_of' END;
    FOR c IN SELECT a.attrelid::regclass AS rel, a.attname
               FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
               JOIN pg_namespace s ON s.oid = r.relnamespace
              WHERE r.relkind IN ('r', 'm') AND a.attnum > 0 AND NOT a.attisdropped
                AND (a.atttypid = 'bytea'::regtype OR (NOT blind_index AND a.atttypid = 'pgphi.encrypted'::regtype))
                AND s.nspname NOT IN ('pg_catalog', 'information_schema', 'pgphi')
                AND s.nspname NOT LIKE 'pg_toast%' AND s.nspname NOT LIKE 'pg_temp%'
              ORDER BY 1, 2
    LOOP
        EXECUTE pg_catalog.format('SELECT count(*) FROM ONLY %s WHERE %s(%I::bytea, $1) = $2',
                                  c.rel, version_of, c.attname)
            INTO n USING target_id, key_version_usage.version;
        IF n > 0 THEN
            relation := c.rel; column_name := c.attname; "values" := n;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- Privileges: deterministic encryption and blind indexes go with encrypting
-- (pgphi_encrypt); decryption is unchanged.
REVOKE ALL ON FUNCTION pgphi.create_blind_index_key(text, text, integer, text, text), pgphi._key_purpose(integer),
    pgphi.encrypt_phi(text, text, boolean, text), pgphi.encrypt_phi(bytea, text, boolean, text),
    pgphi.encrypt_phi(jsonb, text, boolean, text),
    pgphi._encrypt_phi_version(text, text, text, integer), pgphi._encrypt_phi_version(bytea, text, text, integer),
    pgphi._live_versions(text), pgphi.encrypt_phi_all_versions(text, text, text),
    pgphi.encrypt_phi_all_versions(bytea, text, text),
    pgphi.blind_index(text, text), pgphi.blind_index(text, text, integer), pgphi.blind_index_all_versions(text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.create_blind_index_key(text, text, integer, text, text) TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION pgphi._key_purpose(integer) TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON FUNCTION
    pgphi.encrypt_phi(text, text, boolean, text), pgphi.encrypt_phi(bytea, text, boolean, text),
    pgphi.encrypt_phi(jsonb, text, boolean, text),
    pgphi._encrypt_phi_version(text, text, text, integer), pgphi._encrypt_phi_version(bytea, text, text, integer),
    pgphi._live_versions(text), pgphi.encrypt_phi_all_versions(text, text, text),
    pgphi.encrypt_phi_all_versions(bytea, text, text),
    pgphi.blind_index(text, text), pgphi.blind_index(text, text, integer), pgphi.blind_index_all_versions(text, text)
    TO pgphi_encrypt;
