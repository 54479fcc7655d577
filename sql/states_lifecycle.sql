-- The states of a key version: retired versions refuse to decrypt and can be
-- un-retired by a custodian (audited); only a retired version can be
-- destroyed; a destroyed version never comes back, whoever tries and by
-- whatever path; destroying erases every stored copy of the wrapped DEK.
CREATE FUNCTION states_wait_for(condition text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    ok boolean;
BEGIN
    FOR i IN 1..300 LOOP
        EXECUTE condition INTO ok;
        IF ok THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END $$;
CREATE ROLE states_custodian_a LOGIN;
CREATE ROLE states_custodian_b LOGIN;
CREATE ROLE states_reader LOGIN;
GRANT pgphi_key_custodian TO states_custodian_a, states_custodian_b;
GRANT pgphi_decrypt TO states_reader;

SELECT pgphi.create_key('states_key') AS states_key_id \gset
SELECT pgphi.grant_decrypt('states_key', 'states_reader');
CREATE TABLE states_t (id int PRIMARY KEY, v pgphi.encrypted, ctx text);
INSERT INTO states_t SELECT i, encrypt_phi('value ' || i, 'states_key', 'ctx ' || i), 'ctx ' || i
  FROM generate_series(1, 20) i;
-- A copy of a version-1 value, kept outside the tables (a backup, a log).
SELECT v AS old_value FROM states_t WHERE id = 1 \gset
SELECT pgphi.rotate_key('states_key') AS v2;

-- Finding 10: neither the active version nor a decrypt-only one can be
-- approved for destruction or destroyed: retirement must prove it unused.
SELECT pgphi.approve_destroy('states_key', 2);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.approve_destroy('states_key', 1);
\echo :LAST_ERROR_SQLSTATE
SET SESSION AUTHORIZATION states_custodian_a;
SELECT pgphi.destroy_key('states_key', 2);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.destroy_key('states_key', 1);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT pgphi.destroy_key('states_key', 7);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.destroy_key('no_such_key', 1);
\echo :LAST_ERROR_SQLSTATE

CALL pgphi.reencrypt('states_t', 'v', context_column => 'ctx');
SELECT pgphi.retire_key_version('states_key', 1);

-- Finding 9: a retired version refuses to decrypt, also a value replayed
-- into a table; the refusal is audited.
SELECT decrypt_phi(:'old_value'::pgphi.encrypted, 'states_key', 'ctx 1');
\echo :LAST_ERROR_SQLSTATE
SET SESSION AUTHORIZATION states_reader;
SELECT decrypt_phi(:'old_value'::pgphi.encrypted, 'states_key', 'ctx 1');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT states_wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE action = 'decrypt'
    AND outcome = 'refused' AND key_name = 'states_key' AND key_version = 1
    AND detail = 'key version is retired' AND acting_role = 'states_reader')$$) AS retired_refusal_audited;
CREATE TABLE states_replayed (id int, v pgphi.encrypted, ctx text);
INSERT INTO states_replayed VALUES (1, :'old_value', 'ctx 1');
SELECT count(*) AS refused FROM states_replayed WHERE decrypt_phi(v, 'states_key', ctx) IS NOT NULL;
\echo :LAST_ERROR_SQLSTATE
-- The version's other uses still work: the usage scan sees the replayed
-- value, and values under the active version decrypt.
SELECT relation, column_name, "values" FROM pgphi.key_version_usage('states_key', 1);
SELECT count(*) AS active_decrypt FROM states_t WHERE decrypt_phi(v, 'states_key', ctx) = 'value ' || id;
-- Re-encrypting the replayed value needs it decrypted: refused until a
-- custodian un-retires the version.
CALL pgphi.reencrypt('states_replayed', 'v', context_column => 'ctx');
\echo :LAST_ERROR_SQLSTATE

-- Un-retiring: custodians only, retired versions only, audited.
SET SESSION AUTHORIZATION states_reader;
SELECT pgphi.unretire_key_version('states_key', 1);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION states_custodian_a;
SELECT pgphi.unretire_key_version('states_key', 2);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.unretire_key_version('states_key', 9);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.unretire_key_version('no_such_key', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.approve_destroy('states_key', 1);
SELECT pgphi.unretire_key_version('states_key', 1);
RESET SESSION AUTHORIZATION;
SELECT version, state, retired_at IS NULL AS retired_at_cleared FROM pgphi.key_versions
 WHERE key_id = :states_key_id ORDER BY version;
SELECT action, key_version, outcome, acting_role FROM pgphi.audit_log
 WHERE key_name = 'states_key' AND action = 'unretire';
-- Un-retiring voids the approvals given for the retired version.
SELECT count(*) AS approvals_left FROM pgphi.destroy_approvals WHERE key_id = :states_key_id;
SELECT decrypt_phi(v, 'states_key', ctx) FROM states_replayed;
CALL pgphi.reencrypt('states_replayed', 'v', context_column => 'ctx');
SELECT pgphi.retire_key_version('states_key', 1);

-- Destruction of the retired version, by two custodians. A rolled-back
-- destruction (whole transaction or savepoint) leaves the version and its
-- DEK as they were.
SET SESSION AUTHORIZATION states_custodian_a;
SELECT pgphi.approve_destroy('states_key', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION states_custodian_b;
SELECT pgphi.approve_destroy('states_key', 1);
BEGIN;
SELECT pgphi.destroy_key('states_key', 1);
ROLLBACK;
BEGIN;
SAVEPOINT s;
SELECT pgphi.destroy_key('states_key', 1);
ROLLBACK TO SAVEPOINT s;
COMMIT;
-- So is a destruction in a SERIALIZABLE transaction, whose commit could
-- still fail after the erasure.
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT pgphi.destroy_key('states_key', 1);
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- PREPARE TRANSACTION of a destruction is refused (the erasure happens at
-- commit, in the destroying session).
BEGIN;
SELECT pgphi.destroy_key('states_key', 1);
PREPARE TRANSACTION 'states_destroy';
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT version, state, wrapped_dek IS NOT NULL AS has_dek FROM pgphi.key_versions
 WHERE key_id = :states_key_id ORDER BY version;
SELECT pgphi.unretire_key_version('states_key', 1);
SELECT decrypt_phi(:'old_value'::pgphi.encrypted, 'states_key', 'ctx 1') AS dek_intact;
SELECT pgphi.retire_key_version('states_key', 1);
SET SESSION AUTHORIZATION states_custodian_a;
SELECT pgphi.approve_destroy('states_key', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION states_custodian_b;
SELECT pgphi.approve_destroy('states_key', 1);
SELECT pgphi.destroy_key('states_key', 1);
RESET SESSION AUTHORIZATION;
SELECT version, state, wrapped_dek IS NULL AS dek_erased, destroyed_at IS NOT NULL AS destroyed
  FROM pgphi.key_versions WHERE key_id = :states_key_id ORDER BY version;
SELECT decrypt_phi(:'old_value'::pgphi.encrypted, 'states_key', 'ctx 1');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.unretire_key_version('states_key', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.approve_destroy('states_key', 1);
\echo :LAST_ERROR_SQLSTATE

-- A destroyed version never leaves "destroyed": a superuser's direct DML,
-- with and without session_replication_role = replica, is refused. The
-- wrapped DEK used is a live one (version 2's), as an attacker would try.
SELECT wrapped_dek AS live_dek FROM pgphi.key_versions WHERE key_id = :states_key_id AND version = 2 \gset
CREATE FUNCTION states_try(role_mode text, statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('session_replication_role', role_mode, true);
    EXECUTE statement;
    PERFORM set_config('session_replication_role', 'origin', true);
    RETURN 'allowed';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
CREATE TEMP TABLE states_attacks AS
SELECT role_mode, attack, format(statement, :states_key_id, :'live_dek') AS statement FROM
  (VALUES ('origin'), ('replica')) m(role_mode),
  (VALUES ('state back to retired', $$UPDATE pgphi.key_versions SET state = 'retired', wrapped_dek = %2$L WHERE key_id = %1$s AND version = 1$$),
          ('state back to active', $$UPDATE pgphi.key_versions SET state = 'active', wrapped_dek = %2$L WHERE key_id = %1$s AND version = 1$$),
          ('state only', $$UPDATE pgphi.key_versions SET state = 'decrypt_only' WHERE key_id = %1$s AND version = 1$$),
          ('DEK only', $$UPDATE pgphi.key_versions SET wrapped_dek = %2$L WHERE key_id = %1$s AND version = 1$$),
          ('renumber the record', $$UPDATE pgphi.key_versions SET version = 99 WHERE key_id = %1$s AND version = 1$$),
          ('clear the time', $$UPDATE pgphi.key_versions SET destroyed_at = NULL WHERE key_id = %1$s AND version = 1$$),
          ('delete the record', $$DELETE FROM pgphi.key_versions WHERE key_id = %1$s AND version = 1$$),
          ('delete and re-insert', $$WITH d AS (DELETE FROM pgphi.key_versions WHERE key_id = %1$s AND version = 1 RETURNING *) INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek) SELECT key_id, version, 'retired', %2$L FROM d$$),
          ('upsert', $$INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek) VALUES (%1$s, 1, 'retired', %2$L) ON CONFLICT (key_id, version) DO UPDATE SET state = excluded.state, wrapped_dek = excluded.wrapped_dek$$),
          ('truncate', $$TRUNCATE pgphi.key_versions CASCADE$$)) a(attack, statement);
SELECT role_mode, attack,
       states_try(role_mode, statement) AS outcome
  FROM states_attacks ORDER BY role_mode, attack;
-- The same, as statements of their own (so the server log has them too).
SET session_replication_role = replica;
UPDATE pgphi.key_versions SET state = 'retired', wrapped_dek = :'live_dek'
 WHERE key_id = :states_key_id AND version = 1;
\echo :LAST_ERROR_SQLSTATE
DELETE FROM pgphi.key_versions WHERE key_id = :states_key_id AND version = 1;
\echo :LAST_ERROR_SQLSTATE
TRUNCATE pgphi.key_versions CASCADE;
\echo :LAST_ERROR_SQLSTATE
RESET session_replication_role;
SELECT version, state, wrapped_dek IS NULL AS dek_erased FROM pgphi.key_versions
 WHERE key_id = :states_key_id ORDER BY version;
SELECT decrypt_phi(:'old_value'::pgphi.encrypted, 'states_key', 'ctx 1');
\echo :LAST_ERROR_SQLSTATE

-- Generated from the catalog: every column of the destroyed version's row,
-- changed by a superuser (each change rolled back). The row's identity,
-- state, DEK and time of destruction are refused; the other columns hold no
-- key material. A column added to pgphi.key_versions shows up here.
CREATE FUNCTION states_try_rolled_back(statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE statement;
        RAISE EXCEPTION 'states: allowed';
    EXCEPTION WHEN OTHERS THEN
        RETURN CASE SQLERRM WHEN 'states: allowed' THEN 'allowed' ELSE SQLSTATE || ': ' || SQLERRM END;
    END;
END $$;
SELECT a.attname, a.atttypid::regtype AS type,
       states_try_rolled_back(format('UPDATE pgphi.key_versions SET %I = %s WHERE key_id = %s AND version = 1',
           a.attname,
           CASE a.atttypid
               WHEN 'integer'::regtype THEN format('%I + 1000', a.attname)
               WHEN 'text'::regtype THEN format($f$coalesce(%I, '') || 'x'$f$, a.attname)
               WHEN 'bytea'::regtype THEN quote_literal(:'live_dek')
               WHEN 'timestamptz'::regtype THEN format($f$coalesce(%I, now()) - interval '1 day'$f$, a.attname)
               WHEN 'name'::regtype THEN format($f$coalesce(%I, '') || 'x'$f$, a.attname)
           END, :states_key_id)) AS outcome
  FROM pg_attribute a
 WHERE a.attrelid = 'pgphi.key_versions'::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum;

-- The statistics of the key catalog never sample wrapped DEKs, and every
-- copy of a DEK is stored inside the row (never compressed or in TOAST).
ANALYZE pgphi.key_versions;
SELECT attname, attstattarget, attstorage FROM pg_attribute
 WHERE attrelid = 'pgphi.key_versions'::regclass AND attname = 'wrapped_dek';
SELECT count(*) AS wrapped_dek_statistics FROM pg_statistic s JOIN pg_attribute a
    ON a.attrelid = s.starelid AND a.attnum = s.staattnum
 WHERE s.starelid = 'pgphi.key_versions'::regclass AND a.attname = 'wrapped_dek';
SELECT count(*) > 0 AS other_columns_analyzed FROM pg_statistic WHERE starelid = 'pgphi.key_versions'::regclass;
