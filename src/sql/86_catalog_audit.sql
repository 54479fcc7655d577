-- Every change to pgphi's catalog is audited, by whatever path.
--
-- Direct DML by a superuser must not get past the audit (a grant handed to
-- another role, a key renamed, a KEK reference changed, a version deleted,
-- un-destroyed or un-retired). Every row change of every pgphi table but
-- audit_log and audit_anchors (append-only already) is seen by
-- pgphi._audit_catalog_change(), attached in 99_catalog_audit_triggers.sql:
--   * a change made by a pgphi function keeps the semantic record that
--     function's path already writes (create, rotate, rewrap, retire,
--     destroy, grant_*, revoke_*, set_cryptoperiod, approve_destroy ...);
--   * any other change (direct DML, a restore, someone's own function) is
--     recorded as catalog_insert, catalog_update, catalog_delete or
--     catalog_truncate, naming the table, the row, every changed column with
--     its old and new value, and how the change was made. Binary columns
--     (the wrapped DEK) appear only as a short SHA-256 digest.
-- Which function is writing comes from the function manager (see
-- src/pg/policy/catalog_audit.cpp), confirmed by the statement's call stack, so no
-- setting or name a caller chooses can make direct DML pass for pgphi's.
-- DDL that could silence the triggers (ALTER TABLE ... DISABLE TRIGGER, DROP
-- TRIGGER, any DDL on pgphi's objects) is refused outside the extension's
-- scripts by an event trigger, and each refusal reaches the audit log.

-- The pgphi function running the current statement, or NULL.
CREATE FUNCTION pgphi._catalog_writer() RETURNS regprocedure
    AS 'MODULE_PATHNAME', 'pgphi_catalog_writer' LANGUAGE C VOLATILE;

-- Whether CREATE or ALTER EXTENSION is running a script.
CREATE FUNCTION pgphi._in_extension_script() RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_in_extension_script' LANGUAGE C VOLATILE;

-- Whether an ALTER EXTENSION command adds members to pgphi or drops them.
CREATE FUNCTION pgphi._changes_pgphi_members(command pg_ddl_command) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_changes_pgphi_members' LANGUAGE C STABLE STRICT;

-- Queues a refused command for the audit log (it outlives the abort).
CREATE FUNCTION pgphi._queue_catalog_refusal(action text, detail text) RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_queue_catalog_refusal' LANGUAGE C VOLATILE;

-- Whether the statement that fired a catalog trigger is one of writer's own:
-- the first function frame of the call stack (PG_CONTEXT, whose first line is
-- the trigger's frame) must be writer, and the statement it ran must be text
-- of writer's body. Somebody's function or trigger that runs inside a pgphi
-- function (a user trigger fired by reencrypt's UPDATE, say) fails this.
CREATE FUNCTION pgphi._writer_ran_statement(writer regprocedure, stack text) RETURNS boolean
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    frames text[] := string_to_array(stack, E'\n');
    fn_name name;
    fn_source text;
    fn_language name;
    frame_signature text;
    statement text;
BEGIN
    SELECT p.proname, p.prosrc, l.lanname INTO fn_name, fn_source, fn_language
      FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = writer;
    IF fn_name IS NULL THEN
        RETURN false;
    END IF;
    FOR i IN 2 .. coalesce(array_length(frames, 1), 0) LOOP
        IF frames[i] LIKE 'PL/pgSQL function %' THEN
            -- The signature, qualified unless it was visible when compiled.
            frame_signature := substring(frames[i] FROM '^PL/pgSQL function (.*) line [0-9]+ ');
            statement := array_to_string(frames[2:i - 1], E'\n');
            IF fn_language <> 'plpgsql' OR statement NOT LIKE 'SQL statement "%"'
               OR (frame_signature IS DISTINCT FROM writer::text
                   AND 'pgphi.' || frame_signature IS DISTINCT FROM writer::text) THEN
                RETURN false;
            END IF;
            statement := rtrim(substr(statement, 16, length(statement) - 16));
            RETURN length(statement) > 0 AND strpos(fn_source, statement) > 0;
        ELSIF frames[i] LIKE 'SQL function "%' THEN
            -- A SQL function's statements have no frame of their own.
            RETURN i = 2 AND fn_language = 'sql' AND frames[i] LIKE 'SQL function "' || fn_name || '" %';
        END IF;
    END LOOP;
    RETURN false;
END
$$;

-- How a value appears in a catalog audit record: its text, quoted, or NULL;
-- a binary value (a wrapped DEK, a ciphertext) only as a digest.
CREATE FUNCTION pgphi._audit_value(value jsonb, binary_value boolean) RETURNS text
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN value IS NULL OR value = 'null'::jsonb THEN 'NULL'
        WHEN binary_value THEN 'sha256:' || left(encode(sha256(decode(substr(value #>> '{}', 3), 'hex')), 'hex'), 16)
            || ' (' || (length(value #>> '{}') - 2) / 2 || ' bytes)'
        WHEN jsonb_typeof(value) IN ('number', 'boolean') THEN value #>> '{}'
        ELSE quote_literal(value #>> '{}') END
$$;

-- The row trigger (AFTER INSERT OR UPDATE OR DELETE) and statement trigger
-- (BEFORE TRUNCATE) of every pgphi table but audit_log.
CREATE FUNCTION pgphi._audit_catalog_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    writer regprocedure := pgphi._catalog_writer();
    stack text;
    how text;
    old_row jsonb := CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END;
    new_row jsonb := CASE WHEN TG_OP IN ('UPDATE', 'INSERT') THEN to_jsonb(NEW) END;
    row_values jsonb := coalesce(new_row, old_row);
    row_key integer;
    row_version integer;
    identity text;
    changes text[] := '{}';
    rows_before bigint;
    c record;
BEGIN
    IF writer IS NOT NULL AND writer = to_regprocedure('pgphi._citus_apply_row(name, jsonb, jsonb)') THEN
        -- A Citus worker's copy of the coordinator's catalog (87_citus.sql).
        how := 'copied from the Citus coordinator by pgphi._citus_apply_row()';
    ELSIF writer IS NOT NULL THEN
        GET DIAGNOSTICS stack = PG_CONTEXT;
        -- Under session_replication_role = replica the semantic audit
        -- triggers do not fire: then pgphi's own change is recorded here.
        IF pgphi._writer_ran_statement(writer, stack)
           AND current_setting('session_replication_role') <> 'replica' THEN
            -- pgphi's own change: its function's path writes the semantic
            -- record. Two paths had none: a renewed destroy or rekey approval.
            IF TG_TABLE_NAME = 'destroy_approvals' AND TG_OP = 'UPDATE' THEN
                IF (new_row -> 'approved_at') IS DISTINCT FROM (old_row -> 'approved_at') THEN
                    PERFORM pgphi._audit('approve_destroy', (new_row ->> 'key_id')::integer,
                                         (new_row ->> 'version')::integer, 'ok', 'approval renewed');
                END IF;
            ELSIF TG_TABLE_NAME = 'rekey_approvals' AND TG_OP = 'UPDATE' THEN
                IF (new_row -> 'approved_at') IS DISTINCT FROM (old_row -> 'approved_at') THEN
                    PERFORM pgphi._audit('approve_rekey', (new_row ->> 'key_id')::integer, NULL, 'ok',
                                         format('to provider %s, KEK %s; approval renewed', new_row ->> 'provider',
                                                new_row ->> 'kek_ref'));
                END IF;
            END IF;
            RETURN NULL;
        END IF;
        how := CASE WHEN pgphi._writer_ran_statement(writer, stack)
                    THEN format('by %s under session_replication_role = replica', writer)
                    ELSE format('not by a pgphi function (inside %s)', writer) END;
    ELSIF pgphi._in_extension_script() THEN
        how := 'by a pgphi extension script';
    ELSE
        how := 'by direct DML, not by a pgphi function';
    END IF;

    IF TG_OP = 'TRUNCATE' THEN
        EXECUTE format('SELECT count(*) FROM ONLY %I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME) INTO rows_before;
        PERFORM pgphi._audit('catalog_truncate', NULL, NULL, 'ok',
                             format('%I.%I truncated (%s rows); %s', TG_TABLE_SCHEMA, TG_TABLE_NAME, rows_before, how));
        RETURN NULL;
    END IF;

    -- The row, by its primary key (the old key when it changed).
    SELECT string_agg(format('%s %s', a.attname, pgphi._audit_value(coalesce(old_row, new_row) -> a.attname::text, false)),
                      ', ' ORDER BY k.n)
      INTO identity
      FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = TG_RELID AND i.indisprimary;

    FOR c IN SELECT a.attname::text AS name,
                    a.atttypid IN ('bytea'::regtype, 'pgphi.encrypted'::regtype) AS binary_value
               FROM pg_attribute a
              WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LOOP
        IF TG_OP = 'UPDATE' THEN
            IF (old_row -> c.name) IS DISTINCT FROM (new_row -> c.name) THEN
                changes := changes || format('%s %s -> %s', c.name, pgphi._audit_value(old_row -> c.name, c.binary_value),
                                             pgphi._audit_value(new_row -> c.name, c.binary_value));
            END IF;
        ELSE
            changes := changes || format('%s %s', c.name, pgphi._audit_value(row_values -> c.name, c.binary_value));
        END IF;
    END LOOP;
    IF TG_OP = 'UPDATE' AND cardinality(changes) = 0 THEN
        changes := ARRAY['no column changed'];
    END IF;

    IF row_values ? 'key_id' AND jsonb_typeof(row_values -> 'key_id') = 'number' THEN
        row_key := (row_values ->> 'key_id')::integer;
    END IF;
    IF row_values ? 'version' AND jsonb_typeof(row_values -> 'version') = 'number' THEN
        row_version := (row_values ->> 'version')::integer;
    END IF;
    PERFORM pgphi._audit(CASE TG_OP WHEN 'INSERT' THEN 'catalog_insert' WHEN 'UPDATE' THEN 'catalog_update'
                                    ELSE 'catalog_delete' END,
                         row_key, row_version, 'ok',
                         format('%I.%I row (%s) %s: %s; %s', TG_TABLE_SCHEMA, TG_TABLE_NAME, coalesce(identity, ''),
                                CASE TG_OP WHEN 'INSERT' THEN 'inserted' WHEN 'UPDATE' THEN 'changed' ELSE 'deleted' END,
                                array_to_string(changes, ', '), how));
    RETURN NULL;
END
$$;

-- DDL on pgphi's objects outside the extension's scripts and pgphi's own
-- functions: ALTER TABLE (DISABLE TRIGGER, RENAME, DROP COLUMN ...), CREATE
-- or DROP TRIGGER, RULE or POLICY on its tables, DROP TABLE, CREATE OR
-- REPLACE of its functions, new objects in its schema. GRANT and REVOKE stay
-- possible (pg_dump restores privileges with them); every change a grant
-- allows is still audited. Not SECURITY DEFINER: the refusal records who
-- tried.
CREATE FUNCTION pgphi._guard_catalog_ddl() RETURNS event_trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text;
    writer regprocedure;
    stack text;
    recorded boolean := false;
BEGIN
    -- (A renamed schema pgphi leaves no name below to call.)
    IF NOT EXISTS (SELECT FROM pg_namespace n WHERE n.nspname = 'pgphi') THEN
        RAISE EXCEPTION 'schema pgphi cannot be renamed' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_TAG IN ('GRANT', 'REVOKE', 'ALTER DEFAULT PRIVILEGES') THEN
        RETURN;
    END IF;
    -- Only pg_catalog is consulted until a pgphi object is found: anyone's
    -- DDL fires this.
    IF TG_EVENT = 'ddl_command_end' THEN
        -- CREATE EXTENSION pgphi itself: its script is checked as it runs, but
        -- the schema PostgreSQL makes for it beforehand is not part of the
        -- extension (in_extension is false). Only with another event trigger
        -- already in the database (Citus has some) does this trigger see that
        -- command at all.
        IF TG_TAG = 'CREATE EXTENSION' AND EXISTS (
               SELECT FROM pg_event_trigger_ddl_commands() c
                WHERE c.object_type = 'extension' AND c.object_identity = 'pgphi') THEN
            RETURN;
        END IF;
        SELECT c.object_identity INTO target
          FROM pg_event_trigger_ddl_commands() c
          LEFT JOIN pg_trigger t ON c.classid = 'pg_trigger'::regclass AND t.oid = c.objid
          LEFT JOIN pg_rewrite r ON c.classid = 'pg_rewrite'::regclass AND r.oid = c.objid
          LEFT JOIN pg_policy p ON c.classid = 'pg_policy'::regclass AND p.oid = c.objid
          LEFT JOIN pg_class owner ON owner.oid = coalesce(t.tgrelid, r.ev_class, p.polrelid)
         WHERE NOT c.in_extension
           AND (c.schema_name = 'pgphi' OR (c.object_type = 'schema' AND c.object_identity = 'pgphi')
                OR owner.relnamespace = 'pgphi'::regnamespace
                -- A member, or a trigger, rule or policy of one, wherever it
                -- now is (ALTER ... SET SCHEMA).
                OR EXISTS (SELECT FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                            WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
                              AND e.extname = 'pgphi'
                              AND ((d.classid = c.classid AND d.objid = c.objid)
                                   OR (d.classid = 'pg_class'::regclass AND d.objid = owner.oid))))
         LIMIT 1;
        -- ALTER EXTENSION pgphi ADD or DROP (members taken out of the
        -- extension would escape the check above).
        IF target IS NULL AND TG_TAG = 'ALTER EXTENSION' THEN
            SELECT 'extension pgphi''s members' INTO target
              FROM pg_event_trigger_ddl_commands() c
             WHERE c.object_identity = 'pgphi' AND pgphi._changes_pgphi_members(c.command)
             LIMIT 1;
        END IF;
    ELSIF TG_EVENT = 'sql_drop' AND TG_TAG <> 'DROP EXTENSION' THEN
        SELECT d.object_identity INTO target
          FROM pg_event_trigger_dropped_objects() d
         WHERE d.schema_name = 'pgphi' OR (d.object_type = 'schema' AND d.object_identity = 'pgphi')
            OR (d.object_type IN ('trigger', 'rule', 'policy', 'table constraint', 'default value')
                AND d.address_names[1] = 'pgphi')
         LIMIT 1;
    END IF;
    IF target IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        IF pgphi._in_extension_script() THEN
            RETURN;
        END IF;
        writer := pgphi._catalog_writer();
        IF writer IS NOT NULL THEN
            GET DIAGNOSTICS stack = PG_CONTEXT;
            IF pgphi._writer_ran_statement(writer, stack) THEN
                RETURN;
            END IF;
        END IF;
        PERFORM pgphi._queue_catalog_refusal('catalog_ddl', left(format('%s: %s', TG_TAG, target), 120));
        recorded := true;
    EXCEPTION WHEN undefined_function THEN
        -- The command moved one of the helpers above out of schema pgphi:
        -- refused all the same, but there is nothing left to record it with.
        NULL;
    END;
    RAISE EXCEPTION '% on pgphi''s catalog is not allowed', TG_TAG
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = format('%s belongs to pgphi; changing it outside pgphi''s functions and scripts could keep changes out of the audit log.%s',
                              target, CASE WHEN recorded THEN ' The attempt was recorded.' ELSE '' END),
              HINT = 'Use pgphi''s functions, or ALTER EXTENSION pgphi UPDATE.';
END
$$;

CREATE EVENT TRIGGER pgphi_guard_catalog_ddl ON ddl_command_end EXECUTE FUNCTION pgphi._guard_catalog_ddl();

CREATE EVENT TRIGGER pgphi_guard_catalog_drop ON sql_drop EXECUTE FUNCTION pgphi._guard_catalog_ddl();

-- Also under session_replication_role = replica.
ALTER EVENT TRIGGER pgphi_guard_catalog_ddl ENABLE ALWAYS;

ALTER EVENT TRIGGER pgphi_guard_catalog_drop ENABLE ALWAYS;
