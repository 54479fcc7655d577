-- pgphi 0.2.0 -> 0.3.0 (in progress). 0.2.0 is released: its scripts never
-- change again, and a new installation of 0.3.0 runs the chain 0.1.0, 0.2.0,
-- this one, so fresh and upgraded databases get exactly the same objects.
--
-- 0.3.0 closes what the security review of 0.2.0 found. Each section below is
-- one class of finding; an object changed here is changed in full (CREATE OR
-- REPLACE), so its current definition is the last one in the chain.
\echo Use "ALTER EXTENSION pgphi UPDATE" to load this file. \quit

------------------------------------------------------------------------------
-- Caller-privilege SQL resolves nothing through the caller's search_path.
------------------------------------------------------------------------------

-- (end of section: search_path)



------------------------------------------------------------------------------
-- Crypto-shredding and the states of a key version.
------------------------------------------------------------------------------

-- (end of section: version states)



------------------------------------------------------------------------------
-- Every change to pgphi's catalogs is audited, by whatever path.
------------------------------------------------------------------------------

-- (end of section: catalog audit)



------------------------------------------------------------------------------
-- Audit events: coalesced, counted, never silently lost; anchored chain.
------------------------------------------------------------------------------

-- (end of section: audit events)



------------------------------------------------------------------------------
-- Least privilege, and retirement that nobody can block.
------------------------------------------------------------------------------

-- (end of section: privileges)



------------------------------------------------------------------------------
-- Plaintext is never derived for storage without a client asking.
------------------------------------------------------------------------------


-- A value in the wrong argument (a swapped call such as
-- encrypt_phi('ssn_key', '123-45-6789')) must not reach the server log by
-- way of pgphi's own errors. So pgphi's messages repeat a name only when it
-- names an existing key: an unknown or invalid key name, an unknown
-- provider, normalization or privilege is refused without being quoted.
-- The C functions follow the same rule. What PostgreSQL's own messages may
-- log is for the server's settings (README: "Keeping PHI out of the server
-- log"). The bodies below are those of 0.1.0 and 0.2.0 but for the messages;
-- each pins its search_path.

CREATE OR REPLACE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL)
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
    IF kek_ref IS NULL THEN
        RAISE EXCEPTION '%', CASE WHEN create_key.provider IN ('vault', 'aws_kms') THEN format('provider %s needs the KEK to use', create_key.provider) ELSE 'unknown pgphi key provider' END
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

CREATE OR REPLACE FUNCTION pgphi.rotate_key(name text) RETURNS integer
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

CREATE OR REPLACE FUNCTION pgphi.rewrap_keys(name text DEFAULT NULL) RETURNS integer
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
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN done;
END
$$;

CREATE OR REPLACE FUNCTION pgphi.set_cryptoperiod(key_name text, cryptoperiod interval) RETURNS void
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

CREATE OR REPLACE FUNCTION pgphi.has_key_privilege(role regrole, key_name text, privilege text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
BEGIN
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = has_key_privilege.privilege
                      AND pg_has_role(role, g.grantee::oid, 'USAGE'));
END
$$;

CREATE OR REPLACE FUNCTION pgphi.create_blind_index_key(name text, normalization text DEFAULT 'none',
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

CREATE OR REPLACE FUNCTION pgphi._live_versions(key_name text) RETURNS integer[]
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

-- (end of section: plaintext)



------------------------------------------------------------------------------
-- Broker and workers.
------------------------------------------------------------------------------

-- (end of section: broker)



------------------------------------------------------------------------------
-- Last: every table of pgphi's catalog gets the audit triggers, including the
-- tables the sections above add.
------------------------------------------------------------------------------

-- (end of section: audit triggers on every table)
