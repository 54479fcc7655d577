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
DECLARE
    target_id integer := pgphi._key_id(key_name);
BEGIN
    IF privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege "%"', privilege
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" does not exist', key_name USING ERRCODE = 'undefined_object';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = has_key_privilege.privilege
                      AND pg_has_role(role, g.grantee::oid, 'USAGE'));
END
$$;


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

REVOKE ALL ON pgphi.key_grants, pgphi.audit_log, pgphi.key_use_stats, pgphi.key_use FROM PUBLIC;
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

------------------------------------------------------------------------------
-- The key inventory, over both kinds of key.
------------------------------------------------------------------------------

-- Every key version, with what an auditor asks about it. Never the DEK.
CREATE VIEW pgphi.key_inventory AS
    SELECT k.name AS key_name, k.key_id, k.purpose, k.created_by AS owner, k.provider, k.kek_ref,
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
REVOKE ALL ON pgphi.key_inventory FROM PUBLIC;
GRANT SELECT ON pgphi.key_inventory TO pgphi_key_custodian, pgphi_key_auditor;
