-- Citus: one key catalog on every node of a cluster (docs/citus.md).
--
-- pgphi does not depend on Citus: nothing here reads Citus's catalog or calls
-- its functions but through dynamic SQL, after checking that it is there.
--
-- The key catalog (keys, versions, grants, approvals, limits, break-glass)
-- is administered on the coordinator and copied to every other node, with
-- the same key ids and versions, in the same transaction: each change to one
-- of those tables (trigger citus_forward) is written, by primary key, into a
-- Citus reference table, pgphi_citus.catalog_rows, which pgphi.citus_setup()
-- makes. Citus writes a reference table on every node that holds a copy, in
-- the writer's distributed transaction, committed with two-phase commit; a
-- trigger on each copy (pgphi._citus_apply) applies the row to that node's
-- own catalog. So a change reaches every node or none, and nodes never
-- disagree about a committed key version. A node added later gets the
-- reference table with its data and pgphi.citus_sync() builds its catalog
-- from it. The audit trail (audit_log, its anchors and volumes), the
-- progress of batch procedures and seal counts stay per node: each node
-- keeps and anchors its own hash chain, which pgphi.citus_verify_audit_logs()
-- checks on every node from the coordinator.

-- This node's part in a Citus cluster: 'coordinator' (also a node that is
-- not in a cluster yet: Citus numbers it group 0), 'worker', or NULL where
-- Citus is not installed.
CREATE FUNCTION pgphi._citus_node_role() RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    local_group integer;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT g.groupid FROM pg_catalog.pg_dist_local_group g' INTO local_group;
    RETURN CASE WHEN local_group = 0 THEN 'coordinator' WHEN local_group > 0 THEN 'worker' END;
END
$$;

-- The tables copied to every node, parents first (the order a new node's
-- catalog is built in), and the columns of each that stay per node (a
-- break-glass event's count of the values decrypted on that node).
CREATE FUNCTION pgphi._citus_replicated_tables(OUT relation_name name, OUT local_columns name[])
    RETURNS SETOF record
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
    VALUES ('keys'::name, '{}'::name[]), ('key_versions', '{}'), ('key_grants', '{}'),
           ('key_grant_members', '{}'), ('grant_approvals', '{}'), ('destroy_approvals', '{}'),
           ('rekey_approvals', '{}'), ('resume_approvals', '{}'), ('decrypt_limits', '{}'),
           ('break_glass_roles', '{}'), ('break_glass_events', '{values_decrypted}')
$$;

-- A row's primary key, as the part of its to_jsonb() form that names it.
CREATE FUNCTION pgphi._citus_row_key(tbl regclass, row_data jsonb) RETURNS jsonb
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_object_agg(a.attname, row_data -> a.attname::text)
      FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) AS k(attnum)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = tbl AND i.indisprimary
$$;

-- Applies one row of the coordinator's catalog to this node's: row_data is
-- the row (to_jsonb), or NULL for a row that is gone. Roles travel by name
-- (regrole), so a grant names the same role on every node whatever its oid.
-- Run by the trigger on this node's copy of pgphi_citus.catalog_rows and by
-- citus_sync(); the catalog audit records each change it makes.
CREATE FUNCTION pgphi._citus_apply_row(relation_name name, row_key jsonb, row_data jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl regclass;
    local_columns name[];
    key_match text;
    all_columns text;
    copied_columns text;
    current_row jsonb;
    wanted_row jsonb;
BEGIN
    SELECT r.local_columns INTO local_columns FROM pgphi._citus_replicated_tables() r
     WHERE r.relation_name = _citus_apply_row.relation_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi does not copy table "%" between Citus nodes', _citus_apply_row.relation_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    tbl := format('pgphi.%I', _citus_apply_row.relation_name)::regclass;
    SELECT string_agg(format('t.%1$I IS NOT DISTINCT FROM r.%1$I', a.attname), ' AND ')
      INTO key_match
      FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) AS k(attnum)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = tbl AND i.indisprimary;
    IF row_data IS NULL THEN
        EXECUTE format('DELETE FROM %s t USING jsonb_populate_record(NULL::%s, $1) r WHERE %s', tbl, tbl, key_match)
            USING row_key;
        RETURN;
    END IF;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
           string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FILTER (WHERE a.attname <> ALL (local_columns))
      INTO all_columns, copied_columns
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped;
    EXECUTE format('SELECT to_jsonb(t) FROM %s t, jsonb_populate_record(NULL::%s, $1) r WHERE %s', tbl, tbl, key_match)
        INTO current_row USING row_data;
    IF current_row IS NULL THEN
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM jsonb_populate_record(NULL::%s, $1)',
                       tbl, all_columns, all_columns, tbl)
            USING row_data;
        -- A version reaching this node gets this node's own seal
        -- reservation, empty and of no server life (incarnation 0), so the
        -- node may encrypt under it: its key broker reserves as it seals,
        -- and counts only this node's values (src/pg/shared/shared_state.cpp
        -- gives each node its share of the version's limit).
        IF _citus_apply_row.relation_name = 'key_versions' THEN
            PERFORM pgphi._reserve_seals((row_data ->> 'key_id')::integer, (row_data ->> 'version')::integer, 0, 0,
                                         true);
        END IF;
        RETURN;
    END IF;
    -- Unchanged rows (citus_sync() goes over all of them) are left alone.
    EXECUTE format('SELECT to_jsonb(r) FROM jsonb_populate_record(NULL::%s, $1) r', tbl) INTO wanted_row USING row_data;
    IF (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(current_row) e WHERE e.key <> ALL (local_columns))
       IS DISTINCT FROM
       (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(wanted_row) e WHERE e.key <> ALL (local_columns)) THEN
        EXECUTE format('UPDATE %s t SET (%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1)) '
                       'FROM jsonb_populate_record(NULL::%s, $1) r WHERE %s',
                       tbl, copied_columns, copied_columns, tbl, tbl, key_match)
            USING row_data;
    END IF;
END
$$;

-- The trigger on every copy of pgphi_citus.catalog_rows: applies what the
-- coordinator wrote there to this node's catalog (the coordinator's own
-- catalog already holds it).
CREATE FUNCTION pgphi._citus_apply() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pgphi._citus_node_role() IS DISTINCT FROM 'worker' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND (OLD.relation_name, OLD.row_key) IS DISTINCT FROM
                                                 (NEW.relation_name, NEW.row_key)) THEN
        PERFORM pgphi._citus_apply_row(OLD.relation_name, OLD.row_key, NULL);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pgphi._citus_apply_row(NEW.relation_name, NEW.row_key, NEW.row_data);
    END IF;
    RETURN NULL;
END
$$;

-- The trigger on each copied table (citus_forward): once citus_setup() has
-- run, a change on the coordinator goes into pgphi_citus.catalog_rows, in
-- the same transaction; a change on a worker is refused, as it would reach
-- no other node, unless it is one being applied from the coordinator or
-- touches only a node's own columns. Without Citus it does nothing.
CREATE FUNCTION pgphi._citus_forward() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    local_columns name[];
    old_row jsonb := CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END;
    new_row jsonb := CASE WHEN TG_OP IN ('UPDATE', 'INSERT') THEN to_jsonb(NEW) END;
    old_key jsonb;
    new_key jsonb;
BEGIN
    IF to_regclass('pgphi_citus.catalog_rows') IS NULL THEN
        RETURN NULL;
    END IF;
    -- The copy of a coordinator's row, and the pruning of grant members that
    -- a role membership change (which Citus carries to every node) makes on
    -- each node alike: a node's own, not forwarded.
    IF pgphi._catalog_writer() = ANY (ARRAY[to_regprocedure('pgphi._citus_apply_row(name, jsonb, jsonb)'),
                                              to_regprocedure('pgphi._prune_grant_members()')]) THEN
        RETURN NULL;
    END IF;
    SELECT r.local_columns INTO local_columns FROM pgphi._citus_replicated_tables() r
     WHERE r.relation_name = TG_TABLE_NAME;
    IF TG_OP = 'UPDATE' AND (old_row - local_columns::text[]) = (new_row - local_columns::text[]) THEN
        RETURN NULL;   -- a node's own count
    END IF;
    IF pgphi._citus_node_role() IS DISTINCT FROM 'coordinator' THEN
        RAISE EXCEPTION 'pgphi keys are administered on the Citus coordinator'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = format('A change to pgphi.%s on a worker node would reach no other node.', TG_TABLE_NAME),
                  HINT = 'Connect to the coordinator and run it there; it reaches every node.';
    END IF;
    IF TG_TABLE_NAME = 'key_versions' AND (new_row ->> 'state') = 'destroyed' THEN
        -- Shredding overwrites the wrapped DEK at commit, which a prepared
        -- transaction (Citus's two-phase commit on the workers) cannot do.
        RAISE EXCEPTION 'pgphi cannot destroy key versions in a Citus cluster yet'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Crypto-shredding runs when the transaction commits, and Citus commits the workers'' part with two-phase commit.',
                  HINT = 'The version stays retired: refused for decryption on every node.';
    END IF;
    IF old_row IS NOT NULL THEN
        old_key := pgphi._citus_row_key(TG_RELID, old_row);
    END IF;
    IF new_row IS NOT NULL THEN
        new_key := pgphi._citus_row_key(TG_RELID, new_row);
    END IF;
    IF old_key IS NOT NULL AND old_key IS DISTINCT FROM new_key THEN
        EXECUTE 'DELETE FROM pgphi_citus.catalog_rows c WHERE c.relation_name = $1 AND c.row_key = $2'
            USING TG_TABLE_NAME, old_key;
    END IF;
    IF new_key IS NOT NULL THEN
        EXECUTE 'INSERT INTO pgphi_citus.catalog_rows AS c (relation_name, row_key, row_data) VALUES ($1, $2, $3)
                 ON CONFLICT (relation_name, row_key) DO UPDATE SET row_data = EXCLUDED.row_data'
            USING TG_TABLE_NAME, new_key, new_row;
    END IF;
    RETURN NULL;
END
$$;

-- On a worker, before any row is written (a key made there would take an id
-- the coordinator's sequence gives out too): refused unless the change is
-- being applied from the coordinator. The row trigger refuses the rest.
CREATE FUNCTION pgphi._citus_coordinator_only() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF to_regclass('pgphi_citus.catalog_rows') IS NOT NULL
       AND NOT coalesce(pgphi._catalog_writer() = ANY (ARRAY[to_regprocedure('pgphi._citus_apply_row(name, jsonb, jsonb)'),
                                                       to_regprocedure('pgphi._prune_grant_members()')]), false)
       AND pgphi._citus_node_role() IS DISTINCT FROM 'coordinator' THEN
        RAISE EXCEPTION 'pgphi keys are administered on the Citus coordinator'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = format('A change to pgphi.%s on a worker node would reach no other node.', TG_TABLE_NAME),
                  HINT = 'Connect to the coordinator and run it there; it reaches every node.';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.keys
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.key_versions
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.key_grants
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.key_grant_members
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.grant_approvals
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.destroy_approvals
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.rekey_approvals
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.resume_approvals
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.decrypt_limits
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR UPDATE OR DELETE ON pgphi.break_glass_roles
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_coordinator_only BEFORE INSERT OR DELETE ON pgphi.break_glass_events
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._citus_coordinator_only();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.keys
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.key_versions
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.key_grants
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.key_grant_members
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.grant_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.destroy_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.rekey_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.resume_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.decrypt_limits
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.break_glass_roles
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();
CREATE TRIGGER citus_forward AFTER INSERT OR UPDATE OR DELETE ON pgphi.break_glass_events
    FOR EACH ROW EXECUTE FUNCTION pgphi._citus_forward();

-- Builds this node's catalog from its copy of pgphi_citus.catalog_rows: rows
-- added or changed, parents first, then rows the coordinator no longer has,
-- children first. Returns how many rows it changed.
CREATE FUNCTION pgphi._citus_sync_local() RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    r record;
    gone boolean;
    changed bigint := 0;
BEGIN
    IF pgphi._citus_node_role() IS DISTINCT FROM 'worker' THEN
        RAISE EXCEPTION 'pgphi._citus_sync_local() runs on Citus worker nodes'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    FOR t IN SELECT * FROM pgphi._citus_replicated_tables() LOOP
        FOR r IN EXECUTE 'SELECT c.row_key, c.row_data FROM pgphi_citus.catalog_rows c
                           WHERE c.relation_name = $1 ORDER BY c.row_key' USING t.relation_name LOOP
            PERFORM pgphi._citus_apply_row(t.relation_name, r.row_key, r.row_data);
        END LOOP;
    END LOOP;
    FOR t IN SELECT * FROM pgphi._citus_replicated_tables() WITH ORDINALITY o ORDER BY o.ordinality DESC LOOP
        FOR r IN EXECUTE format('SELECT pgphi._citus_row_key(%L::regclass, to_jsonb(x)) AS row_key FROM pgphi.%I x',
                                format('pgphi.%I', t.relation_name), t.relation_name) LOOP
            EXECUTE 'SELECT NOT EXISTS (SELECT FROM pgphi_citus.catalog_rows c
                                         WHERE c.relation_name = $1 AND c.row_key = $2)'
                INTO gone USING t.relation_name, r.row_key;
            IF gone THEN
                PERFORM pgphi._citus_apply_row(t.relation_name, r.row_key, NULL);
                changed := changed + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN changed;
END
$$;

-- Makes the coordinator's key catalog the cluster's: creates the reference
-- table pgphi_citus.catalog_rows and the trigger that applies it on every
-- node, copies the catalog into it, and returns how many rows it holds. Run
-- once, on the coordinator, after CREATE EXTENSION citus and pgphi (again is
-- harmless). Superusers only: it creates a schema and lets a trigger run on
-- every node.
CREATE FUNCTION pgphi.citus_setup() RETURNS bigint
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    total bigint;
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'pgphi.citus_setup() needs a superuser' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF pgphi._citus_node_role() IS DISTINCT FROM 'coordinator' THEN
        RAISE EXCEPTION 'pgphi.citus_setup() runs on a Citus coordinator'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'CREATE EXTENSION citus first, and run it on the coordinator.';
    END IF;
    -- The schema's owner could drop or replace the catalog copy: a schema
    -- of that name made by anyone but a superuser is not used.
    IF EXISTS (SELECT FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
                WHERE n.nspname = 'pgphi_citus' AND NOT r.rolsuper) THEN
        RAISE EXCEPTION 'schema pgphi_citus exists and is not owned by a superuser'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Drop it, or make a superuser its owner, and run pgphi.citus_setup() again.';
    END IF;
    IF to_regclass('pgphi_citus.catalog_rows') IS NULL THEN
        CREATE SCHEMA IF NOT EXISTS pgphi_citus;
        REVOKE ALL ON SCHEMA pgphi_citus FROM PUBLIC;
        CREATE TABLE pgphi_citus.catalog_rows (
            relation_name name NOT NULL,
            row_key       jsonb NOT NULL,
            row_data      jsonb NOT NULL,
            PRIMARY KEY (relation_name, row_key)
        );
        REVOKE ALL ON pgphi_citus.catalog_rows FROM PUBLIC;
        PERFORM pg_catalog.create_reference_table('pgphi_citus.catalog_rows');
        -- Citus refuses triggers on reference tables unless told: this one
        -- only applies the coordinator's rows to each node's own catalog.
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
        CREATE TRIGGER citus_apply AFTER INSERT OR UPDATE OR DELETE ON pgphi_citus.catalog_rows
            FOR EACH ROW EXECUTE FUNCTION pgphi._citus_apply();
        ALTER TABLE pgphi_citus.catalog_rows ENABLE ALWAYS TRIGGER citus_apply;
    END IF;
    FOR t IN SELECT * FROM pgphi._citus_replicated_tables() LOOP
        EXECUTE format('INSERT INTO pgphi_citus.catalog_rows AS c (relation_name, row_key, row_data)
                        SELECT %L, pgphi._citus_row_key(%L::regclass, to_jsonb(x)), to_jsonb(x) FROM pgphi.%I x
                        ON CONFLICT (relation_name, row_key) DO UPDATE SET row_data = EXCLUDED.row_data',
                       t.relation_name, format('pgphi.%I', t.relation_name), t.relation_name);
    END LOOP;
    SELECT count(*) INTO total FROM pgphi_citus.catalog_rows;
    RETURN total;
END
$$;

-- After citus_add_node: copies pgphi_citus.catalog_rows to nodes that lack
-- it and builds every worker's catalog from it. Returns one row per worker.
CREATE FUNCTION pgphi.citus_sync(OUT nodeid integer, OUT success boolean, OUT result text)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nodes bigint;
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'pgphi.citus_sync() needs a superuser' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF pgphi._citus_node_role() IS DISTINCT FROM 'coordinator' OR to_regclass('pgphi_citus.catalog_rows') IS NULL THEN
        RAISE EXCEPTION 'pgphi.citus_sync() runs on a Citus coordinator after pgphi.citus_setup()'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    -- Each node seals at most 1/32 of a DEK's limit (shared_state.cpp).
    EXECUTE 'SELECT count(*) FROM pg_catalog.pg_dist_node WHERE noderole = ''primary''' INTO nodes;
    IF nodes > 32 THEN
        RAISE WARNING 'this Citus cluster has % nodes; pgphi keeps the values sealed under a DEK inside its limit only for up to 32', nodes
            USING HINT = 'Each node may seal 1/32 of the limit, so more nodes together could pass it: rotate keys on the '
                         'coordinator (pgphi.rotate_key) well before any version nears its limit.';
    END IF;
    PERFORM pg_catalog.replicate_reference_tables('block_writes');
    RETURN QUERY EXECUTE
        'SELECT w.nodeid, w.success, w.result FROM pg_catalog.run_command_on_all_nodes(
             $c$SELECT CASE WHEN pgphi._citus_node_role() = $r$worker$r$ THEN pgphi._citus_sync_local() END$c$) w
          ORDER BY w.nodeid';
END
$$;

-- Checks the audit chain of every node (pgphi.verify_audit_log() on each):
-- each node keeps its own, anchored with its own key.
CREATE FUNCTION pgphi.citus_verify_audit_logs(OUT nodeid integer, OUT success boolean, OUT result text)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RAISE EXCEPTION 'pgphi.citus_verify_audit_logs() needs Citus' USING ERRCODE = 'feature_not_supported';
    END IF;
    RETURN QUERY EXECUTE
        'SELECT w.nodeid, w.success, w.result FROM pg_catalog.run_command_on_all_nodes(
             $c$SELECT pg_catalog.array_to_string(pg_catalog.array_agg(v::text), $s$; $s$) FROM pgphi.verify_audit_log() v$c$) w
          ORDER BY w.nodeid';
END
$$;

REVOKE ALL ON FUNCTION pgphi._citus_node_role(), pgphi._citus_replicated_tables(), pgphi._citus_row_key(regclass, jsonb),
    pgphi._citus_apply_row(name, jsonb, jsonb), pgphi._citus_apply(), pgphi._citus_forward(),
    pgphi._citus_coordinator_only(),
    pgphi._citus_sync_local(), pgphi.citus_setup(), pgphi.citus_sync(), pgphi.citus_verify_audit_logs() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.citus_verify_audit_logs() TO pgphi_key_auditor;
