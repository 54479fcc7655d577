-- Re-encryption and the batch procedures.
--
-- reencrypt (values to their key's active version), protect_column (a
-- plaintext text column converted into an encrypted one, online) and
-- rebuild_blind_index (a blind index column filled or moved to the active
-- version) all work the same way: batches of table pages, each its own
-- transaction holding only row locks, then sweeps for rows that moved behind
-- the scan or that writers changed meanwhile. The shared parts (column checks,
-- page batches, sweeps, progress and resumption) are the helpers at the top of
-- this file; each procedure only checks its arguments, and loops.
--
-- Caller-privilege SQL resolves nothing through the caller's search_path:
-- every function pins it. The procedures commit between batches, which a
-- procedure with a SET clause cannot, so their bodies only call pgphi helpers
-- (named with their schema, with arguments of exactly the parameters' types),
-- commit and loop on boolean variables. The helpers run as the caller
-- (SECURITY INVOKER) where they touch the user's table, and as pgphi's owner
-- (SECURITY DEFINER) only to read and write pgphi.reencrypt_progress.
-- Identifiers reach SQL text only as format() arguments (%I, or %s of a
-- regclass), never inside a format string, so "%" and "$" in names are data.

CREATE FUNCTION pgphi.reencrypt_value(value pgphi.encrypted, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_reencrypt_value' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi.reencrypt_value(value bytea, key_name text, context text DEFAULT '')
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'pgphi_reencrypt_value' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;

CREATE FUNCTION pgphi._key_version_of(value bytea, key_id integer) RETURNS integer
    AS 'MODULE_PATHNAME', 'pgphi_key_version_of' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

------------------------------------------------------------------------------
-- Shared: column checks, page batches, sweeps, progress.
------------------------------------------------------------------------------
-- A column's type, or an error naming what is missing.
CREATE FUNCTION pgphi._column_type(tbl regclass, col name) RETURNS regtype
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found regtype;
BEGIN
    SELECT a.atttypid::regtype INTO found FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF found IS NULL THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', col, tbl USING ERRCODE = 'undefined_column';
    END IF;
    RETURN found;
END
$$;

-- The column checks of every batch procedure: the column's type, refused
-- unless it is one of the accepted ones.
CREATE FUNCTION pgphi._check_column_type(tbl regclass, col name, accepted regtype[], expectation text)
    RETURNS regtype
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found regtype := pgphi._column_type(tbl, col);
BEGIN
    IF NOT (found = ANY (accepted)) THEN
        RAISE EXCEPTION USING ERRCODE = 'wrong_object_type',
            MESSAGE = format('column "%s" of relation %s is of type %s%s', col, tbl, found, expectation);
    END IF;
    RETURN found;
END
$$;

-- A key's id and active version, or the errors a batch procedure gives for
-- a key that does not exist (without repeating the name, which may be
-- anything a caller typed) or has no active version.
CREATE FUNCTION pgphi._batch_key(key_name text, OUT key_id integer, OUT version integer)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    key_id := pgphi._key_id(_batch_key.key_name);
    IF key_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    END IF;
    version := pgphi._active_version(key_id);
    IF version IS NULL THEN
        RAISE EXCEPTION 'pgphi key "%" has no active version', _batch_key.key_name
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END
$$;

-- The key of an encrypted column: the one its first encrypted value names
-- (NULL for a column without values).
CREATE FUNCTION pgphi._column_key(tbl regclass, col name) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found text;
BEGIN
    EXECUTE format('SELECT pgphi._key_name(i.key_id) FROM %s t, pgphi.ciphertext_info(t.%I::bytea) i
                     WHERE t.%I IS NOT NULL LIMIT 1', tbl, col, col)
        INTO found;
    RETURN found;
END
$$;

-- Citus. pgphi does not depend on Citus: its catalog is read only where it
-- exists (to_regclass), and through dynamic SQL, so these compile and run
-- without it. What Citus makes of a table: 'distributed' (hash, range,
-- append or single-shard), 'reference' or 'Citus local'; each keeps its rows
-- in shards (on the workers, or on the coordinator for a Citus local
-- table), and the table of that name on this node is an empty shell. NULL
-- for any other table, and where Citus is not installed.
CREATE FUNCTION pgphi._citus_table_kind(tbl regclass) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    kind text;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT CASE WHEN p.partmethod <> ''n'' THEN ''distributed''
                         WHEN p.repmodel = ''t'' THEN ''reference''
                         WHEN p.colocationid <> 0 THEN ''distributed''
                         ELSE ''Citus local'' END
               FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = $1'
        INTO kind USING tbl;
    RETURN kind;
END
$$;

-- Citus: the batch procedures, shard by shard (docs/citus.md). The table of
-- that name on this node is an empty shell, so a run here would change
-- nothing: the procedures run their batches on each shard instead, on the
-- node that holds it, as the caller (Citus connects to the node as the
-- current user), each shard's batches committed and resumable there like
-- any table's. Progress on this node counts shards (reencrypt_progress's
-- next_page and total_pages); each shard's own progress is on its node.
--
-- The placements of a Citus table's shards, in shard order: a distributed
-- table's shard has one (more with Citus's old replication), a reference
-- table's one on every node. Shard names are schema-qualified.
CREATE FUNCTION pgphi._citus_placements(tbl regclass, OUT shard_index bigint, OUT shard_id bigint,
        OUT shard_name text, OUT node_name text, OUT node_port integer)
    RETURNS SETOF record
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pgphi._citus_table_kind(tbl) IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT dense_rank() OVER (ORDER BY s.shardid) - 1, s.shardid,
                pg_catalog.shard_name(s.logicalrelid, s.shardid, false), d.nodename::text, d.nodeport
           FROM pg_catalog.pg_dist_shard s
           JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
           JOIN pg_catalog.pg_dist_node d ON d.groupid = p.groupid AND d.noderole = ''primary''
          WHERE s.logicalrelid = $1
          ORDER BY s.shardid, d.nodeid'
        USING tbl;
END
$$;

-- How far a batch run goes: the table's pages, or a Citus table's shards.
CREATE FUNCTION pgphi._batch_extent(tbl regclass, batch_size integer) RETURNS bigint
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pgphi._citus_table_kind(tbl) IS NULL THEN
        RETURN (SELECT b.relation_pages FROM pgphi._page_batches(tbl, batch_size) b);
    END IF;
    RETURN (SELECT count(DISTINCT p.shard_id) FROM pgphi._citus_placements(tbl) p);
END
$$;

-- Runs a shard's batches on a Citus node (what = 'batches'), or asks it
-- how many values they changed ('changed'), as the current user, on a
-- connection of its own (Citus's master_run_on_worker); returns the result.
-- It builds the command itself: callers name a shard and a batch procedure,
-- never SQL. Only an error's first line comes back, so the shard's steps put
-- their SQLSTATE in it ("[42501] permission denied ..."), and it is raised
-- again here with that SQLSTATE.
CREATE FUNCTION pgphi._citus_remote(node_name text, node_port integer, what text, operation text, shard_name text,
        col name, key_name text, batch_size integer, context_column name, source_column name) RETURNS text
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    command text;
    outcome record;
    tagged text[];
BEGIN
    IF to_regprocedure('pg_catalog.master_run_on_worker(text[],integer[],text[],boolean)') IS NULL THEN
        RAISE EXCEPTION 'pgphi runs batches on shards only in a Citus cluster' USING ERRCODE = 'feature_not_supported';
    END IF;
    EXECUTE 'SELECT NOT EXISTS (SELECT FROM pg_catalog.pg_dist_node d WHERE d.nodename = $1 AND d.nodeport = $2)
                 AS not_exists'
        INTO outcome USING node_name, node_port;
    IF outcome.not_exists THEN
        RAISE EXCEPTION 'pgphi runs batches only on the nodes of this Citus cluster' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF what = 'batches' THEN
        command := format('CALL pgphi._citus_shard_batches(%L, %L, %L, %L, %s, %L, %L)', operation, shard_name, col,
                          key_name, batch_size, context_column, source_column);
    ELSE
        command := format('SELECT pgphi._citus_shard_changed(%L, %L)', shard_name, col);
    END IF;
    EXECUTE 'SELECT w.success, w.result FROM pg_catalog.master_run_on_worker(ARRAY[$1], ARRAY[$2], ARRAY[$3], false) w'
        INTO outcome USING node_name, node_port, command;
    IF outcome.success THEN
        RETURN outcome.result;
    END IF;
    tagged := regexp_match(outcome.result, '^(?:ERROR:\s+)?\[([0-9A-Z]{5})\] (.*)$');
    IF tagged IS NULL THEN
        RAISE EXCEPTION 'pgphi could not run a batch on Citus node %:%: %', node_name, node_port, outcome.result
            USING ERRCODE = 'connection_exception', DETAIL = format('The batch was for shard %s.', shard_name),
                  HINT = 'Call the procedure again once the node is back: it resumes where it stopped.';
    END IF;
    RAISE EXCEPTION USING ERRCODE = tagged[1], MESSAGE = tagged[2],
        DETAIL = format('Raised on Citus node %s:%s, in shard %s.', node_name, node_port, shard_name),
        HINT = 'Call the procedure again once the cause is fixed: it resumes where it stopped.';
END
$$;

-- Runs one shard's batches on every placement of it (the shard_index-th in
-- shard order) and returns the values they changed; NULL past the last
-- shard. `operation` is the procedure: 'reencrypt', 'rebuild_blind_index'
-- (col is the index column) or 'protect_column'.
CREATE FUNCTION pgphi._citus_run_shard(operation text, tbl regclass, col name, key_name text, batch_size integer,
        context_column name, source_column name, shard_index bigint) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    placement record;
    shards bigint := (SELECT count(DISTINCT p.shard_id) FROM pgphi._citus_placements(tbl) p);
    changed bigint;
    total bigint;
BEGIN
    FOR placement IN SELECT * FROM pgphi._citus_placements(tbl) p WHERE p.shard_index = _citus_run_shard.shard_index
    LOOP
        PERFORM pgphi._citus_remote(placement.node_name, placement.node_port, 'batches', operation,
                                    placement.shard_name, col, key_name, batch_size, context_column, source_column);
        changed := pgphi._citus_remote(placement.node_name, placement.node_port, 'changed', operation,
                                       placement.shard_name, col, NULL, NULL, NULL, NULL)::bigint;
        total := coalesce(total, 0) + changed;
        RAISE NOTICE '% of %.%: shard % of % (% on %:%) done%', operation, tbl, quote_ident(col), shard_index + 1,
            shards, placement.shard_name, placement.node_name, placement.node_port,
            CASE WHEN operation = 'protect_column' THEN '' ELSE format(', %s values changed', changed) END;
    END LOOP;
    RETURN total;
END
$$;

-- The next shard of a run with progress on this node; false once the last
-- is done.
CREATE FUNCTION pgphi._citus_progress_shard(operation text, tbl regclass, col name, key_name text,
        batch_size integer, context_column name, source_column name) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    progress pgphi.reencrypt_progress := pgphi._progress_get(tbl, col);
    changed bigint;
BEGIN
    IF progress.next_page >= progress.total_pages THEN
        RETURN false;
    END IF;
    changed := pgphi._citus_run_shard(operation, tbl, col, key_name, batch_size, context_column, source_column,
                                      progress.next_page);
    PERFORM pgphi._progress_advance(tbl, col, progress.next_page + 1, coalesce(changed, 0));
    RETURN progress.next_page + 1 < progress.total_pages;
END
$$;

-- A Citus table's sweep: counts, through Citus (every shard), the rows that
-- still need the run (the `stale` condition of its batches; parameters $1
-- the key name, $2 the key id, $3 the version). Rows that concurrent writers
-- copied from old ones, or shards split or added during the run: if any,
-- every shard runs again, and true is returned (another sweep follows).
CREATE FUNCTION pgphi._citus_sweep(operation text, tbl regclass, col name, key_name text, batch_size integer,
        context_column name, source_column name, stale text, key_id integer, version integer) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    left_over bigint;
    shard bigint;
    changed bigint;
    total bigint := 0;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s WHERE ', tbl) || stale INTO left_over USING key_name, key_id, version;
    IF left_over = 0 THEN
        RETURN false;
    END IF;
    RAISE NOTICE '% of %.%: % rows still to do, every shard again', operation, tbl, quote_ident(col), left_over;
    FOR shard IN SELECT DISTINCT p.shard_index FROM pgphi._citus_placements(tbl) p ORDER BY 1 LOOP
        changed := pgphi._citus_run_shard(operation, tbl, col, key_name, batch_size, context_column, source_column,
                                          shard);
        total := total + coalesce(changed, 0);
    END LOOP;
    IF col IN (SELECT p.column_name FROM pgphi.reencrypt_progress p WHERE p.relation = tbl) THEN
        PERFORM pgphi._progress_advance(tbl, col, NULL, total);
    END IF;
    RETURN true;
END
$$;

-- The distribution column of a Citus distributed table (NULL for any other).
CREATE FUNCTION pgphi._citus_distribution_column(tbl regclass) RETURNS name
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col name;
BEGIN
    IF pgphi._citus_table_kind(tbl) IS DISTINCT FROM 'distributed' THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT pg_catalog.column_to_column_name(p.logicalrelid, p.partkey)
               FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = $1 AND p.partkey IS NOT NULL'
        INTO col USING tbl;
    RETURN col;
END
$$;

-- Whether a relation is a shard of a Citus table on this node.
CREATE FUNCTION pgphi._citus_is_shard(tbl regclass) RETURNS boolean
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    known boolean;
BEGIN
    IF to_regprocedure('pg_catalog.relation_is_a_known_shard(regclass)') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT pg_catalog.relation_is_a_known_shard($1)' INTO known USING tbl;
    RETURN coalesce(known, false);
END
$$;

-- The values a shard's last run changed (its progress on this node; 0 for
-- protect_column, which keeps none).
CREATE FUNCTION pgphi._citus_shard_changed(shard_name text, col name) RETURNS bigint
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT p.rows_reencrypted FROM pgphi.reencrypt_progress p
                      WHERE p.relation = to_regclass(shard_name) AND p.column_name = col), 0)
$$;

-- A table's size in pages, and how many pages hold about batch_size rows
-- (from the planner's statistics).
CREATE FUNCTION pgphi._page_batches(tbl regclass, batch_size integer,
        OUT relation_pages bigint, OUT pages_per_batch bigint)
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_relation_size(tbl) / current_setting('block_size')::bigint,
           greatest(1, (batch_size / greatest(1, c.reltuples / greatest(1, c.relpages)))::bigint)
      FROM pg_class c WHERE c.oid = tbl
$$;

-- Page batching, the one home of it. A batch procedure's UPDATE is two
-- pieces of SQL: its head ("UPDATE t SET ... WHERE ") and the condition of a
-- row that still needs it. Parameters: $1 the key name, $2 the key id, $3 the
-- target version. Both run as the caller, on the caller's table.
--
-- One batch: the rows that need it on pages [from_page, to_page).
CREATE FUNCTION pgphi._update_pages(update_head text, stale text, key_name text, key_id integer,
        version integer, from_page bigint, to_page bigint) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE update_head || 'ctid >= $4 AND ctid < $5 AND (' || stale || ')'
        USING key_name, key_id, version, format('(%s,0)', from_page)::tid, format('(%s,0)', to_page)::tid;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- One sweep: up to batch_size rows that still need it, wherever they are
-- (rows that moved behind the scan, or that writers changed meanwhile).
CREATE FUNCTION pgphi._update_sweep(tbl regclass, update_head text, stale text, key_name text, key_id integer,
        version integer, batch_size integer) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE update_head || format('ctid = ANY (ARRAY(SELECT ctid FROM %s WHERE ', tbl) || '(' || stale || ')'
            || format(' LIMIT %s)) AND (', batch_size) || stale || ')'
        USING key_name, key_id, version;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Progress and resumption, the one home of them: pgphi.reencrypt_progress,
-- one row per (relation, column). These run as pgphi's owner, and only for a
-- caller (the acting role) that may update that column of that relation.
CREATE FUNCTION pgphi._progress_check(tbl regclass, col name) RETURNS void
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT has_column_privilege(pgphi._acting_role()::name, tbl, col::text, 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied to record the progress of column "%" of relation %', col, tbl
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END
$$;

-- Starts, or resumes, the batches of a (relation, column) towards a key
-- version; a run towards another key or version starts over. A run belongs
-- to the role that started it (started_by): another role's unfinished run
-- is not taken over.
CREATE FUNCTION pgphi._progress_begin(tbl regclass, col name, key_id integer, version integer,
        relation_pages bigint, task text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    progress pgphi.reencrypt_progress;
    acting regrole := to_regrole(quote_ident(pgphi._acting_role()));
BEGIN
    PERFORM pgphi._progress_check(tbl, col);
    SELECT * INTO progress FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = col
       FOR UPDATE;
    IF FOUND AND progress.finished_at IS NULL AND progress.started_by IS DISTINCT FROM acting THEN
        RAISE EXCEPTION 'a conversion of column "%" of % is under way by role %', col, tbl,
            coalesce(progress.started_by::text, '(unknown)')
            USING ERRCODE = 'object_in_use',
                  HINT = 'That role resumes it by calling the procedure again; a key custodian can discard it by deleting its row of pgphi.reencrypt_progress.';
    END IF;
    IF NOT FOUND OR progress.finished_at IS NOT NULL OR progress.target_version <> _progress_begin.version
       OR progress.key_id <> _progress_begin.key_id THEN
        DELETE FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = col;
        INSERT INTO pgphi.reencrypt_progress (relation, column_name, key_id, target_version, total_pages,
                                              started_by)
            VALUES (tbl, col, _progress_begin.key_id, _progress_begin.version, relation_pages, acting);
    ELSE
        RAISE NOTICE 'resuming % of %.% at % % of %', task, tbl, quote_ident(col),
            CASE WHEN pgphi._citus_table_kind(tbl) IS NULL THEN 'page' ELSE 'shard' END, progress.next_page,
            relation_pages;
        UPDATE pgphi.reencrypt_progress p SET total_pages = relation_pages
         WHERE p.relation = tbl AND p.column_name = col;
    END IF;
END
$$;

CREATE FUNCTION pgphi._progress_get(tbl regclass, col name) RETURNS pgphi.reencrypt_progress
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    progress pgphi.reencrypt_progress;
BEGIN
    PERFORM pgphi._progress_check(tbl, col);
    SELECT * INTO progress FROM pgphi.reencrypt_progress p WHERE p.relation = tbl AND p.column_name = col;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the progress of column "%" of relation % was removed while it ran', col, tbl
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Call the procedure again.';
    END IF;
    RETURN progress;
END
$$;

-- Records a batch: the next page (NULL: unchanged, after a sweep) and the
-- rows it changed.
CREATE FUNCTION pgphi._progress_advance(tbl regclass, col name, next_page bigint, moved bigint) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgphi._progress_check(tbl, col);
    -- Only the run's own role moves it on (these run as pgphi's owner, which
    -- row-level security does not restrict).
    UPDATE pgphi.reencrypt_progress p
       SET next_page = coalesce(_progress_advance.next_page, p.next_page),
           rows_reencrypted = p.rows_reencrypted + moved, updated_at = clock_timestamp()
     WHERE p.relation = tbl AND p.column_name = col
       AND p.started_by = to_regrole(quote_ident(pgphi._acting_role()));
END
$$;

CREATE FUNCTION pgphi._progress_finish(tbl regclass, col name) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgphi._progress_check(tbl, col);
    UPDATE pgphi.reencrypt_progress p SET finished_at = clock_timestamp()
     WHERE p.relation = tbl AND p.column_name = col
       AND p.started_by = to_regrole(quote_ident(pgphi._acting_role()));
END
$$;

-- Finishes a run whose sweeps are over, or, if the last still found rows
-- (concurrent writers kept copying old values), refuses to report it done:
-- the run stays resumable.
CREATE FUNCTION pgphi._progress_finish_swept(tbl regclass, col name, rows_left boolean) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF rows_left THEN
        RAISE EXCEPTION 'concurrent writes kept leaving rows of % to redo after 1000 sweeps', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call the procedure again when fewer writes copy old values: it resumes where it stopped.';
    END IF;
    PERFORM pgphi._progress_finish(tbl, col);
END
$$;

-- The next batch of pages of a run with progress; false once every page of
-- the run is done.
CREATE FUNCTION pgphi._progress_pages(tbl regclass, col name, update_head text, stale text, key_name text,
        batch_size integer) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    progress pgphi.reencrypt_progress := pgphi._progress_get(tbl, col);
    stop bigint;
    moved bigint;
BEGIN
    IF progress.next_page >= progress.total_pages THEN
        RETURN false;
    END IF;
    stop := progress.next_page + (SELECT b.pages_per_batch FROM pgphi._page_batches(tbl, batch_size) b);
    moved := pgphi._update_pages(update_head, stale, key_name, progress.key_id, progress.target_version,
                                 progress.next_page, stop);
    PERFORM pgphi._progress_advance(tbl, col, least(stop, progress.total_pages), moved);
    RETURN stop < progress.total_pages;
END
$$;

-- A sweep of a run with progress; false once it found nothing left.
CREATE FUNCTION pgphi._progress_sweep(tbl regclass, col name, update_head text, stale text, key_name text,
        batch_size integer) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    progress pgphi.reencrypt_progress := pgphi._progress_get(tbl, col);
    moved bigint;
BEGIN
    moved := pgphi._update_sweep(tbl, update_head, stale, key_name, progress.key_id, progress.target_version,
                                 batch_size);
    PERFORM pgphi._progress_advance(tbl, col, NULL, moved);
    RETURN moved > 0;
END
$$;

-- A conversion another role started, and has not finished, is not taken
-- over silently; a finished one is replaced. (Runs as the catalog's owner,
-- so it sees rows the policies hide from the caller.)
CREATE FUNCTION pgphi._reencrypt_progress_claim() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    other record;
BEGIN
    SELECT p.started_by, p.finished_at INTO other FROM pgphi.reencrypt_progress p
     WHERE p.relation::oid = NEW.relation::oid AND p.column_name = NEW.column_name FOR UPDATE;
    IF FOUND THEN
        IF other.finished_at IS NULL AND other.started_by IS DISTINCT FROM NEW.started_by THEN
            RAISE EXCEPTION 'a conversion of column "%" of % is under way by role %', NEW.column_name, NEW.relation,
                coalesce(other.started_by::text, '(unknown)')
                USING ERRCODE = 'object_in_use',
                      HINT = 'That role resumes it by calling the procedure again; a key custodian can discard it by deleting its row of pgphi.reencrypt_progress.';
        END IF;
        DELETE FROM pgphi.reencrypt_progress p
         WHERE p.relation::oid = NEW.relation::oid AND p.column_name = NEW.column_name;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER reencrypt_progress_claim BEFORE INSERT ON pgphi.reencrypt_progress
    FOR EACH ROW EXECUTE FUNCTION pgphi._reencrypt_progress_claim();

------------------------------------------------------------------------------
-- reencrypt
------------------------------------------------------------------------------
CREATE FUNCTION pgphi._reencrypt_sql(tbl regclass, col name, context_column name,
        OUT update_head text, OUT stale text)
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('UPDATE %s SET %I = pgphi.reencrypt_value(%I, $1%s) WHERE ', tbl, col, col,
                  CASE WHEN context_column IS NULL THEN '' ELSE format(', %I::text', context_column) END),
           format('pgphi._key_version_of(%I::bytea, $2) <> $3', col)
$$;

-- Checks the arguments and starts (or resumes) the run; returns the key the
-- values move to, or NULL when the column holds no encrypted values.
CREATE FUNCTION pgphi._reencrypt_start(tbl regclass, col name, batch_size integer, context_column name,
        key_name text) RETURNS text
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_key text := _reencrypt_start.key_name;
    target record;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgphi._check_column_type(tbl, col, ARRAY['pgphi.encrypted'::regtype, 'bytea'::regtype],
                                     ', not pgphi.encrypted or bytea');
    IF target_key IS NULL THEN
        target_key := pgphi._column_key(tbl, col);
        IF target_key IS NULL THEN
            RAISE NOTICE 'column "%" of % holds no encrypted values', col, tbl;
            RETURN NULL;
        END IF;
    END IF;
    target := pgphi._batch_key(target_key);
    PERFORM pgphi._progress_begin(tbl, col, target.key_id, target.version, pgphi._batch_extent(tbl, batch_size),
                                  're-encryption');
    RETURN target_key;
END
$$;

CREATE FUNCTION pgphi._reencrypt_pages(tbl regclass, col name, batch_size integer, context_column name,
        key_name text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pgphi._citus_table_kind(tbl) IS NULL
                THEN pgphi._progress_pages(tbl, col, s.update_head, s.stale, key_name, batch_size)
                ELSE pgphi._citus_progress_shard('reencrypt', tbl, col, key_name, batch_size, context_column, NULL)
           END
      FROM pgphi._reencrypt_sql(tbl, col, context_column) s
$$;

CREATE FUNCTION pgphi._reencrypt_sweep(tbl regclass, col name, batch_size integer, context_column name,
        key_name text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pgphi._citus_table_kind(tbl) IS NULL
                THEN pgphi._progress_sweep(tbl, col, s.update_head, s.stale, key_name, batch_size)
                ELSE pgphi._citus_sweep('reencrypt', tbl, col, key_name, batch_size, context_column, NULL, s.stale,
                                        p.key_id, p.target_version)
           END
      FROM pgphi._reencrypt_sql(tbl, col, context_column) s, pgphi._progress_get(tbl, col) p
$$;

-- Moves every value of a column to its key's active version, online: batches
-- of table pages, each its own transaction holding only row locks, then sweeps
-- for values that concurrent writers copied from old rows. Concurrent updates
-- are never lost (each UPDATE re-checks rows that changed under it). Call it
-- again after a crash or cancel and it continues where it stopped.
CREATE PROCEDURE pgphi.reencrypt(tbl regclass, col name, batch_size integer DEFAULT 10000,
                                            context_column name DEFAULT NULL, key_name text DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    target_key pg_catalog.text;
    more pg_catalog.bool;
BEGIN
    target_key := pgphi._reencrypt_start(tbl, col, batch_size, context_column, key_name);
    COMMIT;
    IF target_key IS NULL THEN
        RETURN;
    END IF;
    LOOP
        more := pgphi._reencrypt_pages(tbl, col, batch_size, context_column, target_key);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
    FOR pass IN 1..1000 LOOP
        more := pgphi._reencrypt_sweep(tbl, col, batch_size, context_column, target_key);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
    PERFORM pgphi._progress_finish_swept(tbl, col, more);
    COMMIT;
END
$$;

------------------------------------------------------------------------------
-- rebuild_blind_index
------------------------------------------------------------------------------
CREATE FUNCTION pgphi._rebuild_blind_index_sql(tbl regclass, index_column name, source_column name,
        context_column name, source_key text, OUT update_head text, OUT stale text)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    source_type regtype := pgphi._column_type(tbl, source_column);
    plaintext_sql text;
BEGIN
    IF source_type IN ('pgphi.encrypted'::regtype, 'bytea'::regtype) THEN
        plaintext_sql := format('pgphi.decrypt_phi(%I::bytea, %L, %s)', source_column, source_key,
            CASE WHEN context_column IS NULL THEN quote_literal('') ELSE format('%I::text', context_column) END);
    ELSE
        plaintext_sql := format('%I::text', source_column);
    END IF;
    -- A row is stale when its index is missing, left over, or not under the
    -- active version.
    stale := format('CASE WHEN %1$I IS NULL THEN %2$I IS NOT NULL
                          ELSE pgphi._blind_index_version_of(%2$I, $2) IS DISTINCT FROM $3 END',
                    source_column, index_column);
    update_head := format('UPDATE %s SET %I = CASE WHEN %I IS NULL THEN NULL ELSE pgphi.blind_index(%s, $1) END WHERE ',
                          tbl, index_column, source_column, plaintext_sql);
END
$$;

-- Checks the arguments and starts (or resumes) the run; returns the key of
-- the encrypted source column (NULL for a text source, or no values).
CREATE FUNCTION pgphi._rebuild_blind_index_start(tbl regclass, index_column name, source_column name,
        key_name text, batch_size integer, context_column name) RETURNS text
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    source_type regtype;
    source_key text;
    target record;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgphi._check_column_type(tbl, index_column, ARRAY['bytea'::regtype], '; a blind index column is bytea');
    source_type := pgphi._column_type(tbl, source_column);
    IF pgphi._key_id(key_name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    END IF;
    IF pgphi._key_purpose(pgphi._key_id(key_name)) IS DISTINCT FROM 'blind_index' THEN
        RAISE EXCEPTION 'pgphi key "%" is not a blind-index key', key_name
            USING ERRCODE = 'wrong_object_type', HINT = 'Make one with pgphi.create_blind_index_key().';
    END IF;
    target := pgphi._batch_key(key_name);
    IF source_type IN ('pgphi.encrypted'::regtype, 'bytea'::regtype) THEN
        source_key := pgphi._column_key(tbl, source_column);
    ELSIF source_type IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype) THEN
        IF context_column IS NOT NULL THEN
            RAISE EXCEPTION 'a context column applies only to an encrypted source column'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSE
        PERFORM pgphi._check_column_type(tbl, source_column, '{}', ', not pgphi.encrypted, bytea or text');
    END IF;
    PERFORM pgphi._progress_begin(tbl, index_column, target.key_id, target.version,
                                  pgphi._batch_extent(tbl, batch_size), 'the blind index rebuild');
    RETURN source_key;
END
$$;

CREATE FUNCTION pgphi._rebuild_blind_index_pages(tbl regclass, index_column name, source_column name,
        key_name text, batch_size integer, context_column name, source_key text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pgphi._citus_table_kind(tbl) IS NULL
                THEN pgphi._progress_pages(tbl, index_column, s.update_head, s.stale, key_name, batch_size)
                ELSE pgphi._citus_progress_shard('rebuild_blind_index', tbl, index_column, key_name, batch_size,
                                                 context_column, source_column)
           END
      FROM pgphi._rebuild_blind_index_sql(tbl, index_column, source_column, context_column, source_key) s
$$;

CREATE FUNCTION pgphi._rebuild_blind_index_sweep(tbl regclass, index_column name, source_column name,
        key_name text, batch_size integer, context_column name, source_key text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pgphi._citus_table_kind(tbl) IS NULL
                THEN pgphi._progress_sweep(tbl, index_column, s.update_head, s.stale, key_name, batch_size)
                ELSE pgphi._citus_sweep('rebuild_blind_index', tbl, index_column, key_name, batch_size,
                                        context_column, source_column, s.stale, p.key_id, p.target_version)
           END
      FROM pgphi._rebuild_blind_index_sql(tbl, index_column, source_column, context_column, source_key) s,
           pgphi._progress_get(tbl, index_column) p
$$;

-- Fills a blind index column from its source column (encrypted, or plain
-- text), and after the blind-index key was rotated recomputes every value not
-- under the active version: batches of pages, each its own transaction,
-- resumable like reencrypt (progress in pgphi.reencrypt_progress, under the
-- index column's name). Values already under the active version are kept.
CREATE PROCEDURE pgphi.rebuild_blind_index(tbl regclass, index_column name, source_column name,
        key_name text, batch_size integer DEFAULT 10000, context_column name DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    source_key pg_catalog.text;
    more pg_catalog.bool;
BEGIN
    source_key := pgphi._rebuild_blind_index_start(tbl, index_column, source_column, key_name, batch_size,
                                                   context_column);
    COMMIT;
    LOOP
        more := pgphi._rebuild_blind_index_pages(tbl, index_column, source_column, key_name, batch_size,
                                                 context_column, source_key);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
    FOR pass IN 1..1000 LOOP
        more := pgphi._rebuild_blind_index_sweep(tbl, index_column, source_column, key_name, batch_size,
                                                 context_column, source_key);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
    PERFORM pgphi._progress_finish_swept(tbl, index_column, more);
    COMMIT;
END
$$;

------------------------------------------------------------------------------
-- protect_column
------------------------------------------------------------------------------
-- The shadow column and trigger of a conversion: a function of the column's
-- name alone, so a resumed call finds them, and at most 63 bytes whatever
-- the name (multibyte characters are never cut in half). A name that does
-- not fit whole is cut and followed by a hash of the whole name.
CREATE FUNCTION pgphi._protect_column_names(col name, OUT shadow name, OUT trigger_name name)
    LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prefix text;
    cut text;
BEGIN
    FOREACH prefix IN ARRAY ARRAY['pgphi_protecting_', 'pgphi_protect_'] LOOP
        cut := prefix || col;
        IF octet_length(cut) > 63 THEN
            cut := col;
            WHILE octet_length(prefix || cut) > 63 - 9 LOOP
                cut := left(cut, -1);
            END LOOP;
            cut := prefix || cut || '_' || left(md5(col), 8);
        END IF;
        IF prefix = 'pgphi_protecting_' THEN
            shadow := cut;
        ELSE
            trigger_name := cut;
        END IF;
    END LOOP;
END
$$;

-- The arguments of the sync trigger, as pg_trigger.tgargs holds them.
CREATE FUNCTION pgphi._protect_column_trigger_args(col name, key_name text, context_column name) RETURNS bytea
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(convert_to(a, getdatabaseencoding()) || '\x00'::bytea, ''::bytea ORDER BY n)
      FROM unnest(ARRAY[col::text, (pgphi._protect_column_names(col)).shadow::text, key_name,
                        coalesce(context_column::text, '')]) WITH ORDINALITY AS u(a, n)
$$;

CREATE FUNCTION pgphi._protect_column_sql(tbl regclass, col name, context_column name,
        OUT update_head text, OUT stale text)
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('UPDATE %s SET %I = pgphi.encrypt_phi(%I::text, $1, %s) WHERE ', tbl, n.shadow, col,
                  CASE WHEN context_column IS NULL THEN quote_literal('') ELSE format('%I::text', context_column) END),
           format('%I IS NULL AND %I IS NOT NULL', n.shadow, col)
      FROM pgphi._protect_column_names(col) n
$$;

-- Checks the arguments, and makes the shadow column and the trigger (kept if
-- a previous call made them, which must then have used the same key and
-- context). Returns the table's size in pages, the extent of the batches.
CREATE FUNCTION pgphi._protect_column_start(tbl regclass, col name, key_name text, batch_size integer,
        context_column name) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    names record := pgphi._protect_column_names(col);
    has_shadow boolean;
    trigger_args bytea;
BEGIN
    IF col IS NOT DISTINCT FROM pgphi._citus_distribution_column(tbl) THEN
        RAISE EXCEPTION 'pgphi.protect_column cannot encrypt column "%", the distribution column of Citus table %',
            col, tbl
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Citus places each row by the value of that column, and would place the encrypted values elsewhere.';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgphi._check_column_type(tbl, col,
        ARRAY['text'::regtype, 'character varying'::regtype, 'character'::regtype],
        '; protect_column converts text columns');
    IF pgphi._key_id(key_name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object';
    END IF;
    SELECT t.tgargs INTO trigger_args FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = names.trigger_name;
    has_shadow := EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = names.shadow
                             AND NOT a.attisdropped);
    IF trigger_args IS DISTINCT FROM pgphi._protect_column_trigger_args(col, key_name, context_column)
       AND trigger_args IS NOT NULL THEN
        RAISE EXCEPTION 'a conversion of column "%" of % is under way with another key or context', col, tbl
            USING ERRCODE = 'object_in_use', HINT = 'Call protect_column with the arguments of the first call.';
    END IF;
    IF trigger_args IS NULL AND has_shadow THEN
        -- Not ours to fill (or left without its trigger, so possibly stale).
        RAISE EXCEPTION 'relation % already has a column "%", and no conversion of column "%" is under way',
            tbl, names.shadow, col
            USING ERRCODE = 'object_in_use', HINT = 'Drop or rename that column first.';
    END IF;
    IF NOT has_shadow THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I pgphi.encrypted', tbl, names.shadow);
    END IF;
    IF trigger_args IS NULL THEN
        IF pgphi._citus_table_kind(tbl) IS NOT NULL THEN
            -- Citus creates the trigger on every shard too, once told that it may.
            PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
        END IF;
        EXECUTE format(
            -- UPDATE OF the plaintext and context columns only: the backfill,
            -- which sets the shadow column alone, does not fire it.
            'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %s ON %s FOR EACH ROW
             EXECUTE FUNCTION pgphi._protect_column_sync(%L, %L, %L, %L)',
            names.trigger_name,
            CASE WHEN context_column IS NULL THEN quote_ident(col) ELSE format('%I, %I', col, context_column) END,
            tbl, col, names.shadow, key_name, coalesce(context_column, ''));
    END IF;
    RETURN pgphi._batch_extent(tbl, batch_size);
END
$$;

-- Fills the shadow column on the next batch of pages (from page, or 0 when
-- NULL); returns the page after it, or NULL once relation_pages is reached.
CREATE FUNCTION pgphi._protect_column_fill(tbl regclass, col name, key_name text, batch_size integer,
        context_column name, page bigint, relation_pages bigint) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sql record := pgphi._protect_column_sql(tbl, col, context_column);
    first_page bigint := coalesce(page, 0);
    stop bigint;
BEGIN
    IF first_page >= relation_pages THEN
        RETURN NULL;
    END IF;
    IF pgphi._citus_table_kind(tbl) IS NOT NULL THEN
        -- One shard at a time (relation_pages counts shards).
        PERFORM pgphi._citus_run_shard('protect_column', tbl, col, key_name, batch_size, context_column, NULL,
                                       first_page);
        RETURN CASE WHEN first_page + 1 < relation_pages THEN first_page + 1 END;
    END IF;
    stop := first_page + (SELECT b.pages_per_batch FROM pgphi._page_batches(tbl, batch_size) b);
    PERFORM pgphi._update_pages(sql.update_head, sql.stale, key_name, NULL, NULL, first_page, stop);
    RETURN CASE WHEN stop < relation_pages THEN stop END;
END
$$;

-- A sweep of what the page batches left; false once it found nothing.
CREATE FUNCTION pgphi._protect_column_sweep(tbl regclass, col name, key_name text, batch_size integer,
        context_column name) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pgphi._citus_table_kind(tbl) IS NULL
                THEN pgphi._update_sweep(tbl, s.update_head, s.stale, key_name, NULL, NULL, batch_size) > 0
                ELSE pgphi._citus_sweep('protect_column', tbl, col, key_name, batch_size, context_column, NULL,
                                        s.stale, NULL, NULL)
           END
      FROM pgphi._protect_column_sql(tbl, col, context_column) s
$$;

-- The swap, under a short exclusive lock: last stragglers, then the shadow
-- column takes the plaintext column's place.
CREATE FUNCTION pgphi._protect_column_swap(tbl regclass, col name, key_name text, context_column name)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sql record := pgphi._protect_column_sql(tbl, col, context_column);
    names record := pgphi._protect_column_names(col);
    left_over bigint;
BEGIN
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', tbl);
    IF pgphi._citus_table_kind(tbl) IS NULL THEN
        EXECUTE sql.update_head || sql.stale USING key_name;
    ELSE
        -- Citus runs no UPDATE that calls encrypt_phi on its rows; the
        -- trigger has kept every write since the shards' batches in step,
        -- so nothing is left, which is checked.
        EXECUTE format('SELECT count(*) FROM %s WHERE ', tbl) || sql.stale INTO left_over;
        IF left_over > 0 THEN
            RAISE EXCEPTION '% values of column "%" of % are not encrypted yet', left_over, col, tbl
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Call pgphi.protect_column again with the same arguments: it resumes.';
        END IF;
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    END IF;
    EXECUTE format('DROP TRIGGER %I ON %s', names.trigger_name, tbl);
    EXECUTE format('ALTER TABLE %s DROP COLUMN %I', tbl, col);
    EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', tbl, names.shadow, col);
END
$$;

CREATE FUNCTION pgphi._protect_column_done(tbl regclass, col name, key_name text) RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The key as the catalog names it (the argument is not repeated).
    RAISE NOTICE 'column "%" of % is now encrypted with pgphi key "%"', col, tbl,
        coalesce(pgphi._key_name(pgphi._key_id(key_name)), '(unknown)')
        USING DETAIL = 'The plaintext stays in the table''s pages until they are rewritten, and in WAL and backups.',
              HINT = format('Run VACUUM FULL %s (or pg_repack) to remove it from the table.', tbl);
END
$$;

-- Converts a plaintext text column of a live table into a pgphi.encrypted
-- column of the same name, online: a shadow column is added and kept in step
-- with writes by a trigger, filled in committed batches of pages (resumable:
-- CALL it again after an interruption), and finally swapped in with one
-- short exclusive lock. The old column is dropped, but its bytes stay in the
-- table's pages until they are rewritten (VACUUM FULL, pg_repack), and in WAL
-- and backups: the procedure says so when it ends.
CREATE PROCEDURE pgphi.protect_column(tbl regclass, col name, key_name text,
        batch_size integer DEFAULT 10000, context_column name DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    relation_pages pg_catalog.int8;
    page pg_catalog.int8;
    more pg_catalog.bool;
BEGIN
    relation_pages := pgphi._protect_column_start(tbl, col, key_name, batch_size, context_column);
    COMMIT;
    LOOP
        page := pgphi._protect_column_fill(tbl, col, key_name, batch_size, context_column, page, relation_pages);
        COMMIT;
        EXIT WHEN page IS NULL;
    END LOOP;
    LOOP
        more := pgphi._protect_column_sweep(tbl, col, key_name, batch_size, context_column);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
    PERFORM pgphi._protect_column_swap(tbl, col, key_name, context_column);
    COMMIT;
    PERFORM pgphi._protect_column_done(tbl, col, key_name);
END
$$;

-- Keeps the shadow column of a column being protected in step with writes
-- (arguments: plaintext column, shadow column, key, context column or '').
CREATE FUNCTION pgphi._protect_column_sync() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    row_json jsonb := to_jsonb(NEW);
    plaintext text := row_json ->> TG_ARGV[0];
    context text := CASE WHEN TG_ARGV[3] = '' THEN '' ELSE coalesce(row_json ->> TG_ARGV[3], '') END;
BEGIN
    NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[1],
        CASE WHEN plaintext IS NULL THEN NULL ELSE pgphi.encrypt_phi(plaintext, TG_ARGV[2], context)::bytea::text END));
    RETURN NEW;
END
$$;

------------------------------------------------------------------------------
-- A shard's batches, on the Citus node that holds it
------------------------------------------------------------------------------
-- One step of a batch procedure on a shard, run at the coordinator's request
-- (pgphi._citus_run_shard): phase NULL starts, and each step returns the
-- next ('pages', 'sweep N', 'fill PAGE PAGES', 'finish'), NULL when the
-- shard is done. The steps are the procedures' own, on the shard; Citus
-- lets them change the shard directly (citus.enable_manual_changes_to_shards,
-- for this function's statements only: it ends with the function). An error
-- is raised again with its SQLSTATE in its text, for _citus_remote.
CREATE FUNCTION pgphi._citus_shard_step(operation text, shard_name text, col name, key_name text,
        batch_size integer, context_column name, source_column name, phase text) RETURNS text
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shard regclass := to_regclass(shard_name);
    step text := split_part(coalesce(phase, 'start'), ' ', 1);
    arg bigint := nullif(split_part(coalesce(phase, ''), ' ', 2), '')::bigint;
    pages bigint := nullif(split_part(coalesce(phase, ''), ' ', 3), '')::bigint;
    more boolean;
    page bigint;
    source_key text;
    message text;
    detail text;
    hint text;
BEGIN
    BEGIN
        IF shard IS NULL OR NOT pgphi._citus_is_shard(shard) THEN
            -- The name is not repeated: the caller, not a catalog, wrote it.
            RAISE EXCEPTION 'no shard of a Citus table by that name on this node'
                USING ERRCODE = 'undefined_table';
        END IF;
        PERFORM set_config('citus.enable_manual_changes_to_shards', 'on', true);
        IF operation = 'reencrypt' THEN
            CASE step
            WHEN 'start' THEN
                PERFORM pgphi._reencrypt_start(shard, col, batch_size, context_column, key_name);
                RETURN 'pages';
            WHEN 'pages' THEN
                more := pgphi._reencrypt_pages(shard, col, batch_size, context_column, key_name);
                RETURN CASE WHEN more THEN 'pages' ELSE 'sweep 1' END;
            WHEN 'sweep' THEN
                more := pgphi._reencrypt_sweep(shard, col, batch_size, context_column, key_name);
                RETURN CASE WHEN more AND arg < 1000 THEN format('sweep %s', arg + 1) ELSE 'finish' END;
            ELSE
                PERFORM pgphi._progress_finish(shard, col);
                RETURN NULL;
            END CASE;
        ELSIF operation = 'rebuild_blind_index' THEN
            IF step <> 'start' AND pgphi._column_type(shard, source_column)
                                    IN ('pgphi.encrypted'::regtype, 'bytea'::regtype) THEN
                source_key := pgphi._column_key(shard, source_column);
            END IF;
            CASE step
            WHEN 'start' THEN
                PERFORM pgphi._rebuild_blind_index_start(shard, col, source_column, key_name, batch_size,
                                                         context_column);
                RETURN 'pages';
            WHEN 'pages' THEN
                more := pgphi._rebuild_blind_index_pages(shard, col, source_column, key_name, batch_size,
                                                         context_column, source_key);
                RETURN CASE WHEN more THEN 'pages' ELSE 'sweep 1' END;
            WHEN 'sweep' THEN
                more := pgphi._rebuild_blind_index_sweep(shard, col, source_column, key_name, batch_size,
                                                         context_column, source_key);
                RETURN CASE WHEN more AND arg < 1000 THEN format('sweep %s', arg + 1) ELSE 'finish' END;
            ELSE
                PERFORM pgphi._progress_finish(shard, col);
                RETURN NULL;
            END CASE;
        ELSIF operation = 'protect_column' THEN
            -- The shadow column and the trigger came with the table's DDL.
            CASE step
            WHEN 'start' THEN
                RETURN format('fill 0 %s', (SELECT b.relation_pages FROM pgphi._page_batches(shard, batch_size) b));
            WHEN 'fill' THEN
                page := pgphi._protect_column_fill(shard, col, key_name, batch_size, context_column, arg, pages);
                RETURN CASE WHEN page IS NULL THEN 'sweep 1' ELSE format('fill %s %s', page, pages) END;
            ELSE
                more := pgphi._protect_column_sweep(shard, col, key_name, batch_size, context_column);
                RETURN CASE WHEN more AND arg < 1000 THEN format('sweep %s', arg + 1) END;
            END CASE;
        END IF;
        RAISE EXCEPTION 'unknown batch operation "%"', operation USING ERRCODE = 'invalid_parameter_value';
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS message = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
        RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = format('[%s] %s', SQLSTATE, message),
            DETAIL = coalesce(detail, ''), HINT = coalesce(hint, '');
    END;
END
$$;

-- A shard's batches, each committed (called by the coordinator through
-- pgphi._citus_remote, on a connection of its own).
CREATE PROCEDURE pgphi._citus_shard_batches(operation text, shard_name text, col name, key_name text,
        batch_size integer, context_column name, source_column name)
    LANGUAGE plpgsql
AS $$
DECLARE
    phase pg_catalog.text;
BEGIN
    LOOP
        phase := pgphi._citus_shard_step(operation, shard_name, col, key_name, batch_size, context_column,
                                         source_column, phase);
        COMMIT;
        EXIT WHEN phase IS NULL;
    END LOOP;
END
$$;

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------
-- Re-encryption returns ciphertext only; whoever may update a table's rows
-- may run it. Each value the procedures touch still passes the key grants
-- (reencrypt_value checks decrypt and encrypt on the key, encrypt_phi and
-- blind_index encrypt, decrypt_phi decrypt).
GRANT EXECUTE ON FUNCTION pgphi.reencrypt_value(pgphi.encrypted, text, text),
    pgphi.reencrypt_value(bytea, text, text) TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON PROCEDURE pgphi.reencrypt(regclass, name, integer, name, text)
    TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON PROCEDURE pgphi.protect_column(regclass, name, text, integer, name),
    pgphi.rebuild_blind_index(regclass, name, name, text, integer, name) TO pgphi_encrypt;
GRANT EXECUTE ON PROCEDURE pgphi._citus_shard_batches(text, text, name, text, integer, name, name)
    TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON FUNCTION
    pgphi._key_version_of(bytea, integer), pgphi._column_type(regclass, name), pgphi._page_batches(regclass, integer),
    pgphi._citus_table_kind(regclass), pgphi._citus_placements(regclass), pgphi._batch_extent(regclass, integer),
    pgphi._citus_remote(text, integer, text, text, text, name, text, integer, name, name),
    pgphi._citus_run_shard(text, regclass, name, text, integer, name, name, bigint),
    pgphi._citus_progress_shard(text, regclass, name, text, integer, name, name),
    pgphi._citus_sweep(text, regclass, name, text, integer, name, name, text, integer, integer),
    pgphi._citus_distribution_column(regclass), pgphi._citus_is_shard(regclass),
    pgphi._citus_shard_changed(text, name),
    pgphi._citus_shard_step(text, text, name, text, integer, name, name, text),
    pgphi._check_column_type(regclass, name, regtype[], text), pgphi._batch_key(text),
    pgphi._column_key(regclass, name),
    pgphi._update_pages(text, text, text, integer, integer, bigint, bigint),
    pgphi._update_sweep(regclass, text, text, text, integer, integer, integer),
    pgphi._progress_check(regclass, name),
    pgphi._progress_begin(regclass, name, integer, integer, bigint, text),
    pgphi._progress_get(regclass, name), pgphi._progress_advance(regclass, name, bigint, bigint),
    pgphi._progress_finish(regclass, name), pgphi._progress_finish_swept(regclass, name, boolean),
    pgphi._progress_pages(regclass, name, text, text, text, integer),
    pgphi._progress_sweep(regclass, name, text, text, text, integer),
    pgphi._reencrypt_sql(regclass, name, name), pgphi._reencrypt_start(regclass, name, integer, name, text),
    pgphi._reencrypt_pages(regclass, name, integer, name, text),
    pgphi._reencrypt_sweep(regclass, name, integer, name, text),
    pgphi._rebuild_blind_index_sql(regclass, name, name, name, text),
    pgphi._rebuild_blind_index_start(regclass, name, name, text, integer, name),
    pgphi._rebuild_blind_index_pages(regclass, name, name, text, integer, name, text),
    pgphi._rebuild_blind_index_sweep(regclass, name, name, text, integer, name, text),
    pgphi._protect_column_names(name), pgphi._protect_column_trigger_args(name, text, name),
    pgphi._protect_column_sql(regclass, name, name),
    pgphi._protect_column_start(regclass, name, text, integer, name),
    pgphi._protect_column_fill(regclass, name, text, integer, name, bigint, bigint),
    pgphi._protect_column_sweep(regclass, name, text, integer, name),
    pgphi._protect_column_swap(regclass, name, text, name), pgphi._protect_column_done(regclass, name, text),
    pgphi._protect_column_sync()
    TO pgphi_key_custodian, pgphi_encrypt;
