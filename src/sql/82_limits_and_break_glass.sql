-- Exfiltration limits, break-glass access and the alerts on unusual key use
-- (docs/key-lifecycle.md). The checks run in C on the decrypt path
-- (src/pg/policy/decrypt_limits.cpp): each session counts its decrypts
-- locally and takes them from a shared budget in batches. What is here is
-- the configuration, the record of break-glass events, and the volume check
-- the audit writer runs.

-- At most max_values decrypts per window of length `per` by a role under a
-- key: by the role itself, by roles that have its privileges, and by
-- sessions whose login role has them (SET ROLE does not step around it).
-- Every role it applies to shares the one budget.
CREATE TABLE pgphi.decrypt_limits (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    role        regrole NOT NULL,
    max_values  bigint NOT NULL CHECK (max_values > 0),
    per         interval NOT NULL CHECK (per >= interval '1 minute' AND per <= interval '31 days'),
    set_by      name NOT NULL DEFAULT SESSION_USER,
    set_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, role)
);

-- Which roles may break the glass on which key, and for how long at most.
-- Two key custodians: one proposes (set_break_glass_role), another approves
-- by making the same call; only approved rows count.
CREATE TABLE pgphi.break_glass_roles (
    key_id       integer NOT NULL REFERENCES pgphi.keys,
    role         regrole NOT NULL,
    max_duration interval NOT NULL CHECK (max_duration > interval '0' AND max_duration <= interval '24 hours'),
    proposed_by  name NOT NULL DEFAULT SESSION_USER,
    proposed_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    approved_by  name,
    approved_at  timestamptz,
    PRIMARY KEY (key_id, role)
);

-- Each use of break_glass(): who, why, until when, and how many values the
-- role decrypted under the key while it lasted (sessions count in batches;
-- the audit writer adds the counts about every 10 seconds).
CREATE TABLE pgphi.break_glass_events (
    key_id           integer NOT NULL REFERENCES pgphi.keys,
    role             regrole NOT NULL,
    login_role       name NOT NULL DEFAULT SESSION_USER,
    reason           text NOT NULL,
    started_at       timestamptz NOT NULL,
    ends_at          timestamptz NOT NULL,
    values_decrypted bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, role, started_at)
);

SELECT pg_catalog.pg_extension_config_dump('pgphi.decrypt_limits', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.break_glass_roles', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.break_glass_events', '');
REVOKE ALL ON pgphi.decrypt_limits, pgphi.break_glass_roles, pgphi.break_glass_events FROM PUBLIC;
GRANT SELECT ON pgphi.decrypt_limits, pgphi.break_glass_roles, pgphi.break_glass_events
    TO pgphi_key_custodian, pgphi_key_auditor;

-- Limits and break-glass events change what sessions' decrypts are charged
-- against: clear their cached answers (as for grants).
CREATE TRIGGER decrypt_limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.decrypt_limits
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
CREATE TRIGGER break_glass_events_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.break_glass_events
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
ALTER TABLE pgphi.decrypt_limits ENABLE ALWAYS TRIGGER decrypt_limits_changed;
ALTER TABLE pgphi.break_glass_events ENABLE ALWAYS TRIGGER break_glass_events_changed;

-- Sets, changes (max_values) or removes (max_values => NULL) a decrypt
-- limit. Key custodians; none may change a limit on a role it belongs to.
-- Returns false when nothing changed. Audited as set_decrypt_limit.
CREATE FUNCTION pgphi.set_decrypt_limit(key_name text, role regrole, max_values bigint,
        per interval DEFAULT interval '1 hour')
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    setter name := session_user;
    existing pgphi.decrypt_limits;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF role IS NULL OR role::oid = 0 THEN
        RAISE EXCEPTION 'a decrypt limit needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = set_decrypt_limit.role::oid) THEN
        RAISE EXCEPTION 'role with OID % does not exist', role::oid USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = setter)
       AND pg_has_role(setter, set_decrypt_limit.role::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot change a decrypt limit on itself or on a role it belongs to', setter
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must change this limit.';
    END IF;
    SELECT * INTO existing FROM pgphi.decrypt_limits l
     WHERE l.key_id = target_id AND l.role::oid = set_decrypt_limit.role::oid FOR UPDATE;
    IF max_values IS NULL THEN
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        DELETE FROM pgphi.decrypt_limits l WHERE l.key_id = target_id AND l.role::oid = set_decrypt_limit.role::oid;
        PERFORM pgphi._audit('set_decrypt_limit', target_id, NULL, 'ok',
                             format('on %s: removed (was %s values per %s)', role, existing.max_values, existing.per));
        RETURN true;
    END IF;
    IF max_values <= 0 THEN
        RAISE EXCEPTION 'a decrypt limit must allow at least one value'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass max_values => NULL to remove the limit.';
    END IF;
    IF per IS NULL OR per < interval '1 minute' OR per > interval '31 days' THEN
        RAISE EXCEPTION 'a decrypt limit''s window must be from 1 minute to 31 days'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF FOUND AND existing.max_values = max_values AND existing.per = per THEN
        RETURN false;
    END IF;
    INSERT INTO pgphi.decrypt_limits (key_id, role, max_values, per)
        VALUES (target_id, set_decrypt_limit.role, max_values, per)
        ON CONFLICT ON CONSTRAINT decrypt_limits_pkey
        DO UPDATE SET max_values = EXCLUDED.max_values, per = EXCLUDED.per, set_by = EXCLUDED.set_by,
                      set_at = EXCLUDED.set_at;
    PERFORM pgphi._audit('set_decrypt_limit', target_id, NULL, 'ok',
                         format('on %s: %s values per %s%s', role, max_values, per,
                                CASE WHEN existing IS NULL THEN ''
                                     ELSE format(' (was %s values per %s)', existing.max_values, existing.per) END));
    RETURN true;
END
$$;

-- Makes `role` a break-glass role of the key, for at most max_duration per
-- use (max_duration => NULL: no longer one). Dual control: the first
-- custodian's call proposes ('proposed'), the same call by a second
-- custodian within a day approves it ('approved'). Removing takes one
-- custodian ('removed'). Break-glass roles are the roles of people: not
-- groups, not pgphi's roles, not custodians or auditors, and neither
-- custodian may be a member. Audited as propose_break_glass and
-- set_break_glass_role.
CREATE FUNCTION pgphi.set_break_glass_role(key_name text, role regrole, max_duration interval)
    RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    setter name := session_user;
    existing pgphi.break_glass_roles;
    group_reason text;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF NOT pg_has_role(setter, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can configure break-glass roles'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the configuring role.';
    END IF;
    SELECT * INTO existing FROM pgphi.break_glass_roles b
     WHERE b.key_id = target_id AND b.role::oid = set_break_glass_role.role::oid FOR UPDATE;
    IF max_duration IS NULL THEN
        IF NOT FOUND THEN
            RETURN 'none';
        END IF;
        DELETE FROM pgphi.break_glass_roles b
         WHERE b.key_id = target_id AND b.role::oid = set_break_glass_role.role::oid;
        PERFORM pgphi._audit('set_break_glass_role', target_id, NULL, 'ok', format('%s: removed', role));
        RETURN 'removed';
    END IF;
    PERFORM pgphi._check_grantee(role);
    group_reason := pgphi._group_grant_reason(role);
    IF group_reason IS NOT NULL
       OR EXISTS (SELECT FROM pg_roles r WHERE r.oid <> set_break_glass_role.role::oid AND NOT r.rolsuper
                     AND pg_has_role(r.oid, set_break_glass_role.role::oid, 'MEMBER')) THEN
        RAISE EXCEPTION 'a break-glass role must be a role without members'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = coalesce(group_reason || '.', format('%s has member roles.', role)),
                  HINT = 'Make the login role of the person who may break the glass a break-glass role.';
    END IF;
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = setter)
       AND pg_has_role(setter, set_break_glass_role.role::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot make itself or a role it belongs to a break-glass role', setter
            USING ERRCODE = 'insufficient_privilege', HINT = 'Two other key custodians must configure it.';
    END IF;
    IF max_duration <= interval '0' OR max_duration > interval '24 hours' THEN
        RAISE EXCEPTION 'a break-glass period must be longer than 0 and at most 24 hours'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF FOUND AND existing.max_duration = max_duration THEN
        IF existing.approved_by IS NOT NULL THEN
            RETURN 'approved';
        END IF;
        IF existing.proposed_by <> setter AND existing.proposed_at > now() - interval '1 day' THEN
            UPDATE pgphi.break_glass_roles b SET approved_by = setter, approved_at = now()
             WHERE b.key_id = target_id AND b.role::oid = set_break_glass_role.role::oid;
            PERFORM pgphi._audit('set_break_glass_role', target_id, NULL, 'ok',
                                 format('%s: up to %s per use; proposed by %s, approved by %s', role, max_duration,
                                        existing.proposed_by, setter));
            RETURN 'approved';
        END IF;
        IF existing.proposed_by = setter AND existing.proposed_at > now() - interval '1 day' THEN
            RAISE EXCEPTION 'making % a break-glass role of pgphi key "%" needs the approval of a second key custodian',
                    role, key_name
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.set_break_glass_role(%L, %L, %L);',
                                    key_name, role::text, max_duration::text);
        END IF;
    END IF;
    -- A new proposal, or a changed one: approved again by someone else.
    INSERT INTO pgphi.break_glass_roles (key_id, role, max_duration)
        VALUES (target_id, set_break_glass_role.role, max_duration)
        ON CONFLICT ON CONSTRAINT break_glass_roles_pkey
        DO UPDATE SET max_duration = EXCLUDED.max_duration, proposed_by = EXCLUDED.proposed_by,
                      proposed_at = EXCLUDED.proposed_at, approved_by = NULL, approved_at = NULL;
    PERFORM pgphi._audit('propose_break_glass', target_id, NULL, 'ok',
                         format('%s: up to %s per use', role, max_duration));
    RETURN 'proposed';
END
$$;

-- Break the glass: the calling role, configured as a break-glass role of
-- the key, may decrypt with it for the configured period from now. A
-- time-limited decrypt grant (valid_until), covering the role itself (it has
-- no members); audited with the reason (break_glass), a WARNING in the
-- server log, and NOTIFY pgphi_alert. Every value the role decrypts under
-- the key until then is counted in its pgphi.break_glass_events row. Returns
-- when the access ends. Refused attempts are audited (queued: the refusal
-- aborts the transaction).
CREATE FUNCTION pgphi.break_glass(key_name text, reason text) RETURNS timestamptz
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    caller text := pgphi._acting_role();
    caller_oid oid := (SELECT r.oid FROM pg_roles r WHERE r.rolname = caller);
    config pgphi.break_glass_roles;
    grant_until timestamptz;
    grant_found boolean;
    started timestamptz;
    ends timestamptz;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'breaking the glass needs a reason' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Say why, for the audit trail: pgphi.break_glass(key, ''incident ...'').';
    END IF;
    SELECT * INTO config FROM pgphi.break_glass_roles b
     WHERE b.key_id = target_id AND b.role::oid = caller_oid AND b.approved_by IS NOT NULL;
    IF NOT FOUND THEN
        PERFORM pgphi._queue_catalog_refusal('break_glass',
                    left(format('key %s, role %s: not a break-glass role of the key', key_name, caller), 120));
        RAISE EXCEPTION 'role "%" may not break the glass on pgphi key "%"', caller, key_name
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Two key custodians make a role a break-glass role with pgphi.set_break_glass_role().';
    END IF;
    -- The clock, not the transaction's start: two calls in one transaction
    -- are two events.
    started := clock_timestamp();
    ends := started + config.max_duration;
    -- One event in force per role and key: a new one ends the last.
    UPDATE pgphi.break_glass_events e SET ends_at = started
     WHERE e.key_id = target_id AND e.role::oid = caller_oid AND e.ends_at > started;
    INSERT INTO pgphi.break_glass_events (key_id, role, reason, started_at, ends_at)
        VALUES (target_id, caller_oid::regrole, reason, started, ends);
    SELECT g.valid_until, true INTO grant_until, grant_found FROM pgphi.key_grants g
     WHERE g.key_id = target_id AND g.privilege = 'decrypt' AND g.grantee::oid = caller_oid FOR UPDATE;
    IF NOT coalesce(grant_found, false) THEN
        INSERT INTO pgphi.key_grants (key_id, privilege, grantee, valid_until)
            VALUES (target_id, 'decrypt', caller_oid::regrole, ends);
        PERFORM pgphi._record_grant_members(target_id, 'decrypt', caller_oid::regrole);
    ELSIF grant_until IS NOT NULL AND grant_until < ends THEN
        UPDATE pgphi.key_grants g SET valid_until = ends
         WHERE g.key_id = target_id AND g.privilege = 'decrypt' AND g.grantee::oid = caller_oid;
    END IF;
    PERFORM pgphi._audit('break_glass', target_id, NULL, 'ok',
                         format('%s may decrypt until %s; reason: %s', caller, pgphi._audit_time(ends), reason));
    -- The reason, which may name a patient, stays in the audit log: the
    -- server log and the notification (which any session can LISTEN to)
    -- carry only who, which key and until when.
    RAISE WARNING 'pgphi alert (break_glass): role % broke the glass on pgphi key "%" until %', caller, key_name, ends
        USING DETAIL = 'The reason is in pgphi.audit_log (action break_glass).';
    PERFORM pg_notify('pgphi_alert', json_build_object('alert', 'break_glass', 'key', key_name, 'role', caller,
                                                       'detail', format('until %s', ends), 'at', now())::text);
    RETURN ends;
END
$$;

-- The audit writer's: values decrypted under a break-glass event.
CREATE FUNCTION pgphi._record_break_glass_use(key_id integer, role oid, started_at timestamptz, n bigint)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgphi.break_glass_events e SET values_decrypted = e.values_decrypted + _record_break_glass_use.n
     WHERE e.key_id = _record_break_glass_use.key_id AND e.role::oid = _record_break_glass_use.role
       AND e.started_at = _record_break_glass_use.started_at
$$;

-- The audit writer's, after writing volumes: a role whose decrypts under a
-- key in the current pgphi.key_use_window reach min_values and exceed
-- `factor` times its average over the baseline_windows windows before
-- (windows without use count as 0) gets an alert, once per role, key and
-- window: an audit row, a WARNING, NOTIFY pgphi_alert. Returns how many.
CREATE FUNCTION pgphi._volume_alerts(factor float8, min_values bigint, baseline_windows integer, window_s integer)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    detail text;
    raised integer := 0;
BEGIN
    FOR r IN
        SELECT s.role_name, s.key_id, k.name AS key_name, s.window_start, s.decryptions, b.baseline
          FROM pgphi.key_use_stats s
          JOIN pgphi.keys k ON k.key_id = s.key_id
          CROSS JOIN LATERAL (
              SELECT coalesce(sum(p.decryptions), 0)::float8 / baseline_windows AS baseline
                FROM pgphi.key_use_stats p
               WHERE p.role_name = s.role_name AND p.key_id = s.key_id AND p.window_start < s.window_start
                 AND p.window_start >= s.window_start - make_interval(secs => window_s::float8 * baseline_windows)) b
         WHERE s.window_start > now() - make_interval(secs => window_s)
           AND s.decryptions >= min_values AND s.decryptions > factor * b.baseline
         ORDER BY s.key_id, s.role_name
    LOOP
        IF EXISTS (SELECT FROM pgphi.audit_log a
                    WHERE a.action = 'alert' AND a.key_id = r.key_id AND a.acting_role = r.role_name
                      AND a.logged_at >= r.window_start AND a.detail LIKE 'decrypt_volume:%') THEN
            CONTINUE;
        END IF;
        detail := format('decrypt_volume: role %s decrypted %s values since %s, more than %s times its average '
                         'of %s per window over the %s windows before',
                         r.role_name, r.decryptions, pgphi._audit_time(r.window_start), factor,
                         round(r.baseline::numeric, 1), baseline_windows);
        PERFORM pgphi._record_audit_event(now(), session_user::text, r.role_name, 'alert', r.key_id, r.key_name,
                                          NULL, 'ok', detail, 1, now(), now());
        RAISE WARNING 'pgphi alert (decrypt_volume): %', substr(detail, 17);
        PERFORM pg_notify('pgphi_alert', json_build_object('alert', 'decrypt_volume', 'key', r.key_name,
                                                           'role', r.role_name, 'detail', substr(detail, 17),
                                                           'at', now())::text);
        raised := raised + 1;
    END LOOP;
    RETURN raised;
END
$$;

REVOKE ALL ON FUNCTION pgphi._record_break_glass_use(integer, oid, timestamptz, bigint),
    pgphi._volume_alerts(float8, bigint, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.set_decrypt_limit(text, regrole, bigint, interval),
    pgphi.set_break_glass_role(text, regrole, interval) TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION pgphi.break_glass(text, text) TO pgphi_decrypt;
