-- The audit trail.
--
-- Every change to the key catalog and the grants is written to an
-- append-only, hash-chained audit log by triggers, in the transaction that
-- makes the change; refused and failed key uses, and per-role volumes, reach
-- the log through shared memory and the audit writer worker. Anchors made
-- with the key manager authenticate the chain's head. Changes made by any
-- other path than pgphi's functions are audited too (86_catalog_audit.sql).

-- The role whose privileges the session uses outside SECURITY DEFINER
-- functions: the SET ROLE role, else the login role.
CREATE FUNCTION pgphi._acting_role() RETURNS text
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE current_setting('role') WHEN 'none' THEN session_user::text ELSE current_setting('role') END $$;

-- The hashed form of a row: a JSON array, whose text form PostgreSQL writes
-- the same way every time, with times in UTC microseconds. A row that is
-- one occurrence without first and last times is hashed exactly as 0.2.0
-- did; any other row also hashes its count and both times (so changing any
-- of them, or turning a coalesced row into a plain one, breaks the chain).
CREATE FUNCTION pgphi._audit_row_hash(prev_hash bytea, r pgphi.audit_log) RETURNS bytea
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(prev_hash || convert_to(
        CASE WHEN r.occurrences = 1 AND r.first_at IS NULL AND r.last_at IS NULL THEN
            jsonb_build_array(
                r.seq, to_char(r.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                r.login_role, r.acting_role, r.action, r.key_id, r.key_name, r.key_version,
                r.outcome, r.detail)
        ELSE
            jsonb_build_array(
                r.seq, to_char(r.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                r.login_role, r.acting_role, r.action, r.key_id, r.key_name, r.key_version,
                r.outcome, r.detail, r.occurrences,
                to_char(r.first_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                to_char(r.last_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        END::text, 'UTF8'))
$$;

-- Numbers and chains each new row, and tells the scheduled anchoring that
-- this database's chain moved. The advisory lock (keyed by the table's oid)
-- serialises writers until they commit, so the chain cannot fork.
CREATE FUNCTION pgphi._audit_log_chain() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last record;
BEGIN
    PERFORM pg_advisory_xact_lock('pgphi.audit_log'::regclass::oid::integer, 0);
    SELECT a.seq, a.row_hash INTO last FROM pgphi.audit_log a ORDER BY a.seq DESC LIMIT 1;
    NEW.seq := coalesce(last.seq, 0) + 1;
    NEW.logged_at := coalesce(NEW.logged_at, now());
    NEW.prev_hash := coalesce(last.row_hash, '\x'::bytea);
    NEW.row_hash := pgphi._audit_row_hash(NEW.prev_hash, NEW);
    PERFORM pgphi._audit_chain_changed();
    RETURN NEW;
END
$$;

CREATE FUNCTION pgphi._audit_log_is_append_only() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'pgphi.audit_log is append-only'
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Audit records cannot be updated, deleted or truncated.';
END
$$;

CREATE TRIGGER audit_log_chain BEFORE INSERT ON pgphi.audit_log
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_log_chain();

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON pgphi.audit_log
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_log_is_append_only();

CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON pgphi.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._audit_log_is_append_only();

-- Also under session_replication_role = replica.
ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;

ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_no_change;
ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;

CREATE FUNCTION pgphi._audit(action text, key_id integer, key_version integer, outcome text, detail text)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgphi.audit_log (acting_role, action, key_id, key_name, key_version, outcome, detail)
    SELECT pgphi._acting_role(), _audit.action, _audit.key_id,
           (SELECT k.name FROM pgphi.keys k WHERE k.key_id = _audit.key_id),
           _audit.key_version, _audit.outcome, _audit.detail
$$;

-- Events queued in shared memory (refusals, key manager failures), written
-- by the audit writer worker with the time and roles they happened with: the
-- 0.2.0 form, and the coalesced form, which adds how many identical events
-- the row stands for and when the first and the last of them happened.
CREATE FUNCTION pgphi._record_audit_event(logged_at timestamptz, login_role text, acting_role text,
        action text, key_id integer, key_name text, key_version integer, outcome text, detail text)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgphi.audit_log (logged_at, login_role, acting_role, action, key_id, key_name, key_version,
                                 outcome, detail)
    VALUES (logged_at, login_role, acting_role, action, nullif(key_id, 0), key_name, nullif(key_version, 0),
            outcome, detail)
$$;

CREATE FUNCTION pgphi._record_audit_event(logged_at timestamptz, login_role text, acting_role text,
        action text, key_id integer, key_name text, key_version integer, outcome text, detail text,
        occurrences bigint, first_at timestamptz, last_at timestamptz)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgphi.audit_log (logged_at, login_role, acting_role, action, key_id, key_name, key_version,
                                 outcome, detail, occurrences, first_at, last_at)
    VALUES (logged_at, login_role, acting_role, action, nullif(key_id, 0), nullif(key_name, ''),
            nullif(key_version, 0), outcome, detail, occurrences, first_at, last_at)
$$;

-- Key administration is audited by triggers on the catalog, so a change made
-- any way (functions, or a superuser's direct DML) leaves a record.
CREATE FUNCTION pgphi._audit_key_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_TABLE_NAME = 'key_versions' THEN
        IF TG_OP = 'INSERT' THEN
            PERFORM pgphi._audit(CASE WHEN NEW.version = 1 THEN 'create' ELSE 'rotate' END,
                                 NEW.key_id, NEW.version, 'ok',
                                 (SELECT format('provider %s, KEK %s', k.provider, k.kek_ref)
                                         || CASE WHEN k.kek_dedicated THEN ' (dedicated to this key)' ELSE '' END
                                    FROM pgphi.keys k WHERE k.key_id = NEW.key_id));
        ELSIF NEW.state IS DISTINCT FROM OLD.state AND NEW.state = 'retired' THEN
            PERFORM pgphi._audit('retire', NEW.key_id, NEW.version, 'ok', NULL);
        ELSIF NEW.state IS DISTINCT FROM OLD.state AND NEW.state = 'destroyed' THEN
            -- With the approvals that count and a last scan for values under
            -- the version, which the destruction certificate cites.
            PERFORM pgphi._audit('destroy', NEW.key_id, NEW.version, 'ok',
                                 pgphi._destruction_check(NEW.key_id, NEW.version));
        ELSIF NEW.state = OLD.state AND NEW.wrapped_dek IS DISTINCT FROM OLD.wrapped_dek
              AND OLD.rekey_source_provider IS NOT NULL AND NEW.rekey_source_provider IS NULL THEN
            PERFORM pgphi._audit('rekey', NEW.key_id, NEW.version, 'ok',
                                 (SELECT format('from provider %s, KEK %s to provider %s, KEK %s, KEK version %s',
                                                OLD.rekey_source_provider, OLD.rekey_source_kek, k.provider,
                                                k.kek_ref, coalesce(NEW.kek_version, 'unknown'))
                                    FROM pgphi.keys k WHERE k.key_id = NEW.key_id));
        ELSIF NEW.state = OLD.state AND NEW.wrapped_dek IS DISTINCT FROM OLD.wrapped_dek THEN
            PERFORM pgphi._audit('rewrap', NEW.key_id, NEW.version, 'ok',
                                 format('KEK version %s', coalesce(NEW.kek_version, 'unknown')));
        END IF;
    ELSIF TG_TABLE_NAME = 'rekey_approvals' THEN
        PERFORM pgphi._audit('approve_rekey', NEW.key_id, NULL, 'ok',
                             format('to provider %s, KEK %s', NEW.provider, NEW.kek_ref));
    ELSIF TG_TABLE_NAME = 'destroy_approvals' THEN
        PERFORM pgphi._audit('approve_destroy', NEW.key_id, NEW.version, 'ok', NULL);
    ELSIF TG_TABLE_NAME = 'key_grants' THEN
        IF TG_OP = 'INSERT' THEN
            PERFORM pgphi._audit('grant_' || NEW.privilege, NEW.key_id, NULL, 'ok',
                                 format('to %s', NEW.grantee)
                                 || coalesce(' until ' || pgphi._audit_time(NEW.valid_until), ''));
        ELSIF OLD.valid_until IS NOT NULL AND OLD.valid_until <= now() THEN
            PERFORM pgphi._audit('expire_' || OLD.privilege, OLD.key_id, NULL, 'ok',
                                 format('from %s; expired at %s', OLD.grantee, pgphi._audit_time(OLD.valid_until)));
        ELSE
            PERFORM pgphi._audit('revoke_' || OLD.privilege, OLD.key_id, NULL, 'ok', format('from %s', OLD.grantee));
        END IF;
    ELSIF TG_TABLE_NAME = 'key_grant_members' THEN
        PERFORM pgphi._audit('grant_member', NEW.key_id, NULL, 'ok',
                             format('%s grant to %s covers %s (%s)', NEW.privilege, NEW.grantee, NEW.member,
                                    NEW.reason));
    ELSIF TG_TABLE_NAME = 'keys' AND (NEW.provider, NEW.kek_ref) IS DISTINCT FROM (OLD.provider, OLD.kek_ref) THEN
        PERFORM pgphi._audit('rekey', NEW.key_id, NULL, 'ok',
                             format('new DEK versions under provider %s, KEK %s (was provider %s, KEK %s); %s versions to move',
                                    NEW.provider, NEW.kek_ref, OLD.provider, OLD.kek_ref,
                                    (SELECT count(*) FROM pgphi.key_versions v
                                      WHERE v.key_id = NEW.key_id AND v.rekey_source_provider IS NOT NULL
                                        AND v.wrapped_dek IS NOT NULL)));
    ELSIF TG_TABLE_NAME = 'keys' AND NEW.kek_deleted_at IS DISTINCT FROM OLD.kek_deleted_at THEN
        PERFORM pgphi._audit('delete_kek', NEW.key_id, NULL, 'ok',
                             format('dedicated KEK %s of provider %s: %s', NEW.kek_ref, NEW.provider,
                                    coalesce(NEW.kek_deletion, 'deletion record removed')));
    ELSIF TG_TABLE_NAME = 'keys' AND NEW.cryptoperiod IS DISTINCT FROM OLD.cryptoperiod THEN
        PERFORM pgphi._audit('set_cryptoperiod', NEW.key_id, NULL, 'ok', format('%s', NEW.cryptoperiod));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER key_versions_audit AFTER INSERT OR UPDATE ON pgphi.key_versions
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();
CREATE TRIGGER destroy_approvals_audit AFTER INSERT ON pgphi.destroy_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();
CREATE TRIGGER rekey_approvals_audit AFTER INSERT ON pgphi.rekey_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();
CREATE TRIGGER key_grants_audit AFTER INSERT OR DELETE ON pgphi.key_grants
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();
CREATE TRIGGER keys_audit AFTER UPDATE ON pgphi.keys
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();
CREATE TRIGGER key_grant_members_audit AFTER INSERT ON pgphi.key_grant_members
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();

-- Walks the chain, then checks every anchor with the key manager: anchors
-- numbered without gaps, each following the previous one's MAC, each MAC
-- authentic, and each anchored row present with the anchored hash. So rows
-- removed from the end, a TRUNCATE, and a chain rewritten or re-hashed up
-- to an anchored row are found without a head hash recorded by hand. Pass
-- a head_hash recorded earlier to check against it as well.
CREATE FUNCTION pgphi.verify_audit_log(recorded_head text DEFAULT NULL,
        OUT intact boolean, OUT rows_checked bigint, OUT first_bad_seq bigint, OUT problem text,
        OUT head_seq bigint, OUT head_hash text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r pgphi.audit_log;
    a record;
    prev bytea := '\x';
    recorded_found boolean := recorded_head IS NULL;
    next_anchor bigint := 1;
    prev_mac text := '';
    last_known bigint;
BEGIN
    intact := true;
    rows_checked := 0;
    FOR r IN SELECT * FROM pgphi.audit_log ORDER BY seq LOOP
        IF r.seq <> rows_checked + 1 THEN
            problem := format('row %s is missing', rows_checked + 1);
            first_bad_seq := rows_checked + 1;
        ELSIF r.prev_hash <> prev THEN
            problem := format('row %s does not follow row %s: rows were removed or reordered', r.seq, r.seq - 1);
            first_bad_seq := r.seq;
        ELSIF r.row_hash <> pgphi._audit_row_hash(r.prev_hash, r) THEN
            problem := format('row %s was changed after it was written', r.seq);
            first_bad_seq := r.seq;
        END IF;
        IF problem IS NOT NULL THEN
            intact := false;
            RETURN;
        END IF;
        rows_checked := rows_checked + 1;
        prev := r.row_hash;
        recorded_found := recorded_found OR encode(r.row_hash, 'hex') = lower(recorded_head);
    END LOOP;
    head_seq := rows_checked;
    head_hash := encode(prev, 'hex');

    FOR a IN SELECT an.*, l.row_hash AS chain_hash
               FROM pgphi.audit_anchors an LEFT JOIN pgphi.audit_log l ON l.seq = an.audit_seq
              ORDER BY an.anchor_seq LOOP
        IF a.anchor_seq <> next_anchor THEN
            problem := format('audit anchor %s is missing: anchors were removed', next_anchor);
        ELSIF a.prev_mac <> prev_mac THEN
            problem := format('audit anchor %s does not follow anchor %s: anchors were removed or replaced',
                              a.anchor_seq, a.anchor_seq - 1);
        ELSIF NOT pgphi._verify_audit_anchor(a.anchor_seq, a.anchored_at, a.audit_seq, a.audit_hash, a.prev_mac,
                                             a.provider, a.key_ref, a.mac) THEN
            problem := format('audit anchor %s is not authentic: the key manager does not vouch for its MAC',
                              a.anchor_seq);
        ELSIF a.chain_hash IS NULL THEN
            problem := format('row %s was anchored (anchor %s) but the chain ends at row %s: rows were removed '
                              'from its end', a.audit_seq, a.anchor_seq, rows_checked);
            first_bad_seq := rows_checked + 1;
        ELSIF a.chain_hash <> a.audit_hash THEN
            problem := format('row %s does not match anchor %s: the chain up to it was rewritten',
                              a.audit_seq, a.anchor_seq);
            first_bad_seq := a.audit_seq;
        END IF;
        IF problem IS NOT NULL THEN
            intact := false;
            RETURN;
        END IF;
        next_anchor := a.anchor_seq + 1;
        prev_mac := a.mac;
    END LOOP;
    last_known := pgphi._audit_anchor_last_known();
    IF last_known >= next_anchor THEN
        intact := false;
        problem := format('audit anchors %s to %s were made by this server and are missing: anchors were removed',
                          next_anchor, last_known);
        RETURN;
    END IF;

    IF NOT recorded_found THEN
        intact := false;
        problem := 'the recorded head hash is not in the chain: rows were removed from its end, or the chain was rewritten';
    END IF;
END
$$;

CREATE FUNCTION pgphi._record_key_use(window_start timestamptz, role_name text, key_id integer,
        encryptions bigint, decryptions bigint) RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgphi.key_use_stats AS s (window_start, role_name, key_id, encryptions, decryptions)
    VALUES (window_start, role_name, key_id, encryptions, decryptions)
    ON CONFLICT (window_start, role_name, key_id) DO UPDATE
       SET encryptions = s.encryptions + excluded.encryptions,
           decryptions = s.decryptions + excluded.decryptions
$$;

CREATE VIEW pgphi.key_use AS
    SELECT s.window_start, s.role_name, k.name AS key_name, s.encryptions, s.decryptions
      FROM pgphi.key_use_stats s LEFT JOIN pgphi.keys k USING (key_id);

CREATE FUNCTION pgphi.audit_queue_status(OUT queued_events integer, OUT dropped_events bigint,
        OUT dropped_counts bigint, OUT overflow_events bigint)
    AS 'MODULE_PATHNAME', 'pgphi_audit_queue_status' LANGUAGE C VOLATILE STRICT;

-- Audit anchors: append-only too. anchor_audit_log anchors the head now,
-- unless the last anchor covers it; it reads the head itself and MACs
-- nothing it is given.
CREATE FUNCTION pgphi._audit_anchors_are_append_only() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'pgphi.audit_anchors is append-only'
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Audit anchors cannot be updated, deleted or truncated.';
END
$$;

CREATE TRIGGER audit_anchors_no_change BEFORE UPDATE OR DELETE ON pgphi.audit_anchors
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_anchors_are_append_only();
CREATE TRIGGER audit_anchors_no_truncate BEFORE TRUNCATE ON pgphi.audit_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._audit_anchors_are_append_only();
ALTER TABLE pgphi.audit_anchors ENABLE ALWAYS TRIGGER audit_anchors_no_change;
ALTER TABLE pgphi.audit_anchors ENABLE ALWAYS TRIGGER audit_anchors_no_truncate;

CREATE FUNCTION pgphi.anchor_audit_log(OUT anchor_seq bigint, OUT audit_seq bigint, OUT audit_hash text,
        OUT mac text)
    AS 'MODULE_PATHNAME', 'pgphi_anchor_audit_log'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION pgphi._verify_audit_anchor(anchor_seq bigint, anchored_at timestamptz, audit_seq bigint,
        audit_hash bytea, prev_mac text, provider text, key_ref text, mac text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_verify_audit_anchor' LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION pgphi._audit_anchor_last_known() RETURNS bigint
    AS 'MODULE_PATHNAME', 'pgphi_audit_anchor_last_known' LANGUAGE C VOLATILE;

CREATE FUNCTION pgphi._audit_chain_changed() RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_audit_chain_changed' LANGUAGE C VOLATILE;

REVOKE ALL ON pgphi.key_use FROM PUBLIC;
GRANT SELECT ON pgphi.key_use TO pgphi_key_auditor;
GRANT EXECUTE ON FUNCTION pgphi.verify_audit_log(text) TO pgphi_key_auditor;
GRANT EXECUTE ON FUNCTION pgphi.audit_queue_status() TO pgphi_key_auditor, pg_monitor;
GRANT EXECUTE ON FUNCTION pgphi.anchor_audit_log() TO pgphi_key_custodian, pgphi_key_auditor;
