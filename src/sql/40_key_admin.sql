-- Key administration: creating, rotating and rewrapping keys.
--
-- Key administration functions run as the extension's owner (SECURITY
-- DEFINER), so key custodians need no rights on the catalog tables; each pins
-- its search_path and qualifies every name. Retirement and destruction are in
-- 80_lifecycle.sql, blind-index keys in 60_searchable_columns.sql. Messages
-- repeat a name only when it names an existing key: an unknown key name may
-- be PHI passed in the wrong argument.

-- The provider (the key broker, for a remote key manager) makes and wraps a DEK.
CREATE FUNCTION pgphi._generate_wrapped_dek(provider text, kek text, key_id integer,
        version integer, key_name text, may_create_local_kek boolean,
        OUT wrapped_dek bytea, OUT kek_version text)
    AS 'MODULE_PATHNAME', 'pgphi_generate_wrapped_dek' LANGUAGE C VOLATILE STRICT;

-- Creates a named key: version 1 of its DEK, generated and wrapped by the
-- provider's KEK. Returns the key id that ciphertexts carry. With
-- dedicated_kek, the KEK is made for this key alone in the key manager
-- (named pgphi-dedicated-<name>-<random>; KMS names its keys itself), so
-- that destroying the key's last version can delete it.
CREATE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL,
        dedicated_kek boolean DEFAULT false)
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
        RAISE EXCEPTION 'invalid pgphi key name'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.',
                  HINT = 'Key names have 1 to 63 letters, digits, "_", "." or "-", and start with a letter or "_".';
    END IF;
    IF create_key.provider IS NULL THEN
        RAISE EXCEPTION 'a pgphi key needs a provider' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_key.dedicated_kek THEN
        IF create_key.provider NOT IN ('vault', 'aws_kms', 'kmip', 'pkcs11') THEN
            RAISE EXCEPTION '%', CASE WHEN create_key.provider = 'local' THEN 'the local provider cannot make a KEK for one key' ELSE 'unknown pgphi key provider' END
                USING ERRCODE = CASE WHEN create_key.provider = 'local' THEN 'feature_not_supported' ELSE 'invalid_parameter_value' END,
                      HINT = 'Dedicated KEKs live in Vault, AWS KMS, a KMIP server or a PKCS#11 token; the local provider has one KEK file.';
        END IF;
        -- pgphi names it: a name of the caller's choosing could be one that
        -- another system creates (or resolves) later, which the deletion of
        -- this key would then take with it.
        IF create_key.kek IS NOT NULL THEN
            RAISE EXCEPTION 'pgphi names a dedicated KEK itself' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Omit kek with dedicated_kek => true: the new KEK is named pgphi-dedicated-<key>-<random> (KMS: its ARN).';
        END IF;
        kek_ref := CASE WHEN create_key.provider = 'aws_kms' THEN ''
            ELSE CASE WHEN create_key.provider = 'pkcs11' THEN 'label:' ELSE '' END
                 || 'pgphi-dedicated-' || create_key.name || '-'
                 || left(pg_catalog.md5(pg_catalog.gen_random_uuid()::text), 12) END;
    END IF;
    IF kek_ref IS NULL THEN
        RAISE EXCEPTION '%', CASE WHEN create_key.provider IN ('vault', 'aws_kms', 'kmip', 'pkcs11') THEN format('provider %s needs the KEK to use', create_key.provider) ELSE 'unknown pgphi key provider' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass kek => the Vault Transit key name, the AWS KMS key id, ARN or alias, the KMIP key''s Name or Unique Identifier, or the PKCS#11 key as label:NAME or id:HEX; or dedicated_kek => true.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.keys k WHERE k.name = create_key.name) THEN
        RAISE EXCEPTION 'pgphi key "%" already exists', create_key.name USING ERRCODE = 'duplicate_object';
    END IF;
    IF create_key.dedicated_kek THEN
        -- Made by the provider's key broker before the key exists; when a
        -- later step fails, the new KEK stays unused in the key manager.
        kek_ref := pgphi._create_dedicated_kek(create_key.provider, kek_ref, create_key.name);
    END IF;

    INSERT INTO pgphi.keys (name, provider, kek_ref, kek_dedicated)
        VALUES (create_key.name, create_key.provider, kek_ref, create_key.dedicated_kek)
        RETURNING key_id INTO new_key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(
        create_key.provider, kek_ref, new_key_id, 1, create_key.name,
        NOT EXISTS (SELECT FROM pgphi.keys k WHERE k.provider = 'local' AND k.key_id <> new_key_id));
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (new_key_id, 1, 'active', dek.wrapped_dek, dek.kek_version);
    RETURN new_key_id;
END
$$;

-- The provider's key broker makes a KEK for one key (create_key) or deletes
-- it once nothing it wrapped is left (pgphi._delete_dedicated_kek_if_unused);
-- the deletion checks the catalog first.
CREATE FUNCTION pgphi._create_dedicated_kek(provider text, kek_name text, key_name text) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_create_dedicated_kek' LANGUAGE C VOLATILE STRICT;
CREATE FUNCTION pgphi._delete_dedicated_kek(provider text, kek_ref text, key_id integer, key_name text)
    RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_delete_dedicated_kek' LANGUAGE C VOLATILE STRICT;

-- pgphi.create_kek(provider, kek_name): a new KEK in the key manager (only
-- kmip can: Create and Activate an AES-256 key with that Name), made by the
-- provider's key broker; returns its reference (KMIP: Unique Identifier).
-- Key custodians only: it changes the key manager, not pgphi's catalog.
CREATE FUNCTION pgphi.create_kek(provider text, kek_name text) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_create_kek' LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION pgphi.create_kek(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.create_kek(text, text) TO pgphi_key_custodian;

CREATE FUNCTION pgphi._rewrap_dek(provider text, kek text, key_id integer, version integer,
        key_name text, wrapped bytea, OUT wrapped_dek bytea, OUT kek_version text)
    AS 'MODULE_PATHNAME', 'pgphi_rewrap_dek' LANGUAGE C VOLATILE STRICT;

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
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF key.kek_deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'the dedicated KEK of pgphi key "%" has been deleted', key.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = pg_catalog.format('Every version of the key was destroyed, and then: %s.', key.kek_deletion),
                  HINT = 'Create a new key for new values.';
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
                -- (a version that a rekey is moving goes to the key's new KEK instead)
                AND kv.rekey_source_provider IS NULL
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
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN done;
END
$$;

------------------------------------------------------------------------------
-- rekey: moving a key to another provider or KEK (docs/key-lifecycle.md)
------------------------------------------------------------------------------
-- The key broker of the source provider unwraps the DEK and hands it, in
-- shared memory, to the broker of the destination, which wraps it (KMS to KMS:
-- ReEncrypt, inside KMS). The DEK itself never changes, so no table data is
-- touched, and its plaintext never reaches this backend or SQL.
CREATE FUNCTION pgphi._rekey_dek(provider text, kek text, key_id integer, version integer, key_name text,
        wrapped bytea, to_provider text, to_kek text, OUT wrapped_dek bytea, OUT kek_version text)
    AS 'MODULE_PATHNAME', 'pgphi_rekey_dek' LANGUAGE C VOLATILE STRICT;

-- The destination's KEK reference as the catalog stores it; refuses an
-- unknown provider, a missing KEK, and a reference no key manager takes (too
-- long for the key broker, or with control characters, which would forge
-- lines in the audit trail and the server log). The KEK is not repeated: a
-- misplaced argument could be PHI.
CREATE FUNCTION pgphi._rekey_target(provider text, kek text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF provider IS NULL OR provider NOT IN ('local', 'vault', 'aws_kms', 'kmip', 'pkcs11') THEN
        RAISE EXCEPTION 'unknown pgphi key provider' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Available providers: local, vault, aws_kms, kmip, pkcs11.';
    END IF;
    IF kek IS NULL AND provider <> 'local' THEN
        RAISE EXCEPTION 'provider % needs the KEK to use', provider USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass kek => the Vault Transit key name, the AWS KMS key id, ARN or alias, the KMIP key''s Name or Unique Identifier, or the PKCS#11 key as label:NAME or id:HEX.';
    END IF;
    IF octet_length(kek) > 255 OR kek = '' OR kek ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid KEK reference for provider %', provider USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'A KEK reference has 1 to 255 bytes and no control characters; pgphi does not repeat it.';
    END IF;
    RETURN coalesce(kek, 'default');
END
$$;

-- Why `approver` cannot be the second custodian of `requester`, or NULL. Dual
-- control needs two people: no one role may be able to act as both, or to
-- make a role of its choosing a custodian for the occasion. A role controls a
-- party when it can act as it (membership), holds ADMIN OPTION on the party or
-- on a role on its way to pgphi_key_custodian, granted (or can act as the
-- grantor of) a membership on that way, or, before PostgreSQL 16, has
-- CREATEROLE (which could then take over any role). Superusers are above dual
-- control, and are not counted.
CREATE FUNCTION pgphi._approval_dependence(requester name, approver name) RETURNS text
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    WITH party AS (
        SELECT r.oid AS party FROM pg_roles r WHERE r.rolname IN (requester, approver)
    ),
    -- Each party, and the roles on its way to pgphi_key_custodian.
    step AS (
        SELECT p.party, x.oid AS step FROM party p JOIN pg_roles x
            ON x.oid = p.party OR (pg_has_role(p.party, x.oid, 'MEMBER')
                                   AND pg_has_role(x.oid, 'pgphi_key_custodian', 'MEMBER'))
    ),
    -- The memberships on those ways.
    edge AS (
        SELECT s.party, am.grantor FROM step s
          JOIN pg_auth_members am ON am.member = s.step
         WHERE pg_has_role(am.roleid, 'pgphi_key_custodian', 'MEMBER')
    ),
    control AS (
        SELECT p.party, c.oid AS controller FROM party p JOIN pg_roles c ON pg_has_role(c.oid, p.party, 'MEMBER')
        UNION
        SELECT s.party, c.oid FROM step s JOIN pg_roles c ON pg_has_role(c.oid, s.step, 'MEMBER WITH ADMIN OPTION')
        UNION
        SELECT e.party, c.oid FROM edge e JOIN pg_roles g ON g.oid = e.grantor
          JOIN pg_roles c ON pg_has_role(c.oid, g.oid, 'MEMBER')
        UNION
        SELECT p.party, c.oid FROM party p, pg_roles c
         WHERE c.rolcreaterole AND current_setting('server_version_num')::integer < 160000
    )
    SELECT CASE
        WHEN requester = approver THEN 'it is the same role'
        WHEN EXISTS (SELECT FROM edge e WHERE NOT EXISTS (SELECT FROM pg_roles g WHERE g.oid = e.grantor))
            THEN 'a membership on the way to pgphi_key_custodian was granted by a role dropped since'
        ELSE (SELECT format('role %s can act for both, or make either a key custodian', c.rolname)
                FROM control a JOIN control b ON b.controller = a.controller AND b.party <> a.party
                JOIN pg_roles c ON c.oid = a.controller
               WHERE NOT c.rolsuper
               ORDER BY c.rolname LIMIT 1)
    END
$$;

-- A second key custodian approves moving a key to this provider and KEK
-- (valid for a day, used up by the rekey it allows). A procedure, called by
-- the approver itself: a view, a trigger or a function somebody else wrote
-- cannot approve in the approver's session (CALL is refused outside a
-- statement of its own).
CREATE PROCEDURE pgphi.approve_rekey(name text, provider text, kek text DEFAULT NULL)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(approve_rekey.name);
    target_kek text := pgphi._rekey_target(approve_rekey.provider, approve_rekey.kek);
    stack text;
BEGIN
    GET DIAGNOSTICS stack = PG_CONTEXT;
    IF pg_trigger_depth() > 0 OR strpos(stack, E'\n') > 0 THEN
        RAISE EXCEPTION 'pgphi.approve_rekey must be called by the approving custodian itself'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'It was called from a trigger or another routine, which could act for somebody else.',
                  HINT = 'Run CALL pgphi.approve_rekey(...) as a statement of its own.';
    END IF;
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF NOT pg_catalog.pg_has_role(session_user, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve moving a key to another KEK'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    INSERT INTO pgphi.rekey_approvals (key_id, provider, kek_ref, approved_by)
        VALUES (target_id, approve_rekey.provider, target_kek, session_user)
        ON CONFLICT ON CONSTRAINT rekey_approvals_pkey DO UPDATE SET approved_at = pg_catalog.now();
END
$$;

-- The first step of pgphi.rekey: new DEK versions of the key go to the
-- destination from now on, every existing version records the provider and
-- KEK that still wrap it until it is moved, and the first version moves in
-- the same transaction, so a destination that does not work changes nothing
-- (and leaves the approval unused). Called again for the same destination (a
-- rekey that stopped), or back to a provider and KEK that still wrap pending
-- versions, it needs no new approval. Returns the key's id.
CREATE FUNCTION pgphi._rekey_start(key_name text, provider text, kek text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
    target_kek text := pgphi._rekey_target(_rekey_start.provider, _rekey_start.kek);
    approvers name[];
BEGIN
    SELECT * INTO key FROM pgphi.keys k WHERE k.name = _rekey_start.key_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF key.provider = _rekey_start.provider AND key.kek_ref = target_kek THEN
        RETURN key.key_id;
    END IF;
    IF key.kek_dedicated THEN
        -- Its KEK is deleted with its last version: under another KEK, that
        -- deletion would no longer reach the DEKs.
        RAISE EXCEPTION 'pgphi key "%" has a KEK of its own, which does not move', key.name
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create a key under the new KEK and move the values with CALL pgphi.reencrypt().';
    END IF;
    IF NOT EXISTS (SELECT FROM pgphi.key_versions v
                    WHERE v.key_id = key.key_id AND v.wrapped_dek IS NOT NULL
                      AND v.rekey_source_provider = _rekey_start.provider AND v.rekey_source_kek = target_kek) THEN
        SELECT array_agg(a.approved_by ORDER BY a.approved_by) INTO approvers
          FROM pgphi.rekey_approvals a
         WHERE a.key_id = key.key_id AND a.provider = _rekey_start.provider AND a.kek_ref = target_kek
           AND a.approved_at > pg_catalog.now() - interval '1 day'
           AND pg_catalog.pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER')
           AND pgphi._approval_dependence(session_user, a.approved_by) IS NULL;
        IF approvers IS NULL THEN
            RAISE EXCEPTION 'moving pgphi key "%" to provider % needs the approval of a second key custodian',
                key.name, _rekey_start.provider
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Whoever holds a KEK can unwrap the DEKs it wraps. Approvals by the caller, or by roles it controls (CREATEROLE, ADMIN OPTION, memberships it granted), do not count.',
                      HINT = pg_catalog.format('Another member of pgphi_key_custodian runs CALL pgphi.approve_rekey(%L, %L, <the KEK>);',
                                               key.name, _rekey_start.provider);
        END IF;
    END IF;
    -- Versions that a rekey left under the new destination are home already.
    UPDATE pgphi.key_versions v SET rekey_source_provider = NULL, rekey_source_kek = NULL
     WHERE v.key_id = key.key_id AND v.rekey_source_provider = _rekey_start.provider
       AND v.rekey_source_kek = target_kek;
    UPDATE pgphi.key_versions v SET rekey_source_provider = key.provider, rekey_source_kek = key.kek_ref
     WHERE v.key_id = key.key_id AND v.wrapped_dek IS NOT NULL AND v.rekey_source_provider IS NULL;
    UPDATE pgphi.keys k SET provider = _rekey_start.provider, kek_ref = target_kek
     WHERE k.key_id = key.key_id;
    DELETE FROM pgphi.rekey_approvals a WHERE a.key_id = key.key_id;
    -- The destination works, or nothing here commits.
    PERFORM pgphi._rekey_next(key.key_id);
    RETURN key.key_id;
END
$$;

-- Moves the lowest version still under its old KEK (NOTICE: which); false,
-- with a NOTICE that the rekey is complete, when none is left.
CREATE FUNCTION pgphi._rekey_next(key_id integer) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    moved record;
BEGIN
    -- The key's row too: its destination cannot change under this move.
    SELECT k.name, k.provider, k.kek_ref, kv.version, kv.wrapped_dek, kv.rekey_source_provider,
           kv.rekey_source_kek INTO v
      FROM pgphi.keys k JOIN pgphi.key_versions kv USING (key_id)
     WHERE k.key_id = _rekey_next.key_id AND kv.rekey_source_provider IS NOT NULL AND kv.wrapped_dek IS NOT NULL
     ORDER BY kv.version LIMIT 1
       FOR UPDATE OF k, kv;
    IF NOT FOUND THEN
        SELECT k.name, k.provider, k.kek_ref INTO v FROM pgphi.keys k WHERE k.key_id = _rekey_next.key_id;
        RAISE NOTICE 'pgphi key "%": every DEK version is under provider %, KEK %', v.name, v.provider, v.kek_ref;
        RETURN false;
    END IF;
    SELECT * INTO moved FROM pgphi._rekey_dek(v.rekey_source_provider, v.rekey_source_kek, _rekey_next.key_id,
                                               v.version, v.name, v.wrapped_dek, v.provider, v.kek_ref);
    UPDATE pgphi.key_versions kv
       SET wrapped_dek = moved.wrapped_dek, kek_version = moved.kek_version,
           rekey_source_provider = NULL, rekey_source_kek = NULL
     WHERE kv.key_id = _rekey_next.key_id AND kv.version = v.version;
    RAISE NOTICE 'pgphi key "%" version % moved from provider % to provider %', v.name, v.version,
        v.rekey_source_provider, v.provider;
    RETURN true;
END
$$;

-- CALL pgphi.rekey(key, provider, kek): rewraps every DEK version of the key
-- under a KEK of another provider (or another KEK of the same one), after a
-- second custodian's pgphi.approve_rekey. One transaction per version, so a
-- rekey that stops (key manager unreachable, cancel) keeps what it moved:
-- every version stays decryptable meanwhile, and calling it again finishes
-- the job. No SET clause (a procedure with one cannot commit), so the body
-- only calls qualified functions and loops.
CREATE PROCEDURE pgphi.rekey(key_name text, provider text, kek text DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    target pg_catalog.int4;
    more pg_catalog.bool;
BEGIN
    target := pgphi._rekey_start(key_name, provider, kek);
    COMMIT;
    LOOP
        more := pgphi._rekey_next(target);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION pgphi._rekey_start(text, text, text), pgphi._rekey_next(integer) TO pgphi_key_custodian;
GRANT EXECUTE ON PROCEDURE pgphi.approve_rekey(text, text, text), pgphi.rekey(text, text, text) TO pgphi_key_custodian;

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

-- Writes a reservation: the first, with a new version (`first`, called by
-- pgphi._generate_wrapped_dek in the transaction that creates it), or the
-- next, raised to at least `at_least` (by the reservation worker, only for
-- this database's own versions). Returns what is reserved, NULL when this
-- database has no reservation of the version to raise. A function, so that
-- the audit trail records these changes as pgphi's own.
CREATE FUNCTION pgphi._reserve_seals(key_id integer, version integer, at_least bigint, incarnation bigint,
                                     first boolean) RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    this_database oid := (SELECT d.oid FROM pg_catalog.pg_database d
                           WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
    result bigint;
BEGIN
    IF first THEN
        -- (A version keeps the reservation it has, should its DEK ever be
        -- generated twice.)
        INSERT INTO pgphi.seal_reservations AS r (key_id, version, database_oid, reserved, server_incarnation)
            VALUES (_reserve_seals.key_id, _reserve_seals.version, this_database, at_least, incarnation)
            ON CONFLICT ON CONSTRAINT seal_reservations_pkey DO UPDATE SET reserved = r.reserved
            RETURNING r.reserved INTO result;
    ELSE
        UPDATE pgphi.seal_reservations r
           SET reserved = GREATEST(r.reserved, at_least), server_incarnation = incarnation,
               reserved_at = pg_catalog.now()
         WHERE r.key_id OPERATOR(pg_catalog.=) _reserve_seals.key_id
           AND r.version OPERATOR(pg_catalog.=) _reserve_seals.version
           AND r.database_oid OPERATOR(pg_catalog.=) this_database
        RETURNING r.reserved INTO result;
        IF result IS NOT NULL THEN
            PERFORM pgphi._audit('reserve_seals', _reserve_seals.key_id, _reserve_seals.version, 'ok',
                                 pg_catalog.format('%s values may now be encrypted under this version', result));
        END IF;
    END IF;
    RETURN result;
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

CREATE FUNCTION pgphi.set_cryptoperiod(key_name text, cryptoperiod interval) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgphi.keys k SET cryptoperiod = set_cryptoperiod.cryptoperiod WHERE k.name = key_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION pgphi.create_key(text, text, text, boolean), pgphi.rotate_key(text), pgphi.rewrap_keys(text),
    pgphi.set_cryptoperiod(text, interval) TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION pgphi.key_usage() TO pgphi_key_custodian, pg_monitor, pgphi_key_auditor;
