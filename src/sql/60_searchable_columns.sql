-- Searchable encrypted columns.
--
-- Deterministic encryption (AES-256-SIV, ciphertext algorithm 2), equality,
-- ordering and hashing of pgphi.encrypted for deterministic values, and blind
-- indexes (HMAC-SHA-256 under a blind-index key). rebuild_blind_index is with
-- the other batch procedures in 50_rotation_and_batches.sql.

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
        RAISE EXCEPTION 'unknown blind index normalization'
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

-- encrypt_phi(value, key_name, deterministic, context): VOLATILE, since its
-- randomized form returns a new value at every call (STABLE let the planner
-- run it for its estimates: a plain EXPLAIN spent seals and counted against
-- the key's nonce budget). Its deterministic form stays an index condition:
-- when `deterministic` is the constant true, the planner support function
-- replaces the call by pgphi._encrypt_phi_deterministic, a STABLE twin with
-- the same arguments and C function (src/pg/functions/planner_support.cpp).
CREATE FUNCTION pgphi._encrypt_mode_support(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_mode_support' LANGUAGE C STRICT;

CREATE FUNCTION pgphi.encrypt_phi(value text, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;

CREATE FUNCTION pgphi.encrypt_phi(value bytea, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;

CREATE FUNCTION pgphi.encrypt_phi(value jsonb, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;

CREATE FUNCTION pgphi._encrypt_phi_deterministic(value text, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_deterministic(value bytea, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_deterministic(value jsonb, key_name text, deterministic boolean, context text)
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
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN coalesce(versions, '{}');
END
$$;

-- Lookups while a rotation is under way: the deterministic value under every
-- live version, for "col = ANY (pgphi.encrypt_phi_all_versions(...))", which
-- also finds rows that are not re-encrypted yet.
CREATE FUNCTION pgphi.encrypt_phi_all_versions(value text, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(pgphi._encrypt_phi_version(value, key_name, context, u.version) ORDER BY u.n), '{}')
      FROM unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;

CREATE FUNCTION pgphi.encrypt_phi_all_versions(value bytea, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(pgphi._encrypt_phi_version(value, key_name, context, u.version) ORDER BY u.n), '{}')
      FROM unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
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

-- Blind indexes: HMAC-SHA-256 of the normalised value under a blind-index
-- key, truncated, after the key id and version (8 bytes, big-endian).
CREATE FUNCTION pgphi.blind_index(value text, key_name text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_blind_index' LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.blind_index(value text, key_name text, version integer) RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_blind_index_version' LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi.blind_index_all_versions(value text, key_name text) RETURNS bytea[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(pgphi.blind_index(value, key_name, u.version) ORDER BY u.n), '{}')
      FROM unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;

CREATE FUNCTION pgphi._blind_index_version_of(value bytea, key_id integer) RETURNS integer
    AS 'MODULE_PATHNAME', 'pgphi_blind_index_version_of' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Deterministic encryption and blind indexes go with encrypting
-- (pgphi_encrypt); making a blind-index key with key administration.
GRANT EXECUTE ON FUNCTION pgphi.create_blind_index_key(text, text, integer, text, text) TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION
    pgphi.encrypt_phi(text, text, boolean, text), pgphi.encrypt_phi(bytea, text, boolean, text),
    pgphi.encrypt_phi(jsonb, text, boolean, text),
    pgphi._encrypt_phi_deterministic(text, text, boolean, text),
    pgphi._encrypt_phi_deterministic(bytea, text, boolean, text),
    pgphi._encrypt_phi_deterministic(jsonb, text, boolean, text),
    pgphi._encrypt_phi_version(text, text, text, integer), pgphi._encrypt_phi_version(bytea, text, text, integer),
    pgphi._live_versions(text), pgphi.encrypt_phi_all_versions(text, text, text),
    pgphi.encrypt_phi_all_versions(bytea, text, text),
    pgphi.blind_index(text, text), pgphi.blind_index(text, text, integer), pgphi.blind_index_all_versions(text, text)
    TO pgphi_encrypt;
GRANT EXECUTE ON FUNCTION pgphi._blind_index_version_of(bytea, integer) TO pgphi_key_custodian, pgphi_encrypt;
