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

-- Crypto-shredding (finding 3). destroy_key sets wrapped_dek to NULL; every
-- older tuple version of the row still holds the wrapped DEK (left by the
-- destroying UPDATE, and by every rotation, rewrap and retirement before it),
-- and so does the free space of pages that VACUUM pruned. When a transaction
-- that destroys a version commits, pgphi._shred_at_commit overwrites all of
-- them in place, WAL-logged so standbys get the same pages (see
-- src/pg/shredding.cpp for why at pre-commit and how).
CREATE FUNCTION pgphi._shred_at_commit(key_id integer, version integer) RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_shred_at_commit' LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION pgphi._shred_at_commit(integer, integer) FROM PUBLIC;

-- Every copy of a wrapped DEK stays inside the row, where the overwrite
-- reaches it: PLAIN storage is never compressed nor moved to TOAST (a wrapped
-- DEK is at most a few hundred bytes). ANALYZE never samples the column, so
-- no histogram of pg_statistic holds a wrapped DEK; statistics that an older
-- version let it take are removed here (their dead tuples stay in
-- pg_statistic until VACUUM FULL pg_catalog.pg_statistic; the README says so).
ALTER TABLE pgphi.key_versions ALTER COLUMN wrapped_dek SET STORAGE PLAIN;
ALTER TABLE pgphi.key_versions ALTER COLUMN wrapped_dek SET STATISTICS 0;
DELETE FROM pg_catalog.pg_statistic s
 WHERE s.starelid OPERATOR(pg_catalog.=) 'pgphi.key_versions'::pg_catalog.regclass
   AND s.staattnum OPERATOR(pg_catalog.=)
       (SELECT a.attnum FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) 'pgphi.key_versions'::pg_catalog.regclass
           AND a.attname OPERATOR(pg_catalog.=) 'wrapped_dek');

-- A version never leaves "destroyed", whoever tries and by whatever path
-- (a superuser's UPDATE that puts a saved wrapped DEK back, a DELETE and
-- re-INSERT, replication apply): the row's identity, state, DEK and time of
-- destruction are frozen, and its record is kept. Any change that makes a
-- version destroyed, by destroy_key or by direct DML, schedules the erasure
-- of every stored copy of its wrapped DEK.
CREATE FUNCTION pgphi._key_version_guard() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT FROM pgphi.key_versions v WHERE v.state = 'destroyed') THEN
            RAISE EXCEPTION 'cannot truncate pgphi.key_versions: it records destroyed key versions'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'The record of a destroyed key version is kept.';
        END IF;
        RETURN NULL;
    END IF;
    IF OLD.state = 'destroyed' THEN
        IF TG_OP = 'DELETE' OR NEW.key_id IS DISTINCT FROM OLD.key_id OR NEW.version IS DISTINCT FROM OLD.version
           OR NEW.state IS DISTINCT FROM OLD.state OR NEW.wrapped_dek IS DISTINCT FROM OLD.wrapped_dek
           OR NEW.destroyed_at IS DISTINCT FROM OLD.destroyed_at THEN
            RAISE EXCEPTION 'pgphi key "%" version % has been destroyed',
                (SELECT k.name FROM pgphi.keys k WHERE k.key_id = OLD.key_id), OLD.version
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'A destroyed key version stays destroyed: its record is kept, and its key, '
                               'version, state, DEK and time of destruction cannot change.';
        END IF;
    ELSIF TG_OP = 'UPDATE' AND NEW.state = 'destroyed' THEN
        -- The erasure at commit cannot be undone, and under SERIALIZABLE the
        -- commit can still fail after it (PostgreSQL checks for
        -- serialization failures after the pre-commit callbacks). Not when
        -- a logical replication worker applies a destruction already made
        -- (under default_transaction_isolation = serializable it would
        -- retry for ever).
        IF pg_catalog.current_setting('transaction_isolation') = 'serializable'
           AND pg_catalog.current_setting('session_replication_role') <> 'replica' THEN
            RAISE EXCEPTION 'cannot destroy a pgphi key version in a SERIALIZABLE transaction'
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Destroy it in a READ COMMITTED or REPEATABLE READ transaction.';
        END IF;
        PERFORM pgphi._shred_at_commit(NEW.key_id, NEW.version);
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION pgphi._key_version_guard() FROM PUBLIC;
CREATE TRIGGER key_versions_guard BEFORE UPDATE OR DELETE ON pgphi.key_versions
    FOR EACH ROW EXECUTE FUNCTION pgphi._key_version_guard();
CREATE TRIGGER key_versions_guard_truncate BEFORE TRUNCATE ON pgphi.key_versions
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_version_guard();
-- Also under session_replication_role = replica.
ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_guard;
ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_guard_truncate;

-- Versions destroyed before this update left their wrapped DEKs in dead
-- tuples: erase them when the update commits.
SELECT pgphi._shred_at_commit(v.key_id, v.version)
  FROM pgphi.key_versions v WHERE v.state OPERATOR(pg_catalog.=) 'destroyed';

-- Only a retired version can be approved for destruction or destroyed
-- (finding 10): retirement is what proves that no value uses it. The active
-- version and decrypt-only versions are refused.
CREATE FUNCTION pgphi._require_retired(key_name text, key_id integer, version integer, for_update boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    state text;
BEGIN
    IF for_update THEN
        SELECT v.state INTO state FROM pgphi.key_versions v
         WHERE v.key_id = _require_retired.key_id AND v.version = _require_retired.version FOR UPDATE;
    ELSE
        SELECT v.state INTO state FROM pgphi.key_versions v
         WHERE v.key_id = _require_retired.key_id AND v.version = _require_retired.version;
    END IF;
    IF state IS NULL OR state = 'destroyed' THEN
        RAISE EXCEPTION 'pgphi key "%" has no version % to destroy', key_name, _require_retired.version
            USING ERRCODE = 'undefined_object';
    ELSIF state = 'active' THEN
        RAISE EXCEPTION 'pgphi key "%" version % is active', key_name, _require_retired.version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only a retired version, which no value uses any more, can be destroyed.',
                  HINT = 'Rotate the key, re-encrypt its values, then retire the version with pgphi.retire_key_version().';
    ELSIF state <> 'retired' THEN
        RAISE EXCEPTION 'pgphi key "%" version % is not retired', key_name, _require_retired.version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Only a retired version, which no value uses any more, can be destroyed.',
                  HINT = 'Re-encrypt its values, then retire the version with pgphi.retire_key_version().';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pgphi._require_retired(text, integer, integer, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgphi.approve_destroy(name text, version integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(approve_destroy.name);
    approver name := session_user;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT pg_catalog.pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve destroying a key'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    PERFORM pgphi._require_retired(approve_destroy.name, target_id, approve_destroy.version, false);
    INSERT INTO pgphi.destroy_approvals (key_id, version, approved_by)
        VALUES (target_id, approve_destroy.version, approver)
        ON CONFLICT ON CONSTRAINT destroy_approvals_pkey DO UPDATE SET approved_at = pg_catalog.now();
END
$$;

-- Crypto-shredding: erases a retired key version's wrapped DEK (every stored
-- copy of it, when this commits) and drops it from every cache. Values under
-- it can never be decrypted again.
CREATE OR REPLACE FUNCTION pgphi.destroy_key(name text, version integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(destroy_key.name);
    approvers name[];
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    END IF;
    -- Locks the row: nobody un-retires, rewraps or destroys it meanwhile.
    PERFORM pgphi._require_retired(destroy_key.name, target_id, destroy_key.version, true);
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
    -- The guard trigger schedules the erasure of every older copy of the
    -- wrapped DEK at commit (pgphi._shred_at_commit).
    UPDATE pgphi.key_versions v SET state = 'destroyed', wrapped_dek = NULL, destroyed_at = pg_catalog.now()
     WHERE v.key_id = target_id AND v.version = destroy_key.version;
    DELETE FROM pgphi.destroy_approvals a WHERE a.key_id = target_id AND a.version = destroy_key.version;
    -- Wipe the plaintext DEK from shared memory and every session once this
    -- commits (before, a concurrent decrypt could load it again).
    PERFORM pgphi._flush_cache_at_commit();
END
$$;

-- Retired means refused for decryption (finding 9, like Vault's
-- min_decryption_version): a value replayed into a table under a retired
-- version does not decrypt. A custodian who needs such values back (to
-- re-encrypt them) un-retires the version; that is audited, and it voids the
-- version's approvals for destruction. A destroyed version cannot come back.
CREATE FUNCTION pgphi.unretire_key_version(name text, version integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(unretire_key_version.name);
    state text;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    END IF;
    SELECT v.state INTO state FROM pgphi.key_versions v
     WHERE v.key_id = target_id AND v.version = unretire_key_version.version FOR UPDATE;
    IF state IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" has no version %', unretire_key_version.name, unretire_key_version.version
            USING ERRCODE = 'undefined_object';
    ELSIF state = 'destroyed' THEN
        RAISE EXCEPTION 'pgphi key "%" version % has been destroyed', unretire_key_version.name,
            unretire_key_version.version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A destroyed key version stays destroyed.';
    ELSIF state <> 'retired' THEN
        RAISE EXCEPTION 'pgphi key "%" version % is not retired', unretire_key_version.name,
            unretire_key_version.version
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE pgphi.key_versions v SET state = 'decrypt_only', retired_at = NULL
     WHERE v.key_id = target_id AND v.version = unretire_key_version.version;
    DELETE FROM pgphi.destroy_approvals a
     WHERE a.key_id = target_id AND a.version = unretire_key_version.version;
    PERFORM pgphi._audit('unretire', target_id, unretire_key_version.version, 'ok', NULL);
END
$$;
REVOKE ALL ON FUNCTION pgphi.unretire_key_version(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.unretire_key_version(text, integer) TO pgphi_key_custodian;

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
