-- pgphi 0.1.0 -> 0.2.0. 0.1.0 is released: its script never changes again,
-- and a new installation of 0.2.0 runs it followed by this one, so fresh and
-- upgraded databases get exactly the same objects.
\echo Use "ALTER EXTENSION pgphi UPDATE" to load this file. \quit

------------------------------------------------------------------------------
-- Access control and the audit trail (0.2.0)
--
-- Per-key grants decide which roles may encrypt and decrypt under a key; the
-- coarse roles pgphi_encrypt and pgphi_decrypt still decide who may call the
-- functions at all. Every change to the key catalog and the grants is written
-- to an append-only, hash-chained audit log by triggers, in the transaction
-- that makes the change; refused and failed key uses, and per-role volumes,
-- reach the log through shared memory and the audit writer worker.
------------------------------------------------------------------------------

-- Reads the key inventory and the audit trail; cannot decrypt (grants to it
-- are refused).
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'pgphi_key_auditor') THEN
        CREATE ROLE pgphi_key_auditor NOLOGIN;
    ELSIF (SELECT rolcanlogin OR rolsuper FROM pg_catalog.pg_roles
            WHERE rolname OPERATOR(pg_catalog.=) 'pgphi_key_auditor') THEN
        RAISE EXCEPTION 'role pgphi_key_auditor exists and can log in'
            USING ERRCODE = 'duplicate_object',
                  HINT = 'pgphi grants privileges to this role; it must be a NOLOGIN group role.';
    END IF;
END
$roles$;

-- How long a key version may stay active (NIST SP 800-57 suggests at most two
-- years for a symmetric data-encryption key; one is the default).
ALTER TABLE pgphi.keys ADD COLUMN cryptoperiod interval NOT NULL DEFAULT interval '1 year'
    CHECK (cryptoperiod > interval '0');

CREATE TABLE pgphi.key_grants (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    grantee     regrole NOT NULL,
    granted_by  name NOT NULL DEFAULT SESSION_USER,
    granted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, privilege, grantee)
);
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_grants', '');
-- Backends cache their grant checks; a committed change clears the caches.
CREATE TRIGGER key_grants_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.key_grants
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
ALTER TABLE pgphi.key_grants ENABLE ALWAYS TRIGGER key_grants_changed;

------------------------------------------------------------------------------
-- The audit log: append-only and hash-chained. Row n stores the SHA-256 of
-- row n-1's hash and its own content, so an edited, deleted or reordered row
-- breaks the chain where it happened (pgphi.verify_audit_log()).
------------------------------------------------------------------------------

CREATE TABLE pgphi.audit_log (
    seq         bigint PRIMARY KEY,
    logged_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    login_role  text NOT NULL DEFAULT SESSION_USER,     -- who connected
    acting_role text NOT NULL,                          -- whose privileges were used
    action      text NOT NULL,
    key_id      integer,
    key_name    text,
    key_version integer,
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'refused', 'failed')),
    detail      text,
    prev_hash   bytea NOT NULL,
    row_hash    bytea NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('pgphi.audit_log', '');

-- The hashed form of a row: a JSON array, whose text form PostgreSQL writes
-- the same way every time, with the time in UTC microseconds.
CREATE FUNCTION pgphi._audit_row_hash(prev_hash bytea, r pgphi.audit_log) RETURNS bytea
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(prev_hash || convert_to(jsonb_build_array(
        r.seq, to_char(r.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        r.login_role, r.acting_role, r.action, r.key_id, r.key_name, r.key_version,
        r.outcome, r.detail)::text, 'UTF8'))
$$;

-- Numbers and chains each new row. The advisory lock (keyed by the table's
-- oid) serialises writers until they commit, so the chain cannot fork.
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

-- The role whose privileges the session uses outside SECURITY DEFINER
-- functions: the SET ROLE role, else the login role.
CREATE FUNCTION pgphi._acting_role() RETURNS text
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE current_setting('role') WHEN 'none' THEN session_user::text ELSE current_setting('role') END $$;

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
-- by the audit writer worker with the time and roles they happened with.
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
                                    FROM pgphi.keys k WHERE k.key_id = NEW.key_id));
        ELSIF NEW.state IS DISTINCT FROM OLD.state AND NEW.state IN ('retired', 'destroyed') THEN
            PERFORM pgphi._audit(CASE NEW.state WHEN 'retired' THEN 'retire' ELSE 'destroy' END,
                                 NEW.key_id, NEW.version, 'ok', NULL);
        ELSIF NEW.state = OLD.state AND NEW.wrapped_dek IS DISTINCT FROM OLD.wrapped_dek THEN
            PERFORM pgphi._audit('rewrap', NEW.key_id, NEW.version, 'ok',
                                 format('KEK version %s', coalesce(NEW.kek_version, 'unknown')));
        END IF;
    ELSIF TG_TABLE_NAME = 'destroy_approvals' THEN
        PERFORM pgphi._audit('approve_destroy', NEW.key_id, NEW.version, 'ok', NULL);
    ELSIF TG_TABLE_NAME = 'key_grants' THEN
        IF TG_OP = 'INSERT' THEN
            PERFORM pgphi._audit('grant_' || NEW.privilege, NEW.key_id, NULL, 'ok', format('to %s', NEW.grantee));
        ELSE
            PERFORM pgphi._audit('revoke_' || OLD.privilege, OLD.key_id, NULL, 'ok', format('from %s', OLD.grantee));
        END IF;
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
CREATE TRIGGER key_grants_audit AFTER INSERT OR DELETE ON pgphi.key_grants
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();
CREATE TRIGGER keys_audit AFTER UPDATE ON pgphi.keys
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();

-- Walks the chain. Pass a head_hash recorded earlier (outside the database)
-- to detect rows removed from the end, or a chain recomputed from scratch.
CREATE FUNCTION pgphi.verify_audit_log(recorded_head text DEFAULT NULL,
        OUT intact boolean, OUT rows_checked bigint, OUT first_bad_seq bigint, OUT problem text,
        OUT head_seq bigint, OUT head_hash text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r pgphi.audit_log;
    prev bytea := '\x';
    recorded_found boolean := recorded_head IS NULL;
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
    IF NOT recorded_found THEN
        intact := false;
        problem := 'the recorded head hash is not in the chain: rows were removed from its end, or the chain was rewritten';
    END IF;
END
$$;

------------------------------------------------------------------------------
-- Volume: values encrypted and decrypted per role, key and time window
-- (pgphi.key_use_window), counted in shared memory, written by the audit
-- writer every few seconds.
------------------------------------------------------------------------------

CREATE TABLE pgphi.key_use_stats (
    window_start timestamptz NOT NULL,
    role_name    text NOT NULL,
    key_id       integer NOT NULL,
    encryptions  bigint NOT NULL DEFAULT 0,
    decryptions  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (window_start, role_name, key_id)
);
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_use_stats', '');

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
        OUT dropped_counts bigint)
    AS 'MODULE_PATHNAME', 'pgphi_audit_queue_status' LANGUAGE C VOLATILE STRICT;

------------------------------------------------------------------------------
-- Grants, cryptoperiods and the inventory.
------------------------------------------------------------------------------

CREATE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_name USING ERRCODE = 'undefined_object';
    END IF;
    IF grantee IS NULL THEN
        RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF granting THEN
        -- Separation of duties: custodians and auditors hold no key through
        -- their group roles, and nobody grants a key to themselves.
        IF grantee IN ('pgphi_key_custodian'::regrole, 'pgphi_key_auditor'::regrole) THEN
            RAISE EXCEPTION 'pgphi keys cannot be granted to %', grantee
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Grant keys to the roles of the people or applications that use them.';
        END IF;
        IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = session_user)
           AND pg_has_role(session_user, grantee::oid, 'MEMBER') THEN
            RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to',
                            session_user, key_name
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Another key custodian must make this grant.';
        END IF;
        INSERT INTO pgphi.key_grants (key_id, privilege, grantee) VALUES (target_id, privilege, grantee)
            ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege AND g.grantee = _change_key_grant.grantee;
    END IF;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RETURN changed > 0;
END
$$;

-- Each returns whether it changed anything (false: the grant was already so).
CREATE FUNCTION pgphi.grant_decrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', true) $$;
CREATE FUNCTION pgphi.revoke_decrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', false) $$;
CREATE FUNCTION pgphi.grant_encrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', true) $$;
CREATE FUNCTION pgphi.revoke_encrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', false) $$;

CREATE FUNCTION pgphi.set_cryptoperiod(key_name text, cryptoperiod interval) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgphi.keys k SET cryptoperiod = set_cryptoperiod.cryptoperiod WHERE k.name = key_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_name USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

-- Whether a role may encrypt or decrypt under a key: a grant to it or to a
-- role whose privileges it has, as decrypt_phi and encrypt_phi check.
CREATE FUNCTION pgphi.has_key_privilege(role regrole, key_name text, privilege text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege "%"', privilege
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF pgphi._key_id(key_name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_name USING ERRCODE = 'undefined_object';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = pgphi._key_id(key_name) AND g.privilege = has_key_privilege.privilege
                      AND pg_has_role(role, g.grantee::oid, 'USAGE'));
END
$$;

-- Every key version, with what an auditor asks about it. Never the DEK.
CREATE VIEW pgphi.key_inventory AS
    SELECT k.name AS key_name, k.key_id, k.created_by AS owner, k.provider, k.kek_ref,
           v.version, v.state, v.kek_version, v.created_at, k.rotated_at, v.retired_at, v.destroyed_at,
           k.cryptoperiod,
           CASE WHEN v.state = 'active' THEN v.created_at + k.cryptoperiod END AS rotate_by,
           coalesce(v.state = 'active' AND v.created_at + k.cryptoperiod < pg_catalog.now(), false)
               AS rotation_overdue,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'encrypt' ORDER BY 1) AS encrypt_grantees,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'decrypt' ORDER BY 1) AS decrypt_grantees
      FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id);

------------------------------------------------------------------------------
-- Views for authorized roles.
------------------------------------------------------------------------------

-- Creates a view of a table with its encrypted columns decrypted, and lets
-- `grant_to` read it. The view reads the table with its owner's rights, but
-- decrypts with the reader's: the reader still needs pgphi_decrypt and a
-- decrypt grant on the keys. Columns default to those of type
-- pgphi.encrypted; name bytea columns explicitly. With context_column, every
-- value is authenticated against that column (then key_name is required).
CREATE FUNCTION pgphi.create_decrypted_view(tbl regclass, view_name text, grant_to regrole,
        columns name[] DEFAULT NULL, key_name text DEFAULT NULL, context_column name DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    select_list text[] := '{}';
    decrypted name[] := '{}';
    a record;
    missing name;
    view_schema text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE c.oid = tbl);
BEGIN
    IF view_name IS NULL OR grant_to IS NULL THEN
        RAISE EXCEPTION 'create_decrypted_view needs a view name and a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF context_column IS NOT NULL AND key_name IS NULL THEN
        RAISE EXCEPTION 'a context column needs the key name too'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass key_name => the key the columns use.';
    END IF;
    IF columns IS NOT NULL THEN
        SELECT c INTO missing FROM unnest(columns) c
         WHERE NOT EXISTS (SELECT FROM pg_attribute x WHERE x.attrelid = tbl AND x.attname = c
                              AND x.attnum > 0 AND NOT x.attisdropped
                              AND x.atttypid IN ('pgphi.encrypted'::regtype, 'bytea'::regtype));
        IF FOUND THEN
            RAISE EXCEPTION 'relation % has no pgphi.encrypted or bytea column "%"', tbl, missing
                USING ERRCODE = 'undefined_column';
        END IF;
    END IF;
    FOR a IN SELECT x.attname, x.atttypid FROM pg_attribute x
              WHERE x.attrelid = tbl AND x.attnum > 0 AND NOT x.attisdropped ORDER BY x.attnum LOOP
        IF (columns IS NULL AND a.atttypid = 'pgphi.encrypted'::regtype) OR a.attname = ANY (columns) THEN
            select_list := select_list || CASE
                WHEN context_column IS NOT NULL THEN
                    format('pgphi.decrypt_phi(%I, %L, %I::text) AS %I', a.attname, key_name, context_column, a.attname)
                WHEN key_name IS NOT NULL THEN
                    format('pgphi.decrypt_phi(%I, %L) AS %I', a.attname, key_name, a.attname)
                ELSE format('pgphi.decrypt_phi(%I) AS %I', a.attname, a.attname) END;
            decrypted := decrypted || a.attname;
        ELSE
            select_list := select_list || format('%I', a.attname);
        END IF;
    END LOOP;
    IF cardinality(decrypted) = 0 THEN
        RAISE EXCEPTION 'relation % has no pgphi.encrypted columns', tbl
            USING ERRCODE = 'undefined_column', HINT = 'Name bytea columns that hold ciphertexts in columns => ...';
    END IF;
    EXECUTE format('CREATE VIEW %I.%I AS SELECT %s FROM %s', view_schema, view_name,
                   array_to_string(select_list, ', '), tbl);
    EXECUTE format('GRANT SELECT ON %I.%I TO %s', view_schema, view_name, grant_to);
    IF NOT pg_has_role(grant_to, 'pgphi_decrypt', 'USAGE') THEN
        RAISE NOTICE 'role % is not a member of pgphi_decrypt and cannot decrypt yet', grant_to
            USING HINT = format('GRANT pgphi_decrypt TO %s;', grant_to);
    END IF;
    IF key_name IS NOT NULL AND NOT pgphi.has_key_privilege(grant_to, key_name, 'decrypt') THEN
        RAISE NOTICE 'role % holds no decrypt grant on pgphi key "%"', grant_to, key_name
            USING HINT = format('A key custodian runs SELECT pgphi.grant_decrypt(%L, %L);', key_name, grant_to::text);
    END IF;
    RAISE NOTICE 'view %.% decrypts % for %', view_schema, view_name, array_to_string(decrypted, ', '), grant_to;
END
$$;

------------------------------------------------------------------------------
-- Privileges of the new objects, and grants that keep 0.1.0's behaviour.
------------------------------------------------------------------------------

REVOKE ALL ON pgphi.key_grants, pgphi.audit_log, pgphi.key_use_stats, pgphi.key_use, pgphi.key_inventory FROM PUBLIC;
REVOKE ALL ON FUNCTION pgphi._audit_row_hash(bytea, pgphi.audit_log), pgphi._audit_log_chain(),
    pgphi._audit_log_is_append_only(), pgphi._audit(text, integer, integer, text, text),
    pgphi._record_audit_event(timestamptz, text, text, text, integer, text, integer, text, text),
    pgphi._audit_key_change(), pgphi._record_key_use(timestamptz, text, integer, bigint, bigint),
    pgphi._change_key_grant(text, regrole, text, boolean),
    pgphi.grant_decrypt(text, regrole), pgphi.revoke_decrypt(text, regrole),
    pgphi.grant_encrypt(text, regrole), pgphi.revoke_encrypt(text, regrole),
    pgphi.set_cryptoperiod(text, interval), pgphi.verify_audit_log(text), pgphi.audit_queue_status()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi._change_key_grant(text, regrole, text, boolean),
    pgphi.grant_decrypt(text, regrole), pgphi.revoke_decrypt(text, regrole),
    pgphi.grant_encrypt(text, regrole), pgphi.revoke_encrypt(text, regrole),
    pgphi.set_cryptoperiod(text, interval) TO pgphi_key_custodian;
GRANT SELECT ON pgphi.key_inventory TO pgphi_key_custodian, pgphi_key_auditor;
GRANT SELECT ON pgphi.audit_log, pgphi.key_use_stats, pgphi.key_use TO pgphi_key_auditor;
GRANT EXECUTE ON FUNCTION pgphi.verify_audit_log(text) TO pgphi_key_auditor;
GRANT EXECUTE ON FUNCTION pgphi.audit_queue_status() TO pgphi_key_auditor, pg_monitor;
GRANT EXECUTE ON FUNCTION pgphi.key_usage() TO pgphi_key_auditor;

-- In 0.1.0 the roles alone decided: members of pgphi_encrypt and
-- pgphi_decrypt could use every key. Existing keys keep that (as grants that
-- custodians can now revoke); keys created from now on start with no grants.
INSERT INTO pgphi.key_grants (key_id, privilege, grantee)
    SELECT k.key_id, p.privilege, p.grantee::regrole
      FROM pgphi.keys k,
           (VALUES ('encrypt', 'pgphi_encrypt'), ('decrypt', 'pgphi_decrypt')) AS p (privilege, grantee);
