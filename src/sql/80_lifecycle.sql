-- The life of a key version: retirement, destruction, crypto-shredding.
--
-- active -> decrypt_only (rotate_key) -> retired (retire_key_version, once a
-- scan of the database finds no value under it; refused for decryption, and
-- reversible with unretire_key_version) -> destroyed (destroy_key, with the
-- approval of two key custodians: its wrapped DEK is erased, every stored copy
-- of it shredded at commit, and it never comes back).

-- How many values of every encrypted or bytea column in this database use a
-- key version (for a blind-index key, the bytea columns holding values of
-- its shape), with every relation's owner. Scans every such column and
-- returns counts only. It waits at most lock_wait for each relation's lock
-- and reports the relations it could not scan, never skipping one silently.
-- On Citus, a distributed or reference table is counted through Citus, which
-- runs the count on every shard (a worker that cannot answer makes it "not
-- scanned"); the shards themselves, ordinary tables on the node that holds
-- them, are skipped, being counted through their table.
CREATE FUNCTION pgphi.key_version_usage(name text, version integer, lock_wait interval DEFAULT interval '2s')
    RETURNS TABLE (relation regclass, column_name name, "values" bigint, owner name, not_scanned text)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s'
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_version_usage.name);
    blind_index boolean;
    version_of text;
    c record;
    n bigint;
    citus boolean := to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL;
    citus_shard boolean;
    distributed boolean := false;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF lock_wait IS NULL OR lock_wait <= interval '0' THEN
        RAISE EXCEPTION 'lock_wait must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Until this function returns (its SET clause restores the setting).
    PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM lock_wait) * 1000))::bigint::text, true);
    blind_index := pgphi._key_purpose(target_id) = 'blind_index';
    version_of := CASE WHEN blind_index THEN 'pgphi._blind_index_version_of' ELSE 'pgphi._key_version_of' END;
    FOR c IN SELECT a.attrelid::regclass AS rel, a.attname, pg_get_userbyid(r.relowner) AS relowner
               FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
               JOIN pg_namespace s ON s.oid = r.relnamespace
              WHERE r.relkind IN ('r', 'm') AND a.attnum > 0 AND NOT a.attisdropped
                AND (a.atttypid = 'bytea'::regtype OR (NOT blind_index AND a.atttypid = 'pgphi.encrypted'::regtype))
                AND s.nspname NOT IN ('pg_catalog', 'information_schema', 'pgphi')
                AND s.nspname NOT LIKE 'pg_toast%' AND s.nspname NOT LIKE 'pg_temp%'
              ORDER BY 1, 2
    LOOP
        relation := c.rel; column_name := c.attname; owner := c.relowner;
        "values" := NULL; not_scanned := NULL;
        IF citus THEN
            EXECUTE 'SELECT pg_catalog.relation_is_a_known_shard($1)' INTO citus_shard USING c.rel;
            CONTINUE WHEN citus_shard;
            distributed := pgphi._citus_table_kind(c.rel) IS NOT NULL;
        END IF;
        BEGIN
            EXECUTE format('SELECT count(*) FROM %s%s WHERE %s(%I::bytea, $1) = $2',
                           CASE WHEN distributed THEN '' ELSE 'ONLY ' END, c.rel, version_of, c.attname)
                INTO n USING target_id, key_version_usage.version;
        EXCEPTION
            WHEN lock_not_available THEN
                not_scanned := format('lock not available within %s', lock_wait);
            WHEN OTHERS THEN
                -- Only the SQLSTATE: the message might quote data.
                IF NOT EXISTS (SELECT FROM pg_class x WHERE x.oid = c.rel::oid) THEN
                    CONTINUE;   -- dropped since the list was read: it holds nothing
                END IF;
                not_scanned := format('scan failed with SQLSTATE %s', SQLSTATE);
        END;
        IF not_scanned IS NOT NULL THEN
            RETURN NEXT;
        ELSIF n > 0 THEN
            "values" := n;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- Marks a decrypt-only version retired once a scan of the whole database
-- finds no value under it; refuses otherwise, naming relation and owner.
-- Retirement that nobody can block: a custodian can retire anyway by naming
-- relations to ignore, with a reason; that decision is audited (action
-- retire_ignoring).
CREATE FUNCTION pgphi.retire_key_version(name text, version integer, ignore_relations regclass[] DEFAULT NULL,
                                         reason text DEFAULT NULL, lock_wait interval DEFAULT interval '2s')
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(retire_key_version.name);
    ignoring oid[] := coalesce(retire_key_version.ignore_relations::oid[], '{}');
    state text;
    u record;
    remaining bigint := 0;
    places text[] := '{}';
    unscanned text[] := '{}';
    ignored text[] := '{}';
    ignored_seen oid[] := '{}';
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
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
    IF cardinality(ignoring) > 0 AND coalesce(btrim(retire_key_version.reason), '') = '' THEN
        RAISE EXCEPTION 'retiring a pgphi key version while ignoring relations needs a reason'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass reason => why the values in those relations need not be re-encrypted; it is audited.';
    END IF;

    FOR u IN SELECT * FROM pgphi.key_version_usage(retire_key_version.name, retire_key_version.version,
                                                   retire_key_version.lock_wait) LOOP
        IF u.relation::oid = ANY (ignoring) THEN
            ignored_seen := ignored_seen || u.relation::oid;
            ignored := ignored || format('%s.%I (owner %s): %s', u.relation, u.column_name, u.owner,
                                         coalesce(u."values"::text || ' values', u.not_scanned));
        ELSIF u.not_scanned IS NOT NULL THEN
            unscanned := unscanned || format('%s.%I (owner %s): %s', u.relation, u.column_name, u.owner, u.not_scanned);
        ELSE
            remaining := remaining + u."values";
            places := places || format('%s.%I (owner %s): %s', u.relation, u.column_name, u.owner, u."values");
        END IF;
    END LOOP;
    IF remaining > 0 THEN
        RAISE EXCEPTION 'pgphi key "%" version % is still used by % values', retire_key_version.name,
            retire_key_version.version, remaining
            USING ERRCODE = 'object_in_use', DETAIL = array_to_string(places, ', '),
                  HINT = 'Re-encrypt those columns with CALL pgphi.reencrypt(...) first. Values that are not to be kept (a table of someone else''s making, forged values) can be left behind: retire_key_version(..., ignore_relations => ARRAY[...]::regclass[], reason => ...), which is audited.';
    END IF;
    IF cardinality(unscanned) > 0 THEN
        RAISE EXCEPTION 'pgphi key "%" version % could not be checked in % columns', retire_key_version.name,
            retire_key_version.version, cardinality(unscanned)
            USING ERRCODE = 'lock_not_available', DETAIL = array_to_string(unscanned, ', '),
                  HINT = 'Retry once the locks are released (or with a longer lock_wait), or name the relations in ignore_relations with a reason, which is audited.';
    END IF;
    UPDATE pgphi.key_versions v SET state = 'retired', retired_at = now()
     WHERE v.key_id = target_id AND v.version = retire_key_version.version;
    IF cardinality(ignoring) > 0 THEN
        PERFORM pgphi._audit('retire_ignoring', target_id, retire_key_version.version, 'ok',
            format('ignored %s; reason: %s',
                   array_to_string(ignored || ARRAY(
                       SELECT format('%s: no values found', i::regclass) FROM unnest(ignoring) i
                        WHERE i <> ALL (ignored_seen))
                   , ', '),
                   retire_key_version.reason));
    END IF;
END
$$;

-- Deactivation (NIST SP 800-57's "deactivated"): the key's active version
-- becomes decrypt-only, so the key encrypts nothing from the next statement
-- on, in every session, while its values still decrypt. It is how a key
-- reaches its end: each version can then be retired and destroyed, the last
-- one taking a dedicated KEK with it. rotate_key makes a new active version.
-- Returns the version deactivated, NULL when none was active. Audited as
-- deactivate.
CREATE FUNCTION pgphi.deactivate_key(name text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(deactivate_key.name);
    deactivated integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    PERFORM FROM pgphi.keys k WHERE k.key_id = target_id FOR UPDATE;
    UPDATE pgphi.key_versions v SET state = 'decrypt_only'
     WHERE v.key_id = target_id AND v.state = 'active'
    RETURNING v.version INTO deactivated;
    IF deactivated IS NOT NULL THEN
        PERFORM pgphi._audit('deactivate', target_id, deactivated, 'ok',
                             'the key encrypts nothing until pgphi.rotate_key makes a new active version');
    END IF;
    RETURN deactivated;
END
$$;

-- Retired means refused for decryption (like Vault's
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

-- Only a retired version can be approved for destruction or destroyed:
-- retirement is what proves that no value uses it. The active version and
-- decrypt-only versions are refused.
CREATE FUNCTION pgphi._require_retired(key_name text, key_id integer, version integer, for_update boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    state text;
    -- The catalog's name of the key, not the argument: nothing a caller
    -- passes is repeated in a message.
    key_name text := pgphi._key_name(_require_retired.key_id);
BEGIN
    IF for_update THEN
        SELECT v.state INTO state FROM pgphi.key_versions v
         WHERE v.key_id = _require_retired.key_id AND v.version = _require_retired.version FOR UPDATE;
    ELSE
        SELECT v.state INTO state FROM pgphi.key_versions v
         WHERE v.key_id = _require_retired.key_id AND v.version = _require_retired.version;
    END IF;
    IF key_name IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    ELSIF state IS NULL OR state = 'destroyed' THEN
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

CREATE FUNCTION pgphi.approve_destroy(name text, version integer) RETURNS void
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
CREATE FUNCTION pgphi.destroy_key(name text, version integer) RETURNS void
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
    PERFORM pgphi._delete_dedicated_kek_if_unused(target_id);
END
$$;

-- True crypto-shredding (create_key(..., dedicated_kek => true)): once no
-- version of the key has a wrapped DEK left, its KEK is deleted in the key
-- manager (KMS: scheduled for deletion), so that the copies of its wrapped
-- DEKs in backups and WAL archives can never be unwrapped. Called last by
-- destroy_key: when the key manager fails, the destruction rolls back, and
-- a retry finds a KEK already deleted and completes.
CREATE FUNCTION pgphi._delete_dedicated_kek_if_unused(target_id integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
BEGIN
    SELECT * INTO key FROM pgphi.keys k
     WHERE k.key_id = target_id AND k.kek_dedicated AND k.kek_deleted_at IS NULL FOR UPDATE;
    IF NOT FOUND OR EXISTS (SELECT FROM pgphi.key_versions v
                             WHERE v.key_id = target_id AND v.wrapped_dek IS NOT NULL) THEN
        RETURN;
    END IF;
    UPDATE pgphi.keys k
       SET kek_deletion = pgphi._delete_dedicated_kek(key.provider, key.kek_ref, key.key_id, key.name),
           kek_deleted_at = pg_catalog.now()
     WHERE k.key_id = target_id;
END
$$;

-- The facts of a destruction that its audit record keeps for the
-- destruction certificate (pgphi.destruction_certificate): the custodians
-- whose approvals count (as destroy_key counts them: within the last day,
-- custodians still) and a last scan of the database for values under the
-- version, made by the audit trigger as the version becomes destroyed (by
-- destroy_key or by direct DML). The scan is key_version_usage's; values
-- found do not stop the destruction (the version is retired: nothing
-- decrypts them any more), they are recorded. The text's form is fixed,
-- since pgphi._destruction_certificate_body reads it back:
--   approved by <custodians, quote_ident, or nobody>; checked at destruction:
--   <n> values under the version in <n> columns scanned, <n> columns not
--   scanned[; found: ...][; not scanned: ...]
CREATE FUNCTION pgphi._destruction_check(key_id integer, version integer) RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    approvers text;
    blind_index boolean := pgphi._key_purpose(_destruction_check.key_id) = 'blind_index';
    columns bigint;
    found bigint := 0;
    places text[] := '{}';
    unscanned text[] := '{}';
    u record;
BEGIN
    SELECT string_agg(quote_ident(a.approved_by), ', ' ORDER BY a.approved_by) INTO approvers
      FROM pgphi.destroy_approvals a JOIN pg_roles r ON r.rolname = a.approved_by
     WHERE a.key_id = _destruction_check.key_id AND a.version = _destruction_check.version
       AND a.approved_at > now() - interval '1 day'
       AND pg_has_role(r.oid, 'pgphi_key_custodian', 'MEMBER');
    -- The columns key_version_usage scans (the same filter).
    SELECT count(*) INTO columns
      FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
      JOIN pg_namespace s ON s.oid = r.relnamespace
     WHERE r.relkind IN ('r', 'm') AND a.attnum > 0 AND NOT a.attisdropped
       AND (a.atttypid = 'bytea'::regtype OR (NOT blind_index AND a.atttypid = 'pgphi.encrypted'::regtype))
       AND s.nspname NOT IN ('pg_catalog', 'information_schema', 'pgphi')
       AND s.nspname NOT LIKE 'pg_toast%' AND s.nspname NOT LIKE 'pg_temp%';
    FOR u IN SELECT * FROM pgphi.key_version_usage(pgphi._key_name(_destruction_check.key_id),
                                                   _destruction_check.version) LOOP
        IF u.not_scanned IS NOT NULL THEN
            unscanned := unscanned || format('%s.%I (owner %s): %s', u.relation, u.column_name, u.owner, u.not_scanned);
        ELSE
            found := found + u."values";
            places := places || format('%s.%I (owner %s): %s', u.relation, u.column_name, u.owner, u."values");
        END IF;
    END LOOP;
    RETURN format('approved by %s; checked at destruction: %s values under the version in %s columns scanned, '
                  '%s columns not scanned', coalesce(approvers, 'nobody'), found,
                  greatest(columns - cardinality(unscanned), 0), cardinality(unscanned))
           || CASE WHEN cardinality(places) > 0 THEN '; found: ' || array_to_string(places, ', ') ELSE '' END
           || CASE WHEN cardinality(unscanned) > 0 THEN '; not scanned: ' || array_to_string(unscanned, ', ')
                   ELSE '' END;
END
$$;

-- Crypto-shredding. destroy_key sets wrapped_dek to NULL; every
-- older tuple version of the row still holds the wrapped DEK (left by the
-- destroying UPDATE, and by every rotation, rewrap and retirement before it),
-- and so does the free space of pages that VACUUM pruned. When a transaction
-- that destroys a version commits, pgphi._shred_at_commit overwrites all of
-- them in place, WAL-logged so standbys get the same pages (see
-- src/pg/functions/shredding.cpp for why at pre-commit and how).
CREATE FUNCTION pgphi._shred_at_commit(key_id integer, version integer) RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_shred_at_commit' LANGUAGE C VOLATILE STRICT;

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

CREATE TRIGGER key_versions_guard BEFORE UPDATE OR DELETE ON pgphi.key_versions
    FOR EACH ROW EXECUTE FUNCTION pgphi._key_version_guard();
CREATE TRIGGER key_versions_guard_truncate BEFORE TRUNCATE ON pgphi.key_versions
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_version_guard();

-- Also under session_replication_role = replica.
ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_guard;

ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_guard_truncate;

GRANT EXECUTE ON FUNCTION pgphi.key_version_usage(text, integer, interval), pgphi.deactivate_key(text),
    pgphi.retire_key_version(text, integer, regclass[], text, interval),
    pgphi.unretire_key_version(text, integer), pgphi.approve_destroy(text, integer),
    pgphi.destroy_key(text, integer) TO pgphi_key_custodian;


-- Containment and just-in-time access (docs/key-lifecycle.md): suspension and
-- resumption, compromised versions, time-limited grants, and the evidence an
-- auditor takes away.
-- Key lifecycle: suspension, compromise and time-limited grants.
------------------------------------------------------------------------------

-- What each function serves in the key-management practice, and how it
-- behaves, is in docs/key-lifecycle.md.
--
-- Suspension (containment). One custodian suspends a key (every version,
-- also ones rotated in later) or one version; from the next statement of
-- every session, on the primary and its standbys, nothing is encrypted or
-- decrypted under it: the C lookup (src/pg/shared/key_access.cpp) reads the marks
-- with the key's catalog row, a suspended version never enters a session's
-- key ring, and suspending drops every cached DEK from shared memory and
-- every ring when it commits (so statements already running on the primary
-- stop too). Lifting it takes two custodians: one approves, another resumes.

-- Approvals to lift a suspension; version 0 stands for the whole key.
CREATE TABLE pgphi.resume_approvals (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    version     integer NOT NULL CHECK (version >= 0),
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version, approved_by)
);
REVOKE ALL ON pgphi.resume_approvals FROM PUBLIC;
GRANT SELECT ON pgphi.resume_approvals TO pgphi_key_custodian, pgphi_key_auditor;

-- The key and version a lifecycle function acts on. A NULL version means
-- the whole key (returned as 0). Nothing the caller typed is repeated in a
-- message unless it names a key.
CREATE FUNCTION pgphi._lifecycle_target(key_name text, version integer, OUT key_id integer, OUT target_version integer,
        OUT state text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    key_id := pgphi._key_id(key_name);
    IF key_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.',
                  DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    target_version := coalesce(_lifecycle_target.version, 0);
    IF _lifecycle_target.version IS NULL THEN
        RETURN;
    END IF;
    SELECT v.state INTO state FROM pgphi.key_versions v
     WHERE v.key_id = _lifecycle_target.key_id AND v.version = _lifecycle_target.version;
    IF state IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" has no version %', pgphi._key_name(_lifecycle_target.key_id),
            _lifecycle_target.version
            USING ERRCODE = 'undefined_object';
    ELSIF state = 'destroyed' THEN
        RAISE EXCEPTION 'pgphi key "%" version % has been destroyed', pgphi._key_name(_lifecycle_target.key_id),
            _lifecycle_target.version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Nothing can use a destroyed key version any more.';
    END IF;
END
$$;

-- When the key (version 0) or the version was suspended, or NULL.
CREATE FUNCTION pgphi._suspended_at(key_id integer, version integer) RETURNS timestamptz
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN _suspended_at.version = 0
                THEN (SELECT k.suspended_at FROM pgphi.keys k WHERE k.key_id = _suspended_at.key_id)
                ELSE (SELECT v.suspended_at FROM pgphi.key_versions v
                       WHERE v.key_id = _suspended_at.key_id AND v.version = _suspended_at.version) END
$$;

-- Suspends a key (version NULL: all of its versions) or one version. One
-- key custodian suffices: in an incident, speed matters. Audited as
-- suspend, with the reason. Suspending what is suspended changes nothing.
CREATE FUNCTION pgphi.suspend_key(name text, version integer DEFAULT NULL, reason text DEFAULT NULL)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := pgphi._lifecycle_target(suspend_key.name, suspend_key.version);
    changed integer;
BEGIN
    IF t.target_version = 0 THEN
        UPDATE pgphi.keys k SET suspended_at = now(), suspended_by = session_user
         WHERE k.key_id = t.key_id AND k.suspended_at IS NULL;
    ELSE
        UPDATE pgphi.key_versions v SET suspended_at = now(), suspended_by = session_user
         WHERE v.key_id = t.key_id AND v.version = t.target_version AND v.suspended_at IS NULL;
    END IF;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed = 0 THEN
        RETURN false;
    END IF;
    -- A new suspension voids approvals given for an earlier one.
    DELETE FROM pgphi.resume_approvals a WHERE a.key_id = t.key_id AND a.version = t.target_version;
    PERFORM pgphi._audit('suspend', t.key_id, nullif(t.target_version, 0), 'ok',
                         CASE WHEN t.target_version = 0 THEN 'every version' ELSE 'this version' END
                         || coalesce('; reason: ' || suspend_key.reason, ''));
    -- At commit: drop every cached DEK from shared memory and every
    -- session, so that statements already running stop at their next value.
    PERFORM pgphi._flush_cache_at_commit();
    RETURN true;
END
$$;

-- The first of the two custodians who lift a suspension: an approval, good
-- for a day, for another custodian's resume_key. Audited as approve_resume.
CREATE FUNCTION pgphi.approve_resume(name text, version integer DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := pgphi._lifecycle_target(approve_resume.name, approve_resume.version);
    approver name := session_user;
BEGIN
    IF NOT pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve resuming a pgphi key'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    IF pgphi._suspended_at(t.key_id, t.target_version) IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%"% is not suspended', pgphi._key_name(t.key_id),
            CASE WHEN t.target_version = 0 THEN '' ELSE ' version ' || t.target_version END
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'A suspension of the whole key is lifted with version => NULL, of one version with its number.';
    END IF;
    INSERT INTO pgphi.resume_approvals (key_id, version, approved_by)
        VALUES (t.key_id, t.target_version, approver)
        ON CONFLICT ON CONSTRAINT resume_approvals_pkey DO UPDATE SET approved_at = now();
    PERFORM pgphi._audit('approve_resume', t.key_id, nullif(t.target_version, 0), 'ok',
                         CASE WHEN t.target_version = 0 THEN 'every version' ELSE 'this version' END);
END
$$;

-- Lifts a suspension: a key custodian other than the one who approved it
-- (pgphi.approve_resume, within the last day). Audited as resume, naming
-- both custodians.
CREATE FUNCTION pgphi.resume_key(name text, version integer DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := pgphi._lifecycle_target(resume_key.name, resume_key.version);
    resumer name := session_user;
    approvers name[];
BEGIN
    IF NOT pg_has_role(resumer, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can resume a pgphi key'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the resuming role.';
    END IF;
    IF t.target_version = 0 THEN
        PERFORM FROM pgphi.keys k WHERE k.key_id = t.key_id FOR UPDATE;
    ELSE
        PERFORM FROM pgphi.key_versions v WHERE v.key_id = t.key_id AND v.version = t.target_version FOR UPDATE;
    END IF;
    IF pgphi._suspended_at(t.key_id, t.target_version) IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%"% is not suspended', pgphi._key_name(t.key_id),
            CASE WHEN t.target_version = 0 THEN '' ELSE ' version ' || t.target_version END
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'A suspension of the whole key is lifted with version => NULL, of one version with its number.';
    END IF;
    SELECT array_agg(a.approved_by ORDER BY a.approved_by) INTO approvers
      FROM pgphi.resume_approvals a
     WHERE a.key_id = t.key_id AND a.version = t.target_version AND a.approved_by <> resumer
       AND a.approved_at > now() - interval '1 day'
       AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
    IF approvers IS NULL THEN
        RAISE EXCEPTION 'resuming pgphi key "%" needs the approval of a second key custodian', pgphi._key_name(t.key_id)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Another member of pgphi_key_custodian must call pgphi.approve_resume() first (within a day).';
    END IF;
    IF t.target_version = 0 THEN
        UPDATE pgphi.keys k SET suspended_at = NULL, suspended_by = NULL WHERE k.key_id = t.key_id;
    ELSE
        UPDATE pgphi.key_versions v SET suspended_at = NULL, suspended_by = NULL
         WHERE v.key_id = t.key_id AND v.version = t.target_version;
    END IF;
    DELETE FROM pgphi.resume_approvals a WHERE a.key_id = t.key_id AND a.version = t.target_version;
    PERFORM pgphi._audit('resume', t.key_id, nullif(t.target_version, 0), 'ok',
                         format('%s; approved by %s, resumed by %s',
                                CASE WHEN t.target_version = 0 THEN 'every version' ELSE 'this version' END,
                                array_to_string(approvers, ', '), resumer));
END
$$;

-- Marks a version compromised, for good: nothing is encrypted under it
-- again, and its values are decrypted only by reencrypt_value (so by
-- pgphi.reencrypt), which seals them at once under the active version. A
-- compromised active version stops encryption under the key until
-- rotate_key makes a new one. One custodian suffices. Audited as compromise.
CREATE FUNCTION pgphi.mark_compromised(name text, version integer, reason text DEFAULT NULL) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    changed integer;
BEGIN
    IF mark_compromised.version IS NULL THEN
        RAISE EXCEPTION 'mark_compromised needs a key version'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'pgphi.key_inventory lists the versions.';
    END IF;
    t := pgphi._lifecycle_target(mark_compromised.name, mark_compromised.version);
    UPDATE pgphi.key_versions v SET compromised_at = now(), compromised_by = session_user
     WHERE v.key_id = t.key_id AND v.version = t.target_version AND v.compromised_at IS NULL;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed = 0 THEN
        RETURN false;
    END IF;
    PERFORM pgphi._audit('compromise', t.key_id, t.target_version, 'ok',
                         format('version was %s', t.state) || coalesce('; reason: ' || mark_compromised.reason, ''));
    IF t.state = 'active' THEN
        RAISE WARNING 'pgphi key "%" version % is active and now compromised: nothing is encrypted under the key until it is rotated',
            pgphi._key_name(t.key_id), t.target_version
            USING HINT = 'Run pgphi.rotate_key(), then CALL pgphi.reencrypt() on the columns that use the key.';
    END IF;
    PERFORM pgphi._flush_cache_at_commit();
    RETURN true;
END
$$;

-- A compromise mark is never taken back, nor its record deleted.
CREATE FUNCTION pgphi._compromise_guard() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF OLD.compromised_at IS NOT NULL
       AND (TG_OP = 'DELETE' OR NEW.compromised_at IS DISTINCT FROM OLD.compromised_at
            OR NEW.compromised_by IS DISTINCT FROM OLD.compromised_by) THEN
        RAISE EXCEPTION 'pgphi key "%" version % is marked compromised', pgphi._key_name(OLD.key_id), OLD.version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A compromise mark and its record are kept for good.';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER key_versions_compromise_guard BEFORE UPDATE OR DELETE ON pgphi.key_versions
    FOR EACH ROW EXECUTE FUNCTION pgphi._compromise_guard();
ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_compromise_guard;

-- The inventory shows both marks (new columns at the end).

-- Time-limited grants (just-in-time access). A grant with valid_until
-- stops working at that moment in every session, also inside a statement
-- that started before it (src/pg/policy/access_control.cpp checks the clock for
-- such grants), without anyone revoking it. The expiry reaches the audit
-- trail twice: at the first use it refuses (action decrypt or encrypt,
-- outcome refused, detail "... grant expired", through the audit writer),
-- and when pgphi.expire_key_grants() (to be scheduled, for instance every
-- few minutes with pg_cron) removes the expired rows (action
-- expire_decrypt or expire_encrypt).


-- A time in audit details: UTC, ISO 8601, whatever the session's settings.
CREATE FUNCTION pgphi._audit_time(t timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') $$;

CREATE FUNCTION pgphi.grant_decrypt(key_name text, grantee regrole, valid_until timestamptz) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', true, valid_until) $$;
CREATE FUNCTION pgphi.grant_encrypt(key_name text, grantee regrole, valid_until timestamptz) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', true, valid_until) $$;

-- Removes the grants that have expired; returns how many. Each is audited
-- as expire_decrypt or expire_encrypt (by the audit trigger below).
CREATE FUNCTION pgphi.expire_key_grants() RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    removed integer;
BEGIN
    DELETE FROM pgphi.key_grant_members m USING pgphi.key_grants g
     WHERE g.valid_until <= now() AND m.key_id = g.key_id AND m.privilege = g.privilege
       AND m.grantee::oid = g.grantee::oid;
    DELETE FROM pgphi.key_grants g WHERE g.valid_until <= now();
    GET DIAGNOSTICS removed = ROW_COUNT;
    -- And the records of roles that left a grantee (a REVOKE made while
    -- connected to another database: this one's utility hook did not see it).
    PERFORM pgphi._prune_grant_members();
    RETURN removed;
END
$$;

-- The semantic audit records of catalog changes (0.2.0), with the expiry
-- of time-limited grants.

-- has_key_privilege (section "privileges") counts only grants in force.

-- Evidence for an auditor: who can use which key, through which grant and
-- role chain, granted when and by whom, in force until when, and when each
-- role last used the key (pgphi.key_use_stats). Readable by custodians and
-- auditors. in_force is false for a grant past its valid_until, and for a
-- role that joined the grantee after the grant and was not approved since.
CREATE FUNCTION pgphi.access_review(
        OUT key_name text, OUT privilege text, OUT role_name text, OUT via_grant_to text, OUT role_chain text,
        OUT granted_at timestamptz, OUT granted_by name, OUT valid_until timestamptz, OUT in_force boolean,
        OUT last_used timestamptz)
    RETURNS SETOF record
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE chain(member, grantee, path) AS (
        SELECT g.grantee::oid, g.grantee::oid, ARRAY[g.grantee::oid]
          FROM (SELECT DISTINCT grantee FROM pgphi.key_grants) g
        UNION ALL
        SELECT m.member, c.grantee, m.member || c.path
          FROM chain c JOIN pg_auth_members m ON m.roleid = c.member
         WHERE m.member <> ALL (c.path)
    )
    SELECT k.name, g.privilege, r.rolname::text, g.grantee::text,
           (SELECT string_agg(pr.rolname::text, ' -> ' ORDER BY p.n)
              FROM unnest(c.path) WITH ORDINALITY AS p(oid, n) JOIN pg_roles pr ON pr.oid = p.oid),
           g.granted_at, g.granted_by, g.valid_until,
           (g.valid_until IS NULL OR g.valid_until > clock_timestamp())
           AND (c.member = g.grantee::oid
                OR EXISTS (SELECT FROM pgphi.key_grant_members m
                            WHERE m.key_id = g.key_id AND m.privilege = g.privilege
                              AND m.grantee::oid = g.grantee::oid AND m.member::oid = c.member)),
           (SELECT max(s.window_start) FROM pgphi.key_use_stats s
             WHERE s.key_id = g.key_id AND s.role_name = r.rolname::text
               AND CASE g.privilege WHEN 'decrypt' THEN s.decryptions ELSE s.encryptions END > 0)
      FROM pgphi.key_grants g
      JOIN pgphi.keys k ON k.key_id = g.key_id
      JOIN chain c ON c.grantee = g.grantee::oid
      JOIN pg_roles r ON r.oid = c.member
     WHERE pg_has_role(c.member, g.grantee::oid, 'USAGE')
     ORDER BY 1, 2, 3, 4
$$;

-- Evidence for an auditor: per key and version, when it was created, when
-- a newer version superseded it, retired, destroyed; its cryptoperiod and
-- whether its rotation is overdue; how many values it has sealed (the
-- cluster-wide seal counts); and its suspension and compromise marks. How
-- many values are still under a version is key_version_usage()'s answer
-- (it scans the tables, so it is not part of this report).
CREATE FUNCTION pgphi.rotation_report(
        OUT key_name text, OUT version integer, OUT state text, OUT created_at timestamptz,
        OUT superseded_at timestamptz, OUT retired_at timestamptz, OUT destroyed_at timestamptz,
        OUT cryptoperiod interval, OUT rotate_by timestamptz, OUT rotation_overdue boolean,
        OUT values_sealed bigint, OUT suspended boolean, OUT compromised boolean)
    RETURNS SETOF record
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.name, v.version, v.state, v.created_at,
           (SELECT min(n.created_at) FROM pgphi.key_versions n WHERE n.key_id = v.key_id AND n.version > v.version),
           v.retired_at, v.destroyed_at, k.cryptoperiod,
           CASE WHEN v.state = 'active' THEN v.created_at + k.cryptoperiod END,
           coalesce(v.state = 'active' AND v.created_at + k.cryptoperiod < now(), false),
           coalesce((SELECT u.encryptions FROM pgphi._usage_counts() u
                      WHERE u.key_id = v.key_id AND u.version = v.version), 0),
           k.suspended_at IS NOT NULL OR v.suspended_at IS NOT NULL,
           v.compromised_at IS NOT NULL
      FROM pgphi.keys k JOIN pgphi.key_versions v ON v.key_id = k.key_id
     ORDER BY k.name, v.version
$$;

REVOKE ALL ON FUNCTION pgphi._lifecycle_target(text, integer), pgphi._suspended_at(integer, integer),
    pgphi.suspend_key(text, integer, text), pgphi.approve_resume(text, integer), pgphi.resume_key(text, integer),
    pgphi.mark_compromised(text, integer, text), pgphi._compromise_guard(),
    pgphi._change_key_grant(text, regrole, text, boolean, timestamptz), pgphi._audit_time(timestamptz),
    pgphi.grant_decrypt(text, regrole, timestamptz), pgphi.grant_encrypt(text, regrole, timestamptz),
    pgphi.expire_key_grants(), pgphi.access_review(), pgphi.rotation_report() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.suspend_key(text, integer, text), pgphi.approve_resume(text, integer),
    pgphi.resume_key(text, integer), pgphi.mark_compromised(text, integer, text),
    pgphi.grant_decrypt(text, regrole, timestamptz), pgphi.grant_encrypt(text, regrole, timestamptz),
    pgphi._change_key_grant(text, regrole, text, boolean, timestamptz),
    pgphi.expire_key_grants() TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION pgphi.access_review(), pgphi.rotation_report() TO pgphi_key_custodian, pgphi_key_auditor;

-- Evidence for an auditor: the certificate of a destroyed key version. What
-- was destroyed and when, by whom, the two custodians whose approvals it
-- took, the check for values left under the version made at destruction,
-- the retirement before it, and the audit records of all this with their
-- place in the hash chain (seq and row_hash). Everything comes from records
-- that do not change (the append-only audit log, the frozen destroyed row),
-- so the document is the same every time it is asked for, also on a
-- standby. It holds names, times, counts and hashes, never a key or a value.
-- The document's form is in docs/key-lifecycle.md ("Destruction
-- certificates"); its canonical text is the jsonb text form.
CREATE FUNCTION pgphi._destruction_certificate_body(name text, version integer) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(_destruction_certificate_body.name);
    v record;
    destroyed pgphi.audit_log;
    retired pgphi.audit_log;
    ignoring pgphi.audit_log;
    checked text[];
    approvers text[];
    approvals pgphi.audit_log[];
    records pgphi.audit_log[];
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF _destruction_certificate_body.version IS NULL THEN
        RAISE EXCEPTION 'a destruction certificate needs a key version'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'pgphi.key_inventory lists the versions.';
    END IF;
    SELECT kv.state, kv.created_at, kv.retired_at, kv.destroyed_at, k.purpose INTO v
      FROM pgphi.key_versions kv JOIN pgphi.keys k ON k.key_id = kv.key_id
     WHERE kv.key_id = target_id AND kv.version = _destruction_certificate_body.version;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key "%" has no version %', pgphi._key_name(target_id),
            _destruction_certificate_body.version
            USING ERRCODE = 'undefined_object';
    ELSIF v.state <> 'destroyed' THEN
        RAISE EXCEPTION 'pgphi key "%" version % has not been destroyed', pgphi._key_name(target_id),
            _destruction_certificate_body.version
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('The version is %s; only a destroyed version has a destruction certificate.',
                                  replace(v.state, '_', '-'));
    END IF;
    SELECT * INTO destroyed FROM pgphi.audit_log a
     WHERE a.key_id = target_id AND a.key_version = _destruction_certificate_body.version
       AND a.action = 'destroy' AND a.outcome = 'ok'
     ORDER BY a.seq LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the audit log has no record of the destruction of pgphi key "%" version %',
            pgphi._key_name(target_id), _destruction_certificate_body.version
            USING ERRCODE = 'data_corrupted',
                  HINT = 'pgphi.verify_audit_log() tells whether audit rows were removed.';
    END IF;
    -- The retirement the destruction followed (none when a superuser
    -- destroyed a version directly), and what it decided to leave behind.
    SELECT * INTO retired FROM pgphi.audit_log a
     WHERE a.key_id = target_id AND a.key_version = _destruction_certificate_body.version
       AND a.action = 'retire' AND a.outcome = 'ok' AND a.seq < destroyed.seq
     ORDER BY a.seq DESC LIMIT 1;
    IF retired.seq IS NOT NULL THEN
        SELECT * INTO ignoring FROM pgphi.audit_log a
         WHERE a.key_id = target_id AND a.key_version = _destruction_certificate_body.version
           AND a.action = 'retire_ignoring' AND a.seq > retired.seq AND a.seq < destroyed.seq
         ORDER BY a.seq LIMIT 1;
    END IF;
    -- The destroy record's detail (pgphi._destruction_check); records made
    -- before 0.3.0 have none, and then the certificate says the check was
    -- not recorded.
    checked := regexp_match(destroyed.detail,
        '^approved by ((?:"(?:[^"]|"")*"|[a-z0-9_]+)(?:, (?:"(?:[^"]|"")*"|[a-z0-9_]+))*|nobody); '
        'checked at destruction: ([0-9]+) values under the version in ([0-9]+) columns scanned, '
        '([0-9]+) columns not scanned(?:;|$)');
    IF checked IS NOT NULL THEN
        approvers := CASE WHEN checked[1] = 'nobody' THEN '{}'::text[] ELSE ARRAY(
            SELECT coalesce(replace(t.m[1], '""', '"'), t.m[2])
              FROM regexp_matches(checked[1], '"((?:[^"]|"")*)"|([a-z0-9_]+)', 'g') WITH ORDINALITY AS t(m, n)
             ORDER BY t.n) END;
    END IF;
    -- Each approver's last approval of this retirement before the
    -- destruction (an un-retirement voids approvals, and is followed by a
    -- new retirement).
    approvals := ARRAY(
        SELECT a FROM pgphi.audit_log a
         WHERE a.seq IN (SELECT DISTINCT ON (x.login_role) x.seq
                           FROM pgphi.audit_log x
                          WHERE x.key_id = target_id AND x.key_version = _destruction_certificate_body.version
                            AND x.action = 'approve_destroy' AND x.outcome = 'ok'
                            AND x.seq > coalesce(retired.seq, 0) AND x.seq < destroyed.seq
                            AND (approvers IS NULL OR x.login_role = ANY (approvers))
                          ORDER BY x.login_role, x.seq DESC)
         ORDER BY a.seq);
    IF approvers IS NULL THEN
        approvers := ARRAY(SELECT a.login_role FROM unnest(approvals) a ORDER BY a.login_role);
    END IF;
    -- The records the certificate cites, in the order of the chain.
    records := approvals || destroyed;
    IF ignoring.seq IS NOT NULL THEN
        records := ignoring || records;
    END IF;
    IF retired.seq IS NOT NULL THEN
        records := retired || records;
    END IF;
    RETURN jsonb_build_object(
        'certificate', 'pgphi destruction certificate v1',
        'database', current_database(),
        'key', destroyed.key_name,
        'key_id', target_id,
        'version', _destruction_certificate_body.version,
        'purpose', v.purpose,
        'version_created_at', pgphi._audit_time(v.created_at),
        'retired_at', pgphi._audit_time(v.retired_at),
        'destroyed_at', pgphi._audit_time(v.destroyed_at),
        'destroyed_by', destroyed.login_role,
        'destroyed_as', destroyed.acting_role,
        'approved_by', to_jsonb(approvers),
        'approvals', coalesce((SELECT jsonb_agg(jsonb_build_object(
                                          'approver', a.login_role, 'approved_at', pgphi._audit_time(a.logged_at),
                                          'audit_seq', a.seq) ORDER BY a.seq)
                                 FROM unnest(approvals) a), '[]'::jsonb),
        'check_at_destruction', CASE WHEN checked IS NOT NULL THEN jsonb_build_object(
                                    'values_found', checked[2]::bigint, 'columns_scanned', checked[3]::bigint,
                                    'columns_not_scanned', checked[4]::bigint, 'audit_seq', destroyed.seq) END,
        'no_value_remained', CASE WHEN checked IS NOT NULL THEN checked[2]::bigint = 0 AND checked[4]::bigint = 0 END,
        'retirement', CASE WHEN retired.seq IS NOT NULL THEN jsonb_build_object(
                          'audit_seq', retired.seq, 'retired_at', pgphi._audit_time(retired.logged_at),
                          'ignored_relations', ignoring.detail, 'ignored_audit_seq', ignoring.seq) END,
        'erased', 'the version''s wrapped DEK in pgphi.key_versions, with every older copy of its row and the free '
                  'space of the table''s pages (crypto-shredding at commit, WAL-logged, so also on streaming '
                  'standbys), and the DEK in the shared DEK cache and in every session''s key cache',
        'not_erased', 'copies of the wrapped DEK in WAL and WAL archives, base backups, snapshots and dumps taken '
                      'before the destruction (they stay useless without the KEK that wrapped it)',
        'audit_records', (SELECT jsonb_agg(jsonb_build_object(
                                     'seq', r.seq, 'logged_at', pgphi._audit_time(r.logged_at), 'action', r.action,
                                     'login_role', r.login_role, 'acting_role', r.acting_role, 'detail', r.detail,
                                     'row_hash', encode(r.row_hash, 'hex')) ORDER BY r.seq)
                            FROM unnest(records) r));
END
$$;

-- The certificate, signed: the key manager's MAC over the SHA-256 of its
-- canonical text, with the provider and key of the audit anchors (the
-- key broker's pgphi.audit_anchor_provider and pgphi.audit_anchor_key),
-- added as "signature": {"provider", "key", "mac"}. Refuses (55000) a
-- version that is not destroyed.
CREATE FUNCTION pgphi.destruction_certificate(name text, version integer) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_destruction_certificate'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION pgphi._verify_destruction_certificate(body_sha256 text, provider text, key_ref text, mac text)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_verify_destruction_certificate' LANGUAGE C VOLATILE STRICT;

-- Whether a certificate is exactly as destruction_certificate() issued it:
-- its text in canonical form (any changed byte, even whitespace, fails), a
-- v1 certificate, and a MAC the key manager named in it vouches for. False
-- for anything else, text that is not JSON included; the key manager's
-- error when it cannot be asked. It checks the document, not this database:
-- it works anywhere the key manager can be asked.
CREATE FUNCTION pgphi.verify_destruction_certificate(certificate text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    doc jsonb;
    signature jsonb;
BEGIN
    BEGIN
        doc := certificate::jsonb;
    EXCEPTION WHEN data_exception THEN
        RETURN false;
    END;
    IF jsonb_typeof(doc) <> 'object' OR doc::text <> certificate
       OR doc->>'certificate' IS DISTINCT FROM 'pgphi destruction certificate v1' THEN
        RETURN false;
    END IF;
    signature := doc->'signature';
    IF jsonb_typeof(signature) IS DISTINCT FROM 'object'
       OR jsonb_typeof(signature->'provider') IS DISTINCT FROM 'string'
       OR jsonb_typeof(signature->'key') IS DISTINCT FROM 'string'
       OR jsonb_typeof(signature->'mac') IS DISTINCT FROM 'string' THEN
        RETURN false;
    END IF;
    RETURN pgphi._verify_destruction_certificate(
        encode(sha256(convert_to((doc - 'signature')::text, 'UTF8')), 'hex'),
        signature->>'provider', signature->>'key', signature->>'mac');
END
$$;

REVOKE ALL ON FUNCTION pgphi._destruction_check(integer, integer), pgphi._destruction_certificate_body(text, integer),
    pgphi.destruction_certificate(text, integer), pgphi._verify_destruction_certificate(text, text, text, text),
    pgphi.verify_destruction_certificate(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.destruction_certificate(text, integer), pgphi.verify_destruction_certificate(text)
    TO pgphi_key_auditor, pgphi_key_custodian;
