-- pgphi 0.2.0 -> 0.3.0 (in progress). 0.2.0 is released: its scripts never
-- change again. A new installation of 0.3.0 runs src/pgphi--0.3.0.sql, which
-- `make sql` generates from src/sql/ (the current definition of every
-- object, by concern); this script brings a 0.2.0 database to the same
-- objects, which test/t/010_extension_update.pl checks with pg_dump. Every
-- change goes into both places (src/sql/README.md).
--
-- 0.3.0 closes what the security review of 0.2.0 found. Each section below is
-- one class of finding; an object changed here is changed in full (CREATE OR
-- REPLACE).
\echo Use "ALTER EXTENSION pgphi UPDATE" to load this file. \quit

------------------------------------------------------------------------------
-- Caller-privilege SQL resolves nothing through the caller's search_path.
------------------------------------------------------------------------------

-- Routines that run with the caller's privileges resolve nothing through the
-- caller's search_path: every function pins search_path. The batch
-- procedures commit between batches, which a procedure with a SET clause
-- cannot, so they are thin: their bodies only call pgphi helpers (named with
-- their schema, with arguments of exactly the parameters' types), commit and
-- loop on boolean variables. The helpers pin search_path; they run as the
-- caller (SECURITY INVOKER) where they touch the user's table, and as pgphi's
-- owner (SECURITY DEFINER) only to read and write pgphi.reencrypt_progress.
-- Identifiers reach SQL text only as format() arguments (%I, or %s of a
-- regclass), never inside a format string, so "%" and "$" in names are data.

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
        RAISE NOTICE 'resuming % of %.% at page % of %', task, tbl, quote_ident(col), progress.next_page,
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
    PERFORM pgphi._progress_begin(tbl, col, target.key_id, target.version,
                                  (SELECT b.relation_pages FROM pgphi._page_batches(tbl, batch_size) b),
                                  're-encryption');
    RETURN target_key;
END
$$;

CREATE FUNCTION pgphi._reencrypt_pages(tbl regclass, col name, batch_size integer, context_column name,
        key_name text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgphi._progress_pages(tbl, col, s.update_head, s.stale, key_name, batch_size)
      FROM pgphi._reencrypt_sql(tbl, col, context_column) s
$$;

CREATE FUNCTION pgphi._reencrypt_sweep(tbl regclass, col name, batch_size integer, context_column name,
        key_name text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgphi._progress_sweep(tbl, col, s.update_head, s.stale, key_name, batch_size)
      FROM pgphi._reencrypt_sql(tbl, col, context_column) s
$$;

-- Moves every value of a column to its key's active version, online: batches
-- of table pages, each its own transaction holding only row locks, then sweeps
-- for values that concurrent writers copied from old rows. Concurrent updates
-- are never lost (each UPDATE re-checks rows that changed under it). Call it
-- again after a crash or cancel and it continues where it stopped.
CREATE OR REPLACE PROCEDURE pgphi.reencrypt(tbl regclass, col name, batch_size integer DEFAULT 10000,
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
                                  (SELECT b.relation_pages FROM pgphi._page_batches(tbl, batch_size) b),
                                  'the blind index rebuild');
    RETURN source_key;
END
$$;

CREATE FUNCTION pgphi._rebuild_blind_index_pages(tbl regclass, index_column name, source_column name,
        key_name text, batch_size integer, context_column name, source_key text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgphi._progress_pages(tbl, index_column, s.update_head, s.stale, key_name, batch_size)
      FROM pgphi._rebuild_blind_index_sql(tbl, index_column, source_column, context_column, source_key) s
$$;

CREATE FUNCTION pgphi._rebuild_blind_index_sweep(tbl regclass, index_column name, source_column name,
        key_name text, batch_size integer, context_column name, source_key text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgphi._progress_sweep(tbl, index_column, s.update_head, s.stale, key_name, batch_size)
      FROM pgphi._rebuild_blind_index_sql(tbl, index_column, source_column, context_column, source_key) s
$$;

-- Fills a blind index column from its source column (encrypted, or plain
-- text), and after the blind-index key was rotated recomputes every value not
-- under the active version: batches of pages, each its own transaction,
-- resumable like reencrypt (progress in pgphi.reencrypt_progress, under the
-- index column's name). Values already under the active version are kept.
CREATE OR REPLACE PROCEDURE pgphi.rebuild_blind_index(tbl regclass, index_column name, source_column name,
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
        EXECUTE format(
            -- UPDATE OF the plaintext and context columns only: the backfill,
            -- which sets the shadow column alone, does not fire it.
            'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %s ON %s FOR EACH ROW
             EXECUTE FUNCTION pgphi._protect_column_sync(%L, %L, %L, %L)',
            names.trigger_name,
            CASE WHEN context_column IS NULL THEN quote_ident(col) ELSE format('%I, %I', col, context_column) END,
            tbl, col, names.shadow, key_name, coalesce(context_column, ''));
    END IF;
    RETURN (SELECT b.relation_pages FROM pgphi._page_batches(tbl, batch_size) b);
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
    SELECT pgphi._update_sweep(tbl, s.update_head, s.stale, key_name, NULL, NULL, batch_size) > 0
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
BEGIN
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', tbl);
    EXECUTE sql.update_head || sql.stale USING key_name;
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
CREATE OR REPLACE PROCEDURE pgphi.protect_column(tbl regclass, col name, key_name text,
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
CREATE OR REPLACE FUNCTION pgphi._protect_column_sync() RETURNS trigger
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
-- SQL functions that ran with the caller's search_path: pinned too.
------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgphi.grant_decrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', true) $$;
CREATE OR REPLACE FUNCTION pgphi.revoke_decrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', false) $$;
CREATE OR REPLACE FUNCTION pgphi.grant_encrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', true) $$;
CREATE OR REPLACE FUNCTION pgphi.revoke_encrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', false) $$;

CREATE OR REPLACE FUNCTION pgphi.encrypt_phi_all_versions(value text, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(pgphi._encrypt_phi_version(value, key_name, context, u.version) ORDER BY u.n), '{}')
      FROM unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;
CREATE OR REPLACE FUNCTION pgphi.encrypt_phi_all_versions(value bytea, key_name text, context text DEFAULT '')
    RETURNS pgphi.encrypted[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(pgphi._encrypt_phi_version(value, key_name, context, u.version) ORDER BY u.n), '{}')
      FROM unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;
CREATE OR REPLACE FUNCTION pgphi.blind_index_all_versions(value text, key_name text) RETURNS bytea[]
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(pgphi.blind_index(value, key_name, u.version) ORDER BY u.n), '{}')
      FROM unnest(pgphi._live_versions(key_name)) WITH ORDINALITY AS u(version, n)
$$;

-- Privileges of the helpers: those of the procedures' callers (as for the
-- key lookups they use; a superuser needs none). PUBLIC loses them with
-- every other routine in the section "privileges" below.
GRANT EXECUTE ON FUNCTION
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
    pgphi._protect_column_swap(regclass, name, text, name), pgphi._protect_column_done(regclass, name, text)
    TO pgphi_key_custodian, pgphi_encrypt;

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

-- Finding 4 of the review: direct DML by a superuser got past the audit
-- triggers (a grant handed to another role, a key renamed, a KEK reference
-- changed, a version deleted, un-destroyed or un-retired). Now every row
-- change of every pgphi table but audit_log (append-only already) is seen by
-- pgphi._audit_catalog_change(), attached in the script's last section:
--   * a change made by a pgphi function keeps the semantic record that
--     function's path already writes (create, rotate, rewrap, retire,
--     destroy, grant_*, revoke_*, set_cryptoperiod, approve_destroy ...);
--   * any other change (direct DML, a restore, someone's own function) is
--     recorded as catalog_insert, catalog_update, catalog_delete or
--     catalog_truncate, naming the table, the row, every changed column with
--     its old and new value, and how the change was made. Binary columns
--     (the wrapped DEK) appear only as a short SHA-256 digest.
-- Which function is writing comes from the function manager (see
-- src/pg/catalog_audit.cpp), confirmed by the statement's call stack, so no
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
    IF writer IS NOT NULL THEN
        GET DIAGNOSTICS stack = PG_CONTEXT;
        IF pgphi._writer_ran_statement(writer, stack) THEN
            -- pgphi's own change: its function's path writes the semantic
            -- record. One path had none: a renewed destroy approval.
            IF TG_TABLE_NAME = 'destroy_approvals' AND TG_OP = 'UPDATE' THEN
                IF (new_row -> 'approved_at') IS DISTINCT FROM (old_row -> 'approved_at') THEN
                    PERFORM pgphi._audit('approve_destroy', (new_row ->> 'key_id')::integer,
                                         (new_row ->> 'version')::integer, 'ok', 'approval renewed');
                END IF;
            END IF;
            RETURN NULL;
        END IF;
        how := format('not by a pgphi function (inside %s)', writer);
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

REVOKE ALL ON FUNCTION pgphi._catalog_writer(), pgphi._in_extension_script(),
    pgphi._changes_pgphi_members(pg_ddl_command),
    pgphi._queue_catalog_refusal(text, text), pgphi._writer_ran_statement(regprocedure, text),
    pgphi._audit_value(jsonb, boolean), pgphi._audit_catalog_change(), pgphi._guard_catalog_ddl() FROM PUBLIC;

-- (end of section: catalog audit)



------------------------------------------------------------------------------
-- Audit events: coalesced, counted, never silently lost; anchored chain.
------------------------------------------------------------------------------

-- Identical refusals and failures coalesce into one row: `occurrences` counts
-- them, `first_at` and `last_at` are the first and the last. Rows written
-- before 0.3.0 (and rows of one occurrence without times) read as one
-- occurrence; their hash is computed as before, so old chains still verify.
ALTER TABLE pgphi.audit_log
    ADD COLUMN occurrences bigint NOT NULL DEFAULT 1 CHECK (occurrences >= 1),
    ADD COLUMN first_at timestamptz,
    ADD COLUMN last_at timestamptz;

-- The hashed form of a row: a JSON array, whose text form PostgreSQL writes
-- the same way every time, with times in UTC microseconds. A row that is
-- one occurrence without first and last times is hashed exactly as 0.2.0
-- did; any other row also hashes its count and both times (so changing any
-- of them, or turning a coalesced row into a plain one, breaks the chain).
CREATE OR REPLACE FUNCTION pgphi._audit_row_hash(prev_hash bytea, r pgphi.audit_log) RETURNS bytea
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

-- Coalesced events from shared memory, written by the audit writer: the
-- 0.2.0 form plus how many identical events the row stands for, and when
-- the first and the last of them happened.
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
REVOKE ALL ON FUNCTION pgphi._record_audit_event(timestamptz, text, text, text, integer, text, integer, text,
    text, bigint, timestamptz, timestamptz) FROM PUBLIC;

-- overflow_events: events recorded only as counts per role and action
-- because too many distinct events were waiting at once.
DROP FUNCTION pgphi.audit_queue_status();
CREATE FUNCTION pgphi.audit_queue_status(OUT queued_events integer, OUT dropped_events bigint,
        OUT dropped_counts bigint, OUT overflow_events bigint)
    AS 'MODULE_PATHNAME', 'pgphi_audit_queue_status' LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION pgphi.audit_queue_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.audit_queue_status() TO pgphi_key_auditor, pg_monitor;

------------------------------------------------------------------------------
-- Anchors: the chain's head (seq, row_hash) authenticated by the key
-- manager, with a key the database never holds (the local provider: an
-- HMAC key derived from its KEK, computed by the key broker). Made on a
-- schedule (pgphi.audit_anchor_interval, when the chain changed) and on
-- demand (pgphi.anchor_audit_log()), stored here and written to the server
-- log. Each anchor's MAC also covers the previous anchor's MAC.
------------------------------------------------------------------------------

CREATE TABLE pgphi.audit_anchors (
    anchor_seq  bigint PRIMARY KEY,
    anchored_at timestamptz NOT NULL,
    audit_seq   bigint NOT NULL,     -- the anchored row of pgphi.audit_log
    audit_hash  bytea NOT NULL,      -- and its row_hash
    provider    text NOT NULL,
    key_ref     text NOT NULL,
    prev_mac    text NOT NULL,       -- the previous anchor's mac ('' for the first)
    mac         text NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('pgphi.audit_anchors', '');

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

-- Anchors the head now, unless the last anchor covers it; returns the anchor.
-- It reads the head itself: it MACs nothing it is given.
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

-- Numbers and chains each new row, and tells the scheduled anchoring that
-- this database's chain moved. The advisory lock (keyed by the table's oid)
-- serialises writers until they commit, so the chain cannot fork.
CREATE OR REPLACE FUNCTION pgphi._audit_log_chain() RETURNS trigger
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

-- Walks the chain, then checks every anchor with the key manager: anchors
-- numbered without gaps, each following the previous one's MAC, each MAC
-- authentic, and each anchored row present with the anchored hash. So rows
-- removed from the end, a TRUNCATE, and a chain rewritten or re-hashed up
-- to an anchored row are found without a head hash recorded by hand. Pass
-- a head_hash recorded earlier to check against it as well.
CREATE OR REPLACE FUNCTION pgphi.verify_audit_log(recorded_head text DEFAULT NULL,
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

REVOKE ALL ON pgphi.audit_anchors FROM PUBLIC;
REVOKE ALL ON FUNCTION pgphi._audit_anchors_are_append_only(), pgphi.anchor_audit_log(),
    pgphi._verify_audit_anchor(bigint, timestamptz, bigint, bytea, text, text, text, text),
    pgphi._audit_anchor_last_known(), pgphi._audit_chain_changed() FROM PUBLIC;
GRANT SELECT ON pgphi.audit_anchors TO pgphi_key_auditor;
GRANT EXECUTE ON FUNCTION pgphi.anchor_audit_log() TO pgphi_key_custodian, pgphi_key_auditor;

-- (end of section: audit events)



------------------------------------------------------------------------------
-- Least privilege, and retirement that nobody can block.
------------------------------------------------------------------------------

-- What each kind of role may do is in README.md ("Access control"); the
-- generated matrix in test/t/020_privileges_matrix.pl holds every routine
-- and relation of the extension to it.

-- 1. PUBLIC gets nothing that touches keys. Routines created without an
--    explicit REVOKE (reencrypt_value, the batch procedures, the catalog
--    helpers, and any a section above adds) were executable by PUBLIC: take
--    every routine away from PUBLIC, then give back only what reads neither a
--    key nor the key catalog (the type's support functions, and the header
--    reader ciphertext_info).
REVOKE ALL ON ALL ROUTINES IN SCHEMA pgphi FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgphi.encrypted_in(cstring), pgphi.encrypted_out(pgphi.encrypted), pgphi.encrypted_recv(internal),
    pgphi.encrypted_send(pgphi.encrypted), pgphi.encrypted(bytea), pgphi.encrypted_analyze(internal),
    pgphi.encrypted_eq(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_ne(pgphi.encrypted, pgphi.encrypted),
    pgphi.encrypted_lt(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_le(pgphi.encrypted, pgphi.encrypted),
    pgphi.encrypted_gt(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_ge(pgphi.encrypted, pgphi.encrypted),
    pgphi.encrypted_cmp(pgphi.encrypted, pgphi.encrypted), pgphi.encrypted_hash(pgphi.encrypted),
    pgphi.encrypted_hash_extended(pgphi.encrypted, bigint),
    pgphi.ciphertext_info(bytea), pgphi.ciphertext_info(pgphi.encrypted)
    TO PUBLIC;
-- create_decrypted_view tells whether the view's reader holds the key (it
-- calls has_key_privilege), so it is for the roles that may ask.
GRANT EXECUTE ON FUNCTION pgphi.create_decrypted_view(regclass, text, regrole, name[], text, name)
    TO pgphi_key_custodian, pgphi_encrypt, pgphi_decrypt;

-- The batch procedures and their helpers: for the roles that run them. Each
-- value they touch still passes the key grants (reencrypt_value checks
-- decrypt and encrypt on the key, encrypt_phi and blind_index encrypt,
-- decrypt_phi decrypt).
GRANT EXECUTE ON PROCEDURE pgphi.reencrypt(regclass, name, integer, name, text)
    TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON PROCEDURE pgphi.protect_column(regclass, name, text, integer, name),
    pgphi.rebuild_blind_index(regclass, name, name, text, integer, name) TO pgphi_encrypt;
GRANT EXECUTE ON FUNCTION pgphi._column_type(regclass, name), pgphi._page_batches(regclass, integer),
    pgphi._key_version_of(bytea, integer), pgphi._blind_index_version_of(bytea, integer)
    TO pgphi_key_custodian, pgphi_encrypt;

-- 2. Who may ask whether a role holds a key: key custodians, auditors and
--    superusers about any role; other members of pgphi's roles only about
--    roles whose privileges they have (themselves, their groups). Nobody
--    else, so a key's grantees cannot be enumerated.
CREATE OR REPLACE FUNCTION pgphi.has_key_privilege(role regrole, key_name text, privilege text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer;
    asker text := pgphi._acting_role();
BEGIN
    IF NOT (pg_has_role(session_user, 'pgphi_key_custodian', 'MEMBER')
            OR pg_has_role(session_user, 'pgphi_key_auditor', 'MEMBER')
            OR (has_key_privilege.role IS NOT NULL
                AND EXISTS (SELECT FROM pg_roles r WHERE r.oid = has_key_privilege.role::oid)
                AND pg_has_role(asker, has_key_privilege.role::oid, 'USAGE'))) THEN
        RAISE EXCEPTION 'only key custodians and auditors can ask about the pgphi key grants of other roles'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Other roles may ask about themselves and the roles whose privileges they have.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    target_id := pgphi._key_id(key_name);
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.',
                  DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = has_key_privilege.privilege
                      AND pg_has_role(role, g.grantee::oid, 'USAGE'));
END
$$;
REVOKE ALL ON FUNCTION pgphi.has_key_privilege(regrole, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.has_key_privilege(regrole, text, text)
    TO pgphi_encrypt, pgphi_decrypt, pgphi_key_custodian, pgphi_key_auditor;

-- 3. Group-wide grants need a second custodian. A grant reaches a group
--    when it goes to pgphi_encrypt or pgphi_decrypt, to a role one of them is
--    a member of, or to a role with more than ten member roles (direct or
--    indirect, superusers not counted): one custodian records an approval,
--    another makes the grant within a day. PUBLIC (OID 0) and OIDs that are
--    no role are refused outright.
CREATE TABLE pgphi.grant_approvals (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    grantee     regrole NOT NULL,
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, privilege, grantee, approved_by)
);

-- Why a grant to `grantee` would reach a group, or NULL if it would not.
CREATE FUNCTION pgphi._group_grant_reason(grantee regrole) RETURNS text
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN grantee::oid IN ('pgphi_encrypt'::regrole::oid, 'pgphi_decrypt'::regrole::oid)
            THEN format('%s is one of pgphi''s group roles', grantee)
        WHEN pg_has_role('pgphi_encrypt', grantee::oid, 'MEMBER')
            THEN format('pgphi_encrypt is a member of %s', grantee)
        WHEN pg_has_role('pgphi_decrypt', grantee::oid, 'MEMBER')
            THEN format('pgphi_decrypt is a member of %s', grantee)
        WHEN m.members > 10
            THEN format('%s has %s member roles (more than 10)', grantee, m.members)
        END
      FROM (SELECT count(*) AS members FROM pg_roles r
             WHERE r.oid <> grantee::oid AND NOT r.rolsuper AND pg_has_role(r.oid, grantee::oid, 'MEMBER')) m
$$;

-- Refuses grantees no key may go to: PUBLIC, OIDs that are no role, and
-- (separation of duties) the custodian and auditor groups and roles they
-- are members of.
CREATE FUNCTION pgphi._check_grantee(grantee regrole) RETURNS void
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    via text;
BEGIN
    IF grantee IS NULL THEN
        RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF grantee::oid = 0 THEN
        RAISE EXCEPTION 'pgphi keys cannot be granted to PUBLIC'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Grant keys to the roles of the people or applications that use them.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = grantee::oid) THEN
        RAISE EXCEPTION 'role with OID % does not exist', grantee::oid USING ERRCODE = 'undefined_object';
    END IF;
    SELECT g INTO via FROM unnest(ARRAY['pgphi_key_custodian', 'pgphi_key_auditor']) g
     WHERE pg_has_role(g, grantee::oid, 'MEMBER');
    IF via = grantee::text THEN
        RAISE EXCEPTION 'pgphi keys cannot be granted to %', grantee
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Grant keys to the roles of the people or applications that use them.';
    ELSIF via IS NOT NULL THEN
        RAISE EXCEPTION 'pgphi keys cannot be granted to %', grantee
            USING ERRCODE = 'insufficient_privilege', DETAIL = format('%s is a member of %s.', via, grantee),
                  HINT = 'Grant keys to the roles of the people or applications that use them.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.key_grants g WHERE g.key_id = target_id
                  AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid) THEN
        RETURN false;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee) VALUES (target_id, privilege, grantee)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RETURN changed > 0;
END
$$;

-- One custodian's approval of a group-wide grant, valid for a day; another
-- custodian then makes the grant. Audited as approve_grant.
CREATE FUNCTION pgphi.approve_grant(key_name text, grantee regrole, privilege text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    approver name := session_user;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve a grant of a pgphi key'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    PERFORM pgphi._check_grantee(grantee);
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = approver)
       AND pg_has_role(approver, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot approve granting pgphi key "%" to itself or to a role it belongs to',
                        approver, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must approve this grant.';
    END IF;
    INSERT INTO pgphi.grant_approvals (key_id, privilege, grantee, approved_by)
        VALUES (target_id, approve_grant.privilege, approve_grant.grantee, approver)
        ON CONFLICT ON CONSTRAINT grant_approvals_pkey DO UPDATE SET approved_at = now();
    PERFORM pgphi._audit('approve_grant', target_id, NULL, 'ok',
                         format('%s to %s%s', approve_grant.privilege, approve_grant.grantee,
                                coalesce('; ' || pgphi._group_grant_reason(approve_grant.grantee), '')));
END
$$;

REVOKE ALL ON pgphi.grant_approvals FROM PUBLIC;
GRANT SELECT ON pgphi.grant_approvals TO pgphi_key_custodian, pgphi_key_auditor;
REVOKE ALL ON FUNCTION pgphi._group_grant_reason(regrole), pgphi._check_grantee(regrole),
    pgphi.approve_grant(text, regrole, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.approve_grant(text, regrole, text) TO pgphi_key_custodian;

-- 4. reencrypt_progress: each conversion belongs to the role that started
--    it (started_by). Row-level security lets only that role see and change
--    its rows; key custodians see every row and may discard one (DELETE), for
--    instance a conversion its role abandoned. Rows from before 0.3.0 have
--    no owner: only custodians and superusers see them.
ALTER TABLE pgphi.reencrypt_progress ADD COLUMN started_by regrole;
ALTER TABLE pgphi.reencrypt_progress
    ALTER COLUMN started_by SET DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER::pg_catalog.text));
ALTER TABLE pgphi.reencrypt_progress ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_conversions ON pgphi.reencrypt_progress
    USING (started_by::pg_catalog.oid OPERATOR(pg_catalog.=)
           pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER::pg_catalog.text))::pg_catalog.oid)
    WITH CHECK (started_by::pg_catalog.oid OPERATOR(pg_catalog.=)
                pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER::pg_catalog.text))::pg_catalog.oid);
CREATE POLICY custodians_read ON pgphi.reencrypt_progress FOR SELECT
    USING (pg_catalog.pg_has_role('pgphi_key_custodian'::pg_catalog.name, 'USAGE'::pg_catalog.text));
CREATE POLICY custodians_discard ON pgphi.reencrypt_progress FOR DELETE
    USING (pg_catalog.pg_has_role('pgphi_key_custodian'::pg_catalog.name, 'USAGE'::pg_catalog.text));

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
REVOKE ALL ON FUNCTION pgphi._reencrypt_progress_claim() FROM PUBLIC;
CREATE TRIGGER reencrypt_progress_claim BEFORE INSERT ON pgphi.reencrypt_progress
    FOR EACH ROW EXECUTE FUNCTION pgphi._reencrypt_progress_claim();

-- 5. Retirement that nobody can block. The usage scan waits at most
--    lock_wait for each relation's lock and reports the relations it could
--    not scan (never skipping one silently), with every relation's owner;
--    retire_key_version names relation and owner when it refuses, and a
--    custodian can retire anyway by naming relations to ignore, with a
--    reason: that decision is audited (action retire_ignoring).
DROP FUNCTION pgphi.retire_key_version(text, integer);
DROP FUNCTION pgphi.key_version_usage(text, integer);

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
        BEGIN
            EXECUTE format('SELECT count(*) FROM ONLY %s WHERE %s(%I::bytea, $1) = $2', c.rel, version_of, c.attname)
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

REVOKE ALL ON FUNCTION pgphi.key_version_usage(text, integer, interval),
    pgphi.retire_key_version(text, integer, regclass[], text, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.key_version_usage(text, integer, interval),
    pgphi.retire_key_version(text, integer, regclass[], text, interval) TO pgphi_key_custodian;

-- (end of section: privileges)



------------------------------------------------------------------------------
-- Plaintext is never derived for storage without a client asking.
------------------------------------------------------------------------------


-- A value in the wrong argument (a swapped call such as
-- encrypt_phi('ssn_key', '123-45-6789')) must not reach the server log by
-- way of pgphi's own errors. So pgphi's messages repeat a name only when it
-- names an existing key: an unknown or invalid key name, an unknown
-- provider, normalization or privilege is refused without being quoted.
-- The C functions follow the same rule. What PostgreSQL's own messages may
-- log is for the server's settings (README: "Keeping PHI out of the server
-- log"). The bodies below are those of 0.1.0 and 0.2.0 but for the messages;
-- each pins its search_path.

CREATE OR REPLACE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_key_id integer;
    kek_ref text := coalesce(create_key.kek, CASE WHEN create_key.provider = 'local' THEN 'default' END);
    dek record;
BEGIN
    IF create_key.name IS NULL OR create_key.name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid pgphi key name'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.',
                  HINT = 'Key names have 1 to 63 letters, digits, "_", "." or "-", and start with a letter or "_".';
    END IF;
    IF create_key.provider IS NULL THEN
        RAISE EXCEPTION 'a pgphi key needs a provider' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kek_ref IS NULL THEN
        RAISE EXCEPTION '%', CASE WHEN create_key.provider IN ('vault', 'aws_kms') THEN format('provider %s needs the KEK to use', create_key.provider) ELSE 'unknown pgphi key provider' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass kek => the Vault Transit key name or the AWS KMS key id, ARN or alias.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.keys k WHERE k.name = create_key.name) THEN
        RAISE EXCEPTION 'pgphi key "%" already exists', create_key.name USING ERRCODE = 'duplicate_object';
    END IF;

    INSERT INTO pgphi.keys (name, provider, kek_ref)
        VALUES (create_key.name, create_key.provider, kek_ref)
        RETURNING key_id INTO new_key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(
        create_key.provider, kek_ref, new_key_id, 1, create_key.name,
        NOT EXISTS (SELECT FROM pgphi.keys k WHERE k.provider = 'local' AND k.key_id <> new_key_id));
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (new_key_id, 1, 'active', dek.wrapped_dek, dek.kek_version);
    RETURN new_key_id;
END
$$;

CREATE OR REPLACE FUNCTION pgphi.rotate_key(name text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
    new_version integer;
    dek record;
BEGIN
    SELECT * INTO key FROM pgphi.keys k WHERE k.name = rotate_key.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    SELECT max(v.version) + 1 INTO new_version FROM pgphi.key_versions v WHERE v.key_id = key.key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(key.provider, key.kek_ref, key.key_id, new_version,
                                                        key.name, false);
    UPDATE pgphi.key_versions v SET state = 'decrypt_only' WHERE v.key_id = key.key_id AND v.state = 'active';
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (key.key_id, new_version, 'active', dek.wrapped_dek, dek.kek_version);
    UPDATE pgphi.keys k SET rotated_at = pg_catalog.now() WHERE k.key_id = key.key_id;
    RETURN new_version;
END
$$;

CREATE OR REPLACE FUNCTION pgphi.rewrap_keys(name text DEFAULT NULL) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    rewrapped record;
    done integer := 0;
BEGIN
    FOR v IN SELECT k.key_id, k.name, k.provider, k.kek_ref, kv.version, kv.wrapped_dek
               FROM pgphi.keys k JOIN pgphi.key_versions kv USING (key_id)
              WHERE kv.wrapped_dek IS NOT NULL AND (rewrap_keys.name IS NULL OR k.name = rewrap_keys.name)
              ORDER BY k.key_id, kv.version
                FOR UPDATE OF kv
    LOOP
        SELECT * INTO rewrapped FROM pgphi._rewrap_dek(v.provider, v.kek_ref, v.key_id, v.version, v.name,
                                                        v.wrapped_dek);
        UPDATE pgphi.key_versions kv SET wrapped_dek = rewrapped.wrapped_dek, kek_version = rewrapped.kek_version
         WHERE kv.key_id = v.key_id AND kv.version = v.version;
        done := done + 1;
    END LOOP;
    IF rewrap_keys.name IS NOT NULL AND done = 0 AND pgphi._key_id(rewrap_keys.name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN done;
END
$$;

CREATE OR REPLACE FUNCTION pgphi.set_cryptoperiod(key_name text, cryptoperiod interval) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgphi.keys k SET cryptoperiod = set_cryptoperiod.cryptoperiod WHERE k.name = key_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
END
$$;

-- has_key_privilege: its current form, with messages that repeat no argument,
-- is in the privileges section above.

CREATE OR REPLACE FUNCTION pgphi.create_blind_index_key(name text, normalization text DEFAULT 'none',
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
        RAISE EXCEPTION 'unknown blind index normalization'
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

CREATE OR REPLACE FUNCTION pgphi._live_versions(key_name text) RETURNS integer[]
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
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN coalesce(versions, '{}');
END
$$;

-- (end of section: plaintext)



------------------------------------------------------------------------------
-- Broker and workers.
------------------------------------------------------------------------------

-- encrypt_phi(value, key_name, deterministic, context): VOLATILE, since its
-- randomized form returns a new value at every call (STABLE let the planner
-- run it for its estimates: a plain EXPLAIN spent seals and counted against
-- the key's nonce budget). Its deterministic form stays an index condition:
-- when `deterministic` is the constant true, the planner support function
-- replaces the call by pgphi._encrypt_phi_deterministic, a STABLE twin with
-- the same arguments and C function (src/pg/planner_support.cpp).
CREATE FUNCTION pgphi._encrypt_mode_support(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_mode_support' LANGUAGE C STRICT;
REVOKE ALL ON FUNCTION pgphi._encrypt_mode_support(internal) FROM PUBLIC;

CREATE FUNCTION pgphi._encrypt_phi_deterministic(value text, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_deterministic(value bytea, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_deterministic(value jsonb, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE OR REPLACE FUNCTION pgphi.encrypt_phi(value text, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;
CREATE OR REPLACE FUNCTION pgphi.encrypt_phi(value bytea, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;
CREATE OR REPLACE FUNCTION pgphi.encrypt_phi(value jsonb, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;

-- The twins go with encrypting, as encrypt_phi does (see its grants above).
REVOKE ALL ON FUNCTION pgphi._encrypt_phi_deterministic(text, text, boolean, text),
    pgphi._encrypt_phi_deterministic(bytea, text, boolean, text),
    pgphi._encrypt_phi_deterministic(jsonb, text, boolean, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi._encrypt_phi_deterministic(text, text, boolean, text),
    pgphi._encrypt_phi_deterministic(bytea, text, boolean, text),
    pgphi._encrypt_phi_deterministic(jsonb, text, boolean, text) TO pgphi_encrypt;

-- One key broker process per remote key manager (a hung one delays only its
-- own keys): their pids, starts and reloads. pgphi.broker_status() shows the
-- first, which serves the local provider and does the housekeeping.
CREATE FUNCTION pgphi.broker_processes(
        OUT provider text, OUT pid integer, OUT started_at timestamptz,
        OUT restarts integer, OUT config_reloads bigint)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'pgphi_broker_processes' LANGUAGE C VOLATILE PARALLEL SAFE;
REVOKE ALL ON FUNCTION pgphi.broker_processes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.broker_processes() TO pg_monitor;

-- (end of section: broker)



------------------------------------------------------------------------------
-- Seal reservations: the nonce budget survives failover and is not copied.
------------------------------------------------------------------------------

-- A randomized encryption draws a random 96-bit nonce, so a DEK version may
-- seal only so many values (pgphi.dek_rotation_threshold, hard limit four
-- times that). The counts live in shared memory and in a file of the data
-- directory, which is neither replicated nor complete after a crash. So a
-- version seals only inside a reservation committed here, in WAL: the key
-- broker's reservation worker raises `reserved` ahead of use, and a server
-- that cannot trust its own count (after a crash, a promotion, a base
-- backup) starts the version's count at what was reserved. Each row also
-- names the database that seals under the version: a database copied from
-- it (CREATE DATABASE ... TEMPLATE) finds another database's name there, and
-- must rotate the key before it encrypts at random, or both copies would
-- spend the one budget. A restored dump has no rows (the table is not
-- dumped) and must rotate too. Rows are written by pgphi._generate_wrapped_dek
-- (first reservation, with the new version) and by the reservation worker
-- (src/pg/broker.cpp), and audited as every catalog change is.
CREATE TABLE pgphi.seal_reservations (
    key_id             integer NOT NULL,
    version            integer NOT NULL,
    database_oid       oid NOT NULL,       -- the database whose values these seals are
    reserved           bigint NOT NULL CHECK (reserved >= 0),
    server_incarnation bigint NOT NULL,    -- which server life made the reservation
    reserved_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version)
);
REVOKE ALL ON pgphi.seal_reservations FROM PUBLIC;
GRANT SELECT ON pgphi.seal_reservations TO pgphi_key_auditor;

-- Writes a reservation: the first, with a new version (`first`, called by
-- pgphi._generate_wrapped_dek in the transaction that creates it), or the
-- next, raised to at least `at_least` (by the reservation worker, only for
-- this database's own versions). Returns what is reserved, NULL when this
-- database has no reservation of the version to raise. A function, so that
-- the audit trail records these changes as pgphi's own.
CREATE FUNCTION pgphi._reserve_seals(key_id integer, version integer, at_least bigint, incarnation bigint,
                                     first boolean) RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    this_database oid := (SELECT d.oid FROM pg_catalog.pg_database d
                           WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database());
    result bigint;
BEGIN
    IF first THEN
        -- (A version keeps the reservation it has, should its DEK ever be
        -- generated twice.)
        INSERT INTO pgphi.seal_reservations AS r (key_id, version, database_oid, reserved, server_incarnation)
            VALUES (_reserve_seals.key_id, _reserve_seals.version, this_database, at_least, incarnation)
            ON CONFLICT ON CONSTRAINT seal_reservations_pkey DO UPDATE SET reserved = r.reserved
            RETURNING r.reserved INTO result;
    ELSE
        UPDATE pgphi.seal_reservations r
           SET reserved = GREATEST(r.reserved, at_least), server_incarnation = incarnation,
               reserved_at = pg_catalog.now()
         WHERE r.key_id OPERATOR(pg_catalog.=) _reserve_seals.key_id
           AND r.version OPERATOR(pg_catalog.=) _reserve_seals.version
           AND r.database_oid OPERATOR(pg_catalog.=) this_database
        RETURNING r.reserved INTO result;
        IF result IS NOT NULL THEN
            PERFORM pgphi._audit('reserve_seals', _reserve_seals.key_id, _reserve_seals.version, 'ok',
                                 pg_catalog.format('%s values may now be encrypted under this version', result));
        END IF;
    END IF;
    RETURN result;
END
$$;
REVOKE ALL ON FUNCTION pgphi._reserve_seals(integer, integer, bigint, bigint, boolean) FROM PUBLIC;

-- Versions that exist when 0.2.0 is updated: this database seals under them,
-- nothing is reserved yet (the first encryption waits for a reservation).
INSERT INTO pgphi.seal_reservations (key_id, version, database_oid, reserved, server_incarnation)
SELECT v.key_id, v.version,
       (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()),
       0, 0
  FROM pgphi.key_versions v;

-- (end of section: seal reservations)



------------------------------------------------------------------------------
-- Section: kmip provider.
-- A KMIP 1.4 server as key manager (src/core/kmip_*.cpp, docs/provider-kmip.md):
-- create_key(..., provider => 'kmip', kek => name or unique identifier),
-- and pgphi.create_kek() for a KEK created by pgphi on request, the way to
-- give a named KEK a new version that rewrap_keys moves DEKs onto.
------------------------------------------------------------------------------

-- create_key: as in the plaintext section, with kmip among the providers
-- that need a KEK named.
CREATE OR REPLACE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_key_id integer;
    kek_ref text := coalesce(create_key.kek, CASE WHEN create_key.provider = 'local' THEN 'default' END);
    dek record;
BEGIN
    IF create_key.name IS NULL OR create_key.name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid pgphi key name'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.',
                  HINT = 'Key names have 1 to 63 letters, digits, "_", "." or "-", and start with a letter or "_".';
    END IF;
    IF create_key.provider IS NULL THEN
        RAISE EXCEPTION 'a pgphi key needs a provider' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kek_ref IS NULL THEN
        RAISE EXCEPTION '%', CASE WHEN create_key.provider IN ('vault', 'aws_kms', 'kmip', 'pkcs11') THEN format('provider %s needs the KEK to use', create_key.provider) ELSE 'unknown pgphi key provider' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass kek => the Vault Transit key name, the AWS KMS key id, ARN or alias, the KMIP key''s Name or Unique Identifier, or the PKCS#11 key as label:NAME or id:HEX.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.keys k WHERE k.name = create_key.name) THEN
        RAISE EXCEPTION 'pgphi key "%" already exists', create_key.name USING ERRCODE = 'duplicate_object';
    END IF;

    INSERT INTO pgphi.keys (name, provider, kek_ref)
        VALUES (create_key.name, create_key.provider, kek_ref)
        RETURNING key_id INTO new_key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(
        create_key.provider, kek_ref, new_key_id, 1, create_key.name,
        NOT EXISTS (SELECT FROM pgphi.keys k WHERE k.provider = 'local' AND k.key_id <> new_key_id));
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (new_key_id, 1, 'active', dek.wrapped_dek, dek.kek_version);
    RETURN new_key_id;
END
$$;

-- pgphi.create_kek(provider, kek_name): a new KEK in the key manager (only
-- kmip can: Create and Activate an AES-256 key with that Name), made by the
-- provider's key broker; returns its reference (KMIP: Unique Identifier).
-- Key custodians only: it changes the key manager, not pgphi's catalog.
CREATE FUNCTION pgphi.create_kek(provider text, kek_name text) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_create_kek' LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION pgphi.create_kek(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.create_kek(text, text) TO pgphi_key_custodian;

-- (end of section: kmip provider)



-- Key lifecycle: suspension, compromise and time-limited grants.
------------------------------------------------------------------------------

-- What each function serves in the key-management practice, and how it
-- behaves, is in docs/key-lifecycle.md.
--
-- Suspension (containment). One custodian suspends a key (every version,
-- also ones rotated in later) or one version; from the next statement of
-- every session, on the primary and its standbys, nothing is encrypted or
-- decrypted under it: the C lookup (src/pg/key_access.cpp) reads the marks
-- with the key's catalog row, a suspended version never enters a session's
-- key ring, and suspending drops every cached DEK from shared memory and
-- every ring when it commits (so statements already running on the primary
-- stop too). Lifting it takes two custodians: one approves, another resumes.
ALTER TABLE pgphi.keys ADD COLUMN suspended_at timestamptz, ADD COLUMN suspended_by name;
ALTER TABLE pgphi.key_versions ADD COLUMN suspended_at timestamptz, ADD COLUMN suspended_by name,
    ADD COLUMN compromised_at timestamptz, ADD COLUMN compromised_by name;

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
CREATE OR REPLACE VIEW pgphi.key_inventory AS
    SELECT k.name AS key_name, k.key_id, k.purpose, k.created_by AS owner, k.provider, k.kek_ref,
           v.version, v.state, v.kek_version, v.created_at, k.rotated_at, v.retired_at, v.destroyed_at,
           k.cryptoperiod,
           CASE WHEN v.state = 'active' THEN v.created_at + k.cryptoperiod END AS rotate_by,
           coalesce(v.state = 'active' AND v.created_at + k.cryptoperiod < pg_catalog.now(), false)
               AS rotation_overdue,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'encrypt' ORDER BY 1) AS encrypt_grantees,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'decrypt' ORDER BY 1) AS decrypt_grantees,
           (k.suspended_at IS NOT NULL OR v.suspended_at IS NOT NULL) AS suspended,
           coalesce(v.suspended_at, k.suspended_at) AS suspended_at,
           coalesce(v.suspended_by, k.suspended_by) AS suspended_by,
           v.compromised_at IS NOT NULL AS compromised,
           v.compromised_at, v.compromised_by
      FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id);

-- Time-limited grants (just-in-time access). A grant with valid_until
-- stops working at that moment in every session, also inside a statement
-- that started before it (src/pg/access_control.cpp checks the clock for
-- such grants), without anyone revoking it. The expiry reaches the audit
-- trail twice: at the first use it refuses (action decrypt or encrypt,
-- outcome refused, detail "... grant expired", through the audit writer),
-- and when pgphi.expire_key_grants() (to be scheduled, for instance every
-- few minutes with pg_cron) removes the expired rows (action
-- expire_decrypt or expire_encrypt).
ALTER TABLE pgphi.key_grants ADD COLUMN valid_until timestamptz;

CREATE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean,
        valid_until timestamptz)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    existing pgphi.key_grants;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;
    IF valid_until IS NOT NULL AND valid_until <= now() THEN
        RAISE EXCEPTION 'a time-limited pgphi key grant must end in the future'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass valid_until => now() + interval ''...''.';
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    SELECT * INTO existing FROM pgphi.key_grants g WHERE g.key_id = target_id
       AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid FOR UPDATE;
    IF FOUND THEN
        -- A grant without expiry covers any time-limited one; a
        -- time-limited one is extended, shortened or made permanent.
        IF existing.valid_until IS NULL OR existing.valid_until IS NOT DISTINCT FROM valid_until THEN
            RETURN false;
        END IF;
        UPDATE pgphi.key_grants g SET valid_until = _change_key_grant.valid_until
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        PERFORM pgphi._audit('grant_' || privilege, target_id, NULL, 'ok',
                             format('to %s %s (was until %s)', grantee,
                                    coalesce('until ' || pgphi._audit_time(valid_until), 'without expiry'),
                                    pgphi._audit_time(existing.valid_until)));
        RETURN true;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee, valid_until)
        VALUES (target_id, privilege, grantee, valid_until)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RETURN changed > 0;
END
$$;

-- The grant without expiry (section "privileges"): it also makes a
-- time-limited grant permanent. Its lines up to the group check are as
-- before, so its errors' context is unchanged.
CREATE OR REPLACE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.key_grants g WHERE g.key_id = target_id AND g.valid_until IS NULL
                  AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid) THEN
        RETURN false;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    -- A time-limited grant becomes one without expiry.
    UPDATE pgphi.key_grants g SET valid_until = NULL
     WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
       AND g.grantee::oid = _change_key_grant.grantee::oid AND g.valid_until IS NOT NULL;
    IF FOUND THEN
        PERFORM pgphi._audit('grant_' || privilege, target_id, NULL, 'ok',
                             format('to %s without expiry (was time-limited)', grantee));
        RETURN true;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee) VALUES (target_id, privilege, grantee)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RETURN changed > 0;
END
$$;

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
    DELETE FROM pgphi.key_grants g WHERE g.valid_until <= now();
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END
$$;

-- The semantic audit records of catalog changes (0.2.0), with the expiry
-- of time-limited grants.
CREATE OR REPLACE FUNCTION pgphi._audit_key_change() RETURNS trigger
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
            PERFORM pgphi._audit('grant_' || NEW.privilege, NEW.key_id, NULL, 'ok',
                                 format('to %s', NEW.grantee)
                                 || coalesce(' until ' || pgphi._audit_time(NEW.valid_until), ''));
        ELSIF OLD.valid_until IS NOT NULL AND OLD.valid_until <= now() THEN
            PERFORM pgphi._audit('expire_' || OLD.privilege, OLD.key_id, NULL, 'ok',
                                 format('from %s; expired at %s', OLD.grantee, pgphi._audit_time(OLD.valid_until)));
        ELSE
            PERFORM pgphi._audit('revoke_' || OLD.privilege, OLD.key_id, NULL, 'ok', format('from %s', OLD.grantee));
        END IF;
    ELSIF TG_TABLE_NAME = 'keys' AND NEW.cryptoperiod IS DISTINCT FROM OLD.cryptoperiod THEN
        PERFORM pgphi._audit('set_cryptoperiod', NEW.key_id, NULL, 'ok', format('%s', NEW.cryptoperiod));
    END IF;
    RETURN NULL;
END
$$;

-- has_key_privilege (section "privileges") counts only grants in force.
CREATE OR REPLACE FUNCTION pgphi.has_key_privilege(role regrole, key_name text, privilege text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer;
    asker text := pgphi._acting_role();
BEGIN
    IF NOT (pg_has_role(session_user, 'pgphi_key_custodian', 'MEMBER')
            OR pg_has_role(session_user, 'pgphi_key_auditor', 'MEMBER')
            OR (has_key_privilege.role IS NOT NULL
                AND EXISTS (SELECT FROM pg_roles r WHERE r.oid = has_key_privilege.role::oid)
                AND pg_has_role(asker, has_key_privilege.role::oid, 'USAGE'))) THEN
        RAISE EXCEPTION 'only key custodians and auditors can ask about the pgphi key grants of other roles'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Other roles may ask about themselves and the roles whose privileges they have.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    target_id := pgphi._key_id(key_name);
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.',
                  DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = has_key_privilege.privilege
                      AND (g.valid_until IS NULL OR g.valid_until > clock_timestamp())
                      AND pg_has_role(role, g.grantee::oid, 'USAGE'));
END
$$;

-- Evidence for an auditor: who can use which key, through which grant and
-- role chain, granted when and by whom, in force until when, and when each
-- role last used the key (pgphi.key_use_stats). Readable by custodians and
-- auditors.
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
           (g.valid_until IS NULL OR g.valid_until > clock_timestamp()),
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

-- (end of section: key lifecycle)


------------------------------------------------------------------------------
-- Section: grant members.
-- A key grant followed the grantee's memberships: a role that an admin of the
-- group added after the grant got the key without any key custodian (the open
-- limit the review of 0.3.0 left). A grant now covers its grantee and the
-- roles that were its members when it was made, recorded in
-- pgphi.key_grant_members; a role that joins later is refused (42501, audited)
-- until a custodian other than whoever added it approves it
-- (approve_grant_member), and a role acting for another session user (SET
-- ROLE, SECURITY DEFINER) uses a grant only when all its members are covered.
-- Existing grants cover the members they have now. Also: under
-- session_replication_role = replica, when the semantic audit triggers do not
-- fire, the catalog audit records pgphi's own changes.
------------------------------------------------------------------------------

-- Who a grant to a role covers besides that role: the roles that had its
-- privileges when a custodian made the grant (a group's members then), and
-- those a custodian approved since (approve_grant_member). A role that joins
-- the grantee later, by whoever may add members to it, gets nothing from the
-- grant until then: widening a group is not granting a key.
CREATE TABLE pgphi.key_grant_members (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    grantee     regrole NOT NULL,
    member      regrole NOT NULL,
    reason      text NOT NULL CHECK (reason IN ('member when granted', 'approved')),
    approved_by name NOT NULL DEFAULT SESSION_USER,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, privilege, grantee, member)
);

SELECT pg_catalog.pg_extension_config_dump('pgphi.key_grant_members', '');
REVOKE ALL ON pgphi.key_grant_members FROM PUBLIC;
GRANT SELECT ON pgphi.key_grant_members TO pgphi_key_custodian, pgphi_key_auditor;

-- A new grant covers its grantee and the roles that are members of it now
-- (directly or through other roles, inheriting or not: a member that does
-- not inherit can still SET ROLE), as pgphi.key_grant_members records;
-- superusers need no record. Stale records
-- of an earlier grant to the same role go first.
CREATE FUNCTION pgphi._record_grant_members(target_id integer, privilege text, grantee regrole) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgphi.key_grant_members m
     WHERE m.key_id = target_id AND m.privilege = _record_grant_members.privilege
       AND m.grantee::oid = _record_grant_members.grantee::oid;
    INSERT INTO pgphi.key_grant_members (key_id, privilege, grantee, member, reason)
    SELECT target_id, _record_grant_members.privilege, _record_grant_members.grantee, r.oid::regrole,
           'member when granted'
      FROM pg_roles r
     WHERE r.oid <> _record_grant_members.grantee::oid AND NOT r.rolsuper
       AND pg_has_role(r.oid, _record_grant_members.grantee::oid, 'MEMBER');
END
$$;

-- A grant deleted by other means than pgphi's functions (which remove the
-- records themselves) takes the records of whom it covered with it; those
-- deletes are audited as catalog changes, as the grant's is.
CREATE FUNCTION pgphi._forget_grant_members() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgphi.key_grant_members m
     WHERE m.key_id = OLD.key_id AND m.privilege = OLD.privilege AND m.grantee::oid = OLD.grantee::oid;
    RETURN NULL;
END
$$;

CREATE TRIGGER key_grants_forget_members AFTER DELETE ON pgphi.key_grants
    FOR EACH ROW EXECUTE FUNCTION pgphi._forget_grant_members();
ALTER TABLE pgphi.key_grants ENABLE ALWAYS TRIGGER key_grants_forget_members;

-- Grant records change what every session may do: clear their grant checks.
CREATE TRIGGER key_grant_members_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.key_grant_members
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
ALTER TABLE pgphi.key_grant_members ENABLE ALWAYS TRIGGER key_grant_members_changed;

-- The semantic audit records, with grant_member.
CREATE OR REPLACE FUNCTION pgphi._audit_key_change() RETURNS trigger
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
    ELSIF TG_TABLE_NAME = 'keys' AND NEW.cryptoperiod IS DISTINCT FROM OLD.cryptoperiod THEN
        PERFORM pgphi._audit('set_cryptoperiod', NEW.key_id, NULL, 'ok', format('%s', NEW.cryptoperiod));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER key_grant_members_audit AFTER INSERT ON pgphi.key_grant_members
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();

-- The catalog audit: pgphi's own changes under session_replication_role = replica.
CREATE OR REPLACE FUNCTION pgphi._audit_catalog_change() RETURNS trigger
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
    IF writer IS NOT NULL THEN
        GET DIAGNOSTICS stack = PG_CONTEXT;
        -- Under session_replication_role = replica the semantic audit
        -- triggers do not fire: then pgphi's own change is recorded here.
        IF pgphi._writer_ran_statement(writer, stack)
           AND current_setting('session_replication_role') <> 'replica' THEN
            -- pgphi's own change: its function's path writes the semantic
            -- record. One path had none: a renewed destroy approval.
            IF TG_TABLE_NAME = 'destroy_approvals' AND TG_OP = 'UPDATE' THEN
                IF (new_row -> 'approved_at') IS DISTINCT FROM (old_row -> 'approved_at') THEN
                    PERFORM pgphi._audit('approve_destroy', (new_row ->> 'key_id')::integer,
                                         (new_row ->> 'version')::integer, 'ok', 'approval renewed');
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

-- The grants in place cover the roles that are members of their grantees
-- now (each recorded, and audited, as a member when granted).
INSERT INTO pgphi.key_grant_members (key_id, privilege, grantee, member, reason, approved_by)
SELECT g.key_id, g.privilege, g.grantee, r.oid::pg_catalog.regrole, 'member when granted', g.granted_by
  FROM pgphi.key_grants g
  JOIN pg_catalog.pg_roles r
    ON r.oid OPERATOR(pg_catalog.<>) g.grantee::pg_catalog.oid AND NOT r.rolsuper
   AND pg_catalog.pg_has_role(r.oid, g.grantee::pg_catalog.oid, 'MEMBER');

-- Granting records whom a new grant covers.
CREATE OR REPLACE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean,
        valid_until timestamptz)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    existing pgphi.key_grants;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grant_members m
         WHERE m.key_id = target_id AND m.privilege = _change_key_grant.privilege
           AND m.grantee::oid = _change_key_grant.grantee::oid;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;
    IF valid_until IS NOT NULL AND valid_until <= now() THEN
        RAISE EXCEPTION 'a time-limited pgphi key grant must end in the future'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass valid_until => now() + interval ''...''.';
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    SELECT * INTO existing FROM pgphi.key_grants g WHERE g.key_id = target_id
       AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid FOR UPDATE;
    IF FOUND THEN
        -- A grant without expiry covers any time-limited one; a
        -- time-limited one is extended, shortened or made permanent.
        IF existing.valid_until IS NULL OR existing.valid_until IS NOT DISTINCT FROM valid_until THEN
            RETURN false;
        END IF;
        UPDATE pgphi.key_grants g SET valid_until = _change_key_grant.valid_until
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        PERFORM pgphi._audit('grant_' || privilege, target_id, NULL, 'ok',
                             format('to %s %s (was until %s)', grantee,
                                    coalesce('until ' || pgphi._audit_time(valid_until), 'without expiry'),
                                    pgphi._audit_time(existing.valid_until)));
        RETURN true;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee, valid_until)
        VALUES (target_id, privilege, grantee, valid_until)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed > 0 THEN
        PERFORM pgphi._record_grant_members(target_id, privilege, grantee);
    END IF;
    RETURN changed > 0;
END
$$;

CREATE OR REPLACE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grant_members m
         WHERE m.key_id = target_id AND m.privilege = _change_key_grant.privilege
           AND m.grantee::oid = _change_key_grant.grantee::oid;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.key_grants g WHERE g.key_id = target_id AND g.valid_until IS NULL
                  AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid) THEN
        RETURN false;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    -- A time-limited grant becomes one without expiry.
    UPDATE pgphi.key_grants g SET valid_until = NULL
     WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
       AND g.grantee::oid = _change_key_grant.grantee::oid AND g.valid_until IS NOT NULL;
    IF FOUND THEN
        PERFORM pgphi._audit('grant_' || privilege, target_id, NULL, 'ok',
                             format('to %s without expiry (was time-limited)', grantee));
        RETURN true;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee) VALUES (target_id, privilege, grantee)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed > 0 THEN
        PERFORM pgphi._record_grant_members(target_id, privilege, grantee);
    END IF;
    RETURN changed > 0;
END
$$;

-- A key custodian extends a grant to a role that joined the grantee after
-- the grant was made (which the grant does not cover), and to the roles that
-- are members of that role now. Not to a custodian or auditor group. Not by
-- the role itself or a role it belongs to, nor by whoever made any of the
-- memberships that lead from the roles it adds to the grantee (or a role it
-- belongs to, or when that role was dropped since): whoever widened the group
-- does not also hand it the key. Widening a grant to a group (as
-- _group_grant_reason says, or more than ten roles at once) takes a second
-- custodian's approve_grant for the member, as a group-wide grant does.
-- Returns how many roles it added. Audited as grant_member, one row per role.
CREATE FUNCTION pgphi.approve_grant_member(key_name text, privilege text, grantee regrole, member regrole)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    approver name := session_user;
    approver_is_super boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
    adding oid[];
    group_reason text;
    added integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF grantee IS NULL OR member IS NULL THEN
        RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve a member of a pgphi key grant'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    IF NOT EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = approve_grant_member.privilege
                      AND g.grantee::oid = approve_grant_member.grantee::oid) THEN
        RAISE EXCEPTION 'role % holds no % grant on pgphi key "%"', grantee, privilege, key_name
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.access_review() lists the grants.';
    END IF;
    IF member::oid = grantee::oid OR NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = member::oid)
       OR NOT pg_has_role(member::oid, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is not a member of role %', member, grantee
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Approve a role that is a member of the grantee.';
    END IF;
    PERFORM pgphi._check_grantee(member);
    -- The roles it would add: the member and the members it has now.
    adding := ARRAY(SELECT r.oid FROM pg_roles r
                     WHERE NOT r.rolsuper AND r.oid <> approve_grant_member.grantee::oid
                       AND (r.oid = approve_grant_member.member::oid
                            OR pg_has_role(r.oid, approve_grant_member.member::oid, 'MEMBER'))
                       AND NOT EXISTS (SELECT FROM pgphi.key_grant_members m
                                        WHERE m.key_id = target_id AND m.privilege = approve_grant_member.privilege
                                          AND m.grantee::oid = approve_grant_member.grantee::oid
                                          AND m.member::oid = r.oid));
    IF NOT approver_is_super THEN
        IF EXISTS (SELECT FROM unnest(adding) a(oid) WHERE pg_has_role(approver, a.oid, 'MEMBER')) THEN
            RAISE EXCEPTION 'role "%" cannot approve its own use of pgphi key "%"', approver, key_name
                USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must approve it.';
        END IF;
        -- Every membership on the way from a role it adds up to the grantee.
        IF EXISTS (SELECT FROM pg_auth_members am
                    LEFT JOIN pg_roles granted_by ON granted_by.oid = am.grantor
                    WHERE pg_has_role(am.roleid, approve_grant_member.grantee::oid, 'MEMBER')
                      AND (am.member = ANY (adding)
                           OR pg_has_role(approve_grant_member.member::oid, am.member, 'MEMBER'))
                      AND (granted_by.oid IS NULL OR pg_has_role(approver, granted_by.oid, 'MEMBER'))) THEN
            RAISE EXCEPTION 'role "%" made role % a member, and cannot also approve its use of pgphi key "%"',
                            approver, member, key_name
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'It, or a role it belongs to, or a role dropped since, granted a membership that leads to the grant.',
                      HINT = 'Another key custodian must approve it.';
        END IF;
    END IF;
    -- Nor by a role that can add members on the way: CREATEROLE, or ADMIN
    -- OPTION on the grantee, the member or a role between them.
    IF NOT approver_is_super
       AND ((SELECT rolcreaterole FROM pg_roles WHERE rolname = approver)
            OR EXISTS (SELECT FROM pg_roles x
                        WHERE pg_has_role(x.oid, approve_grant_member.grantee::oid, 'MEMBER')
                          AND pg_has_role(approve_grant_member.member::oid, x.oid, 'MEMBER')
                          AND pg_has_role(approver, x.oid, 'MEMBER WITH ADMIN OPTION'))) THEN
        RAISE EXCEPTION 'role "%" can add members to role %, and cannot also approve members of its pgphi key grant',
                        approver, grantee
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'It has CREATEROLE, or ADMIN OPTION on a role between the member and the grantee.',
                  HINT = 'A key custodian who does not administer the group must approve it.';
    END IF;
    group_reason := pgphi._group_grant_reason(member);
    IF group_reason IS NULL AND cardinality(adding) > 10 THEN
        group_reason := format('%s brings %s roles (more than 10)', member, cardinality(adding));
    END IF;
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = approve_grant_member.privilege
            AND a.grantee::oid = approve_grant_member.member::oid
            AND a.approved_by <> approver AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'extending the grant of pgphi key "%" to % needs the approval of a second key custodian',
                            key_name, member
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('It reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then approve the member again within a day.',
                                    key_name, member::text, privilege);
        END IF;
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = approve_grant_member.privilege
           AND a.grantee::oid = approve_grant_member.member::oid;
    END IF;
    INSERT INTO pgphi.key_grant_members (key_id, privilege, grantee, member, reason, approved_by)
    SELECT target_id, approve_grant_member.privilege, approve_grant_member.grantee, a.oid::regrole, 'approved',
           approver
      FROM unnest(adding) a(oid)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added;
END
$$;

-- Records of roles that are no longer members of the grantee: a role that
-- left a group (REVOKE, DROP ROLE) and is added again later is a later member
-- again. Run by the REVOKE and DROP ROLE that pgphi's utility hook sees in this
-- database, and by expire_key_grants() (scheduled), for changes made while
-- connected to another database. Returns how many it removed; each is audited
-- as forget_member.
CREATE FUNCTION pgphi._prune_grant_members() RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gone record;
    removed integer := 0;
BEGIN
    FOR gone IN
        DELETE FROM pgphi.key_grant_members m
         WHERE NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = m.member::oid)
            OR NOT pg_has_role(m.member::oid, m.grantee::oid, 'MEMBER')
        RETURNING m.key_id, m.privilege, m.grantee::oid AS grantee, m.member::oid AS member
    LOOP
        PERFORM pgphi._audit('forget_member', gone.key_id, NULL, 'ok',
                             format('%s grant to %s no longer covers %s: no longer a member',
                                    gone.privilege, coalesce(gone.grantee::regrole::text, gone.grantee::text),
                                    coalesce((SELECT rolname::text FROM pg_roles WHERE oid = gone.member),
                                             gone.member::text)));
        removed := removed + 1;
    END LOOP;
    RETURN removed;
END
$$;

-- Expiring grants removes whom they covered, and the records of roles that left.
CREATE OR REPLACE FUNCTION pgphi.expire_key_grants() RETURNS integer
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

-- Only the roles a grant covers hold the key.
CREATE OR REPLACE FUNCTION pgphi.has_key_privilege(role regrole, key_name text, privilege text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer;
    asker text := pgphi._acting_role();
BEGIN
    IF NOT (pg_has_role(session_user, 'pgphi_key_custodian', 'MEMBER')
            OR pg_has_role(session_user, 'pgphi_key_auditor', 'MEMBER')
            OR (has_key_privilege.role IS NOT NULL
                AND EXISTS (SELECT FROM pg_roles r WHERE r.oid = has_key_privilege.role::oid)
                AND pg_has_role(asker, has_key_privilege.role::oid, 'USAGE'))) THEN
        RAISE EXCEPTION 'only key custodians and auditors can ask about the pgphi key grants of other roles'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Other roles may ask about themselves and the roles whose privileges they have.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    target_id := pgphi._key_id(key_name);
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.',
                  DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = has_key_privilege.privilege
                      AND (g.valid_until IS NULL OR g.valid_until > clock_timestamp())
                      AND pg_has_role(role, g.grantee::oid, 'USAGE')
                      AND (g.grantee::oid = role::oid
                           OR EXISTS (SELECT FROM pgphi.key_grant_members m
                                       WHERE m.key_id = g.key_id AND m.privilege = g.privilege
                                         AND m.grantee::oid = g.grantee::oid AND m.member::oid = role::oid)));
END
$$;

CREATE OR REPLACE FUNCTION pgphi.access_review(
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

REVOKE ALL ON FUNCTION pgphi._record_grant_members(integer, text, regrole), pgphi._forget_grant_members(),
    pgphi.approve_grant_member(text, text, regrole, regrole), pgphi._prune_grant_members() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.approve_grant_member(text, text, regrole, regrole) TO pgphi_key_custodian;

-- (end of section: grant members)


------------------------------------------------------------------------------
-- Section: limits and break-glass.
-- Decrypt limits per role and key, break-glass roles and events, and the
-- volume alert the audit writer runs (src/sql/82_limits_and_break_glass.sql;
-- docs/key-lifecycle.md). All new objects.
------------------------------------------------------------------------------

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
-- (A new installation takes every routine from PUBLIC in its privileges file.)
REVOKE ALL ON FUNCTION pgphi.set_decrypt_limit(text, regrole, bigint, interval),
    pgphi.set_break_glass_role(text, regrole, interval), pgphi.break_glass(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.set_decrypt_limit(text, regrole, bigint, interval),
    pgphi.set_break_glass_role(text, regrole, interval) TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION pgphi.break_glass(text, text) TO pgphi_decrypt;

-- (end of section: limits and break-glass)


------------------------------------------------------------------------------
-- Section: rekey.
-- pgphi.rekey(key, provider, kek) moves every DEK version of a key to a KEK of
-- another provider (or another KEK of the same one), after a second key
-- custodian's pgphi.approve_rekey: one transaction per version, resumable, the
-- plaintext DEK passing only between the key brokers. key_versions records
-- the provider and KEK that still wrap a version while a rekey moves it;
-- key_inventory shows them, and rewrap_keys leaves such versions to the rekey.
------------------------------------------------------------------------------

ALTER TABLE pgphi.key_versions ADD COLUMN rekey_source_provider text, ADD COLUMN rekey_source_kek text,
    ADD CONSTRAINT key_versions_rekey_source CHECK ((rekey_source_provider IS NULL) = (rekey_source_kek IS NULL));

-- A second custodian's approval of moving a key to another provider or KEK
-- (pgphi.approve_rekey): whoever holds a KEK can unwrap the key's DEKs, so
-- one custodian alone cannot hand them to a KEK of their choosing.
CREATE TABLE pgphi.rekey_approvals (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    provider    text NOT NULL,
    kek_ref     text NOT NULL,
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, provider, kek_ref, approved_by)
);

REVOKE ALL ON pgphi.rekey_approvals FROM PUBLIC;
GRANT SELECT ON pgphi.rekey_approvals TO pgphi_key_custodian, pgphi_key_auditor;

-- The semantic audit records, with approve_rekey and rekey.
CREATE OR REPLACE FUNCTION pgphi._audit_key_change() RETURNS trigger
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
    ELSIF TG_TABLE_NAME = 'keys' AND NEW.cryptoperiod IS DISTINCT FROM OLD.cryptoperiod THEN
        PERFORM pgphi._audit('set_cryptoperiod', NEW.key_id, NULL, 'ok', format('%s', NEW.cryptoperiod));
    END IF;
    RETURN NULL;
END
$$;

-- The catalog audit, with renewed rekey approvals.
CREATE OR REPLACE FUNCTION pgphi._audit_catalog_change() RETURNS trigger
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
    IF writer IS NOT NULL THEN
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

CREATE TRIGGER rekey_approvals_audit AFTER INSERT ON pgphi.rekey_approvals
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_key_change();

-- Every key version, with what an auditor asks about it. Never the DEK.
CREATE OR REPLACE VIEW pgphi.key_inventory AS
    SELECT k.name AS key_name, k.key_id, k.purpose, k.created_by AS owner,
           -- What wraps this version's DEK (mid-rekey: the KEK it is leaving).
           coalesce(v.rekey_source_provider, k.provider) AS provider,
           coalesce(v.rekey_source_kek, k.kek_ref) AS kek_ref,
           v.version, v.state, v.kek_version, v.created_at, k.rotated_at, v.retired_at, v.destroyed_at,
           k.cryptoperiod,
           CASE WHEN v.state = 'active' THEN v.created_at + k.cryptoperiod END AS rotate_by,
           coalesce(v.state = 'active' AND v.created_at + k.cryptoperiod < pg_catalog.now(), false)
               AS rotation_overdue,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'encrypt' ORDER BY 1) AS encrypt_grantees,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'decrypt' ORDER BY 1) AS decrypt_grantees,
           (k.suspended_at IS NOT NULL OR v.suspended_at IS NOT NULL) AS suspended,
           coalesce(v.suspended_at, k.suspended_at) AS suspended_at,
           coalesce(v.suspended_by, k.suspended_by) AS suspended_by,
           v.compromised_at IS NOT NULL AS compromised,
           v.compromised_at, v.compromised_by,
           -- A rekey still has to move this version to the key's provider.
           (v.rekey_source_provider IS NOT NULL AND v.wrapped_dek IS NOT NULL) AS rekey_pending
      FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id);

-- Rewrapping leaves the versions a rekey is moving to the rekey.
CREATE OR REPLACE FUNCTION pgphi.rewrap_keys(name text DEFAULT NULL) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    rewrapped record;
    done integer := 0;
BEGIN
    FOR v IN SELECT k.key_id, k.name, k.provider, k.kek_ref, kv.version, kv.wrapped_dek
               FROM pgphi.keys k JOIN pgphi.key_versions kv USING (key_id)
              WHERE kv.wrapped_dek IS NOT NULL AND (rewrap_keys.name IS NULL OR k.name = rewrap_keys.name)
                -- (a version that a rekey is moving goes to the key's new KEK instead)
                AND kv.rekey_source_provider IS NULL
              ORDER BY k.key_id, kv.version
                FOR UPDATE OF kv
    LOOP
        SELECT * INTO rewrapped FROM pgphi._rewrap_dek(v.provider, v.kek_ref, v.key_id, v.version, v.name,
                                                        v.wrapped_dek);
        UPDATE pgphi.key_versions kv SET wrapped_dek = rewrapped.wrapped_dek, kek_version = rewrapped.kek_version
         WHERE kv.key_id = v.key_id AND kv.version = v.version;
        done := done + 1;
    END LOOP;
    IF rewrap_keys.name IS NOT NULL AND done = 0 AND pgphi._key_id(rewrap_keys.name) IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN done;
END
$$;

-- The key broker of the source provider unwraps the DEK and hands it, in
-- shared memory, to the broker of the destination, which wraps it (KMS to KMS:
-- ReEncrypt, inside KMS). The DEK itself never changes, so no table data is
-- touched, and its plaintext never reaches this backend or SQL.
CREATE FUNCTION pgphi._rekey_dek(provider text, kek text, key_id integer, version integer, key_name text,
        wrapped bytea, to_provider text, to_kek text, OUT wrapped_dek bytea, OUT kek_version text)
    AS 'MODULE_PATHNAME', 'pgphi_rekey_dek' LANGUAGE C VOLATILE STRICT;

-- The destination's KEK reference as the catalog stores it; refuses an
-- unknown provider, a missing KEK, and a reference no key manager takes (too
-- long for the key broker, or with control characters, which would forge
-- lines in the audit trail and the server log). The KEK is not repeated: a
-- misplaced argument could be PHI.
CREATE FUNCTION pgphi._rekey_target(provider text, kek text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF provider IS NULL OR provider NOT IN ('local', 'vault', 'aws_kms', 'kmip', 'pkcs11') THEN
        RAISE EXCEPTION 'unknown pgphi key provider' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Available providers: local, vault, aws_kms, kmip, pkcs11.';
    END IF;
    IF kek IS NULL AND provider <> 'local' THEN
        RAISE EXCEPTION 'provider % needs the KEK to use', provider USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass kek => the Vault Transit key name, the AWS KMS key id, ARN or alias, the KMIP key''s Name or Unique Identifier, or the PKCS#11 key as label:NAME or id:HEX.';
    END IF;
    IF octet_length(kek) > 255 OR kek = '' OR kek ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid KEK reference for provider %', provider USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'A KEK reference has 1 to 255 bytes and no control characters; pgphi does not repeat it.';
    END IF;
    RETURN coalesce(kek, 'default');
END
$$;

-- Why `approver` cannot be the second custodian of `requester`, or NULL. Dual
-- control needs two people: no one role may be able to act as both, or to
-- make a role of its choosing a custodian for the occasion. A role controls a
-- party when it can act as it (membership), holds ADMIN OPTION on the party or
-- on a role on its way to pgphi_key_custodian, granted (or can act as the
-- grantor of) a membership on that way, or, before PostgreSQL 16, has
-- CREATEROLE (which could then take over any role). Superusers are above dual
-- control, and are not counted.
CREATE FUNCTION pgphi._approval_dependence(requester name, approver name) RETURNS text
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    WITH party AS (
        SELECT r.oid AS party FROM pg_roles r WHERE r.rolname IN (requester, approver)
    ),
    -- Each party, and the roles on its way to pgphi_key_custodian.
    step AS (
        SELECT p.party, x.oid AS step FROM party p JOIN pg_roles x
            ON x.oid = p.party OR (pg_has_role(p.party, x.oid, 'MEMBER')
                                   AND pg_has_role(x.oid, 'pgphi_key_custodian', 'MEMBER'))
    ),
    -- The memberships on those ways.
    edge AS (
        SELECT s.party, am.grantor FROM step s
          JOIN pg_auth_members am ON am.member = s.step
         WHERE pg_has_role(am.roleid, 'pgphi_key_custodian', 'MEMBER')
    ),
    control AS (
        SELECT p.party, c.oid AS controller FROM party p JOIN pg_roles c ON pg_has_role(c.oid, p.party, 'MEMBER')
        UNION
        SELECT s.party, c.oid FROM step s JOIN pg_roles c ON pg_has_role(c.oid, s.step, 'MEMBER WITH ADMIN OPTION')
        UNION
        SELECT e.party, c.oid FROM edge e JOIN pg_roles g ON g.oid = e.grantor
          JOIN pg_roles c ON pg_has_role(c.oid, g.oid, 'MEMBER')
        UNION
        SELECT p.party, c.oid FROM party p, pg_roles c
         WHERE c.rolcreaterole AND current_setting('server_version_num')::integer < 160000
    )
    SELECT CASE
        WHEN requester = approver THEN 'it is the same role'
        WHEN EXISTS (SELECT FROM edge e WHERE NOT EXISTS (SELECT FROM pg_roles g WHERE g.oid = e.grantor))
            THEN 'a membership on the way to pgphi_key_custodian was granted by a role dropped since'
        ELSE (SELECT format('role %s can act for both, or make either a key custodian', c.rolname)
                FROM control a JOIN control b ON b.controller = a.controller AND b.party <> a.party
                JOIN pg_roles c ON c.oid = a.controller
               WHERE NOT c.rolsuper
               ORDER BY c.rolname LIMIT 1)
    END
$$;

-- A second key custodian approves moving a key to this provider and KEK
-- (valid for a day, used up by the rekey it allows). A procedure, called by
-- the approver itself: a view, a trigger or a function somebody else wrote
-- cannot approve in the approver's session (CALL is refused outside a
-- statement of its own).
CREATE PROCEDURE pgphi.approve_rekey(name text, provider text, kek text DEFAULT NULL)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(approve_rekey.name);
    target_kek text := pgphi._rekey_target(approve_rekey.provider, approve_rekey.kek);
    stack text;
BEGIN
    GET DIAGNOSTICS stack = PG_CONTEXT;
    IF pg_trigger_depth() > 0 OR strpos(stack, E'\n') > 0 THEN
        RAISE EXCEPTION 'pgphi.approve_rekey must be called by the approving custodian itself'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'It was called from a trigger or another routine, which could act for somebody else.',
                  HINT = 'Run CALL pgphi.approve_rekey(...) as a statement of its own.';
    END IF;
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF NOT pg_catalog.pg_has_role(session_user, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve moving a key to another KEK'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    INSERT INTO pgphi.rekey_approvals (key_id, provider, kek_ref, approved_by)
        VALUES (target_id, approve_rekey.provider, target_kek, session_user)
        ON CONFLICT ON CONSTRAINT rekey_approvals_pkey DO UPDATE SET approved_at = pg_catalog.now();
END
$$;

-- The first step of pgphi.rekey: new DEK versions of the key go to the
-- destination from now on, every existing version records the provider and
-- KEK that still wrap it until it is moved, and the first version moves in
-- the same transaction, so a destination that does not work changes nothing
-- (and leaves the approval unused). Called again for the same destination (a
-- rekey that stopped), or back to a provider and KEK that still wrap pending
-- versions, it needs no new approval. Returns the key's id.
CREATE FUNCTION pgphi._rekey_start(key_name text, provider text, kek text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
    target_kek text := pgphi._rekey_target(_rekey_start.provider, _rekey_start.kek);
    approvers name[];
BEGIN
    SELECT * INTO key FROM pgphi.keys k WHERE k.name = _rekey_start.key_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF key.provider = _rekey_start.provider AND key.kek_ref = target_kek THEN
        RETURN key.key_id;
    END IF;
    IF NOT EXISTS (SELECT FROM pgphi.key_versions v
                    WHERE v.key_id = key.key_id AND v.wrapped_dek IS NOT NULL
                      AND v.rekey_source_provider = _rekey_start.provider AND v.rekey_source_kek = target_kek) THEN
        SELECT array_agg(a.approved_by ORDER BY a.approved_by) INTO approvers
          FROM pgphi.rekey_approvals a
         WHERE a.key_id = key.key_id AND a.provider = _rekey_start.provider AND a.kek_ref = target_kek
           AND a.approved_at > pg_catalog.now() - interval '1 day'
           AND pg_catalog.pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER')
           AND pgphi._approval_dependence(session_user, a.approved_by) IS NULL;
        IF approvers IS NULL THEN
            RAISE EXCEPTION 'moving pgphi key "%" to provider % needs the approval of a second key custodian',
                key.name, _rekey_start.provider
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Whoever holds a KEK can unwrap the DEKs it wraps. Approvals by the caller, or by roles it controls (CREATEROLE, ADMIN OPTION, memberships it granted), do not count.',
                      HINT = pg_catalog.format('Another member of pgphi_key_custodian runs CALL pgphi.approve_rekey(%L, %L, <the KEK>);',
                                               key.name, _rekey_start.provider);
        END IF;
    END IF;
    -- Versions that a rekey left under the new destination are home already.
    UPDATE pgphi.key_versions v SET rekey_source_provider = NULL, rekey_source_kek = NULL
     WHERE v.key_id = key.key_id AND v.rekey_source_provider = _rekey_start.provider
       AND v.rekey_source_kek = target_kek;
    UPDATE pgphi.key_versions v SET rekey_source_provider = key.provider, rekey_source_kek = key.kek_ref
     WHERE v.key_id = key.key_id AND v.wrapped_dek IS NOT NULL AND v.rekey_source_provider IS NULL;
    UPDATE pgphi.keys k SET provider = _rekey_start.provider, kek_ref = target_kek
     WHERE k.key_id = key.key_id;
    DELETE FROM pgphi.rekey_approvals a WHERE a.key_id = key.key_id;
    -- The destination works, or nothing here commits.
    PERFORM pgphi._rekey_next(key.key_id);
    RETURN key.key_id;
END
$$;

-- Moves the lowest version still under its old KEK (NOTICE: which); false,
-- with a NOTICE that the rekey is complete, when none is left.
CREATE FUNCTION pgphi._rekey_next(key_id integer) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;
    moved record;
BEGIN
    -- The key's row too: its destination cannot change under this move.
    SELECT k.name, k.provider, k.kek_ref, kv.version, kv.wrapped_dek, kv.rekey_source_provider,
           kv.rekey_source_kek INTO v
      FROM pgphi.keys k JOIN pgphi.key_versions kv USING (key_id)
     WHERE k.key_id = _rekey_next.key_id AND kv.rekey_source_provider IS NOT NULL AND kv.wrapped_dek IS NOT NULL
     ORDER BY kv.version LIMIT 1
       FOR UPDATE OF k, kv;
    IF NOT FOUND THEN
        SELECT k.name, k.provider, k.kek_ref INTO v FROM pgphi.keys k WHERE k.key_id = _rekey_next.key_id;
        RAISE NOTICE 'pgphi key "%": every DEK version is under provider %, KEK %', v.name, v.provider, v.kek_ref;
        RETURN false;
    END IF;
    SELECT * INTO moved FROM pgphi._rekey_dek(v.rekey_source_provider, v.rekey_source_kek, _rekey_next.key_id,
                                               v.version, v.name, v.wrapped_dek, v.provider, v.kek_ref);
    UPDATE pgphi.key_versions kv
       SET wrapped_dek = moved.wrapped_dek, kek_version = moved.kek_version,
           rekey_source_provider = NULL, rekey_source_kek = NULL
     WHERE kv.key_id = _rekey_next.key_id AND kv.version = v.version;
    RAISE NOTICE 'pgphi key "%" version % moved from provider % to provider %', v.name, v.version,
        v.rekey_source_provider, v.provider;
    RETURN true;
END
$$;

-- CALL pgphi.rekey(key, provider, kek): rewraps every DEK version of the key
-- under a KEK of another provider (or another KEK of the same one), after a
-- second custodian's pgphi.approve_rekey. One transaction per version, so a
-- rekey that stops (key manager unreachable, cancel) keeps what it moved:
-- every version stays decryptable meanwhile, and calling it again finishes
-- the job. No SET clause (a procedure with one cannot commit), so the body
-- only calls qualified functions and loops.
CREATE PROCEDURE pgphi.rekey(key_name text, provider text, kek text DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    target pg_catalog.int4;
    more pg_catalog.bool;
BEGIN
    target := pgphi._rekey_start(key_name, provider, kek);
    COMMIT;
    LOOP
        more := pgphi._rekey_next(target);
        COMMIT;
        EXIT WHEN more IS NOT TRUE;
    END LOOP;
END
$$;


REVOKE ALL ON FUNCTION pgphi._rekey_dek(text, text, integer, integer, text, bytea, text, text),
    pgphi._rekey_target(text, text), pgphi._approval_dependence(name, name), pgphi._rekey_start(text, text, text),
    pgphi._rekey_next(integer) FROM PUBLIC;
REVOKE ALL ON PROCEDURE pgphi.approve_rekey(text, text, text), pgphi.rekey(text, text, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION pgphi._rekey_start(text, text, text), pgphi._rekey_next(integer) TO pgphi_key_custodian;
GRANT EXECUTE ON PROCEDURE pgphi.approve_rekey(text, text, text), pgphi.rekey(text, text, text) TO pgphi_key_custodian;

-- (end of section: rekey)


------------------------------------------------------------------------------
-- Citus: pgphi in a Citus cluster (docs/citus.md).
------------------------------------------------------------------------------

-- What Citus makes of a table, read from its catalog only where it exists
-- (pgphi does not depend on Citus); NULL for any other table.
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

-- (begin: the batch procedures on Citus tables, shard by shard)
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

-- Starts, or resumes, the batches of a (relation, column) towards a key
-- version; a run towards another key or version starts over. A run belongs
-- to the role that started it (started_by): another role's unfinished run
-- is not taken over.
CREATE OR REPLACE FUNCTION pgphi._progress_begin(tbl regclass, col name, key_id integer, version integer,
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

-- Checks the arguments and starts (or resumes) the run; returns the key the
-- values move to, or NULL when the column holds no encrypted values.
CREATE OR REPLACE FUNCTION pgphi._reencrypt_start(tbl regclass, col name, batch_size integer, context_column name,
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

CREATE OR REPLACE FUNCTION pgphi._reencrypt_pages(tbl regclass, col name, batch_size integer, context_column name,
        key_name text) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pgphi._citus_table_kind(tbl) IS NULL
                THEN pgphi._progress_pages(tbl, col, s.update_head, s.stale, key_name, batch_size)
                ELSE pgphi._citus_progress_shard('reencrypt', tbl, col, key_name, batch_size, context_column, NULL)
           END
      FROM pgphi._reencrypt_sql(tbl, col, context_column) s
$$;

CREATE OR REPLACE FUNCTION pgphi._reencrypt_sweep(tbl regclass, col name, batch_size integer, context_column name,
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

-- Checks the arguments and starts (or resumes) the run; returns the key of
-- the encrypted source column (NULL for a text source, or no values).
CREATE OR REPLACE FUNCTION pgphi._rebuild_blind_index_start(tbl regclass, index_column name, source_column name,
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

CREATE OR REPLACE FUNCTION pgphi._rebuild_blind_index_pages(tbl regclass, index_column name, source_column name,
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

CREATE OR REPLACE FUNCTION pgphi._rebuild_blind_index_sweep(tbl regclass, index_column name, source_column name,
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

-- Checks the arguments, and makes the shadow column and the trigger (kept if
-- a previous call made them, which must then have used the same key and
-- context). Returns the table's size in pages, the extent of the batches.
CREATE OR REPLACE FUNCTION pgphi._protect_column_start(tbl regclass, col name, key_name text, batch_size integer,
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
CREATE OR REPLACE FUNCTION pgphi._protect_column_fill(tbl regclass, col name, key_name text, batch_size integer,
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
CREATE OR REPLACE FUNCTION pgphi._protect_column_sweep(tbl regclass, col name, key_name text, batch_size integer,
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
CREATE OR REPLACE FUNCTION pgphi._protect_column_swap(tbl regclass, col name, key_name text, context_column name)
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

REVOKE ALL ON FUNCTION pgphi._citus_table_kind(regclass), pgphi._citus_placements(regclass), pgphi._batch_extent(regclass, integer),
    pgphi._citus_remote(text, integer, text, text, text, name, text, integer, name, name),
    pgphi._citus_run_shard(text, regclass, name, text, integer, name, name, bigint),
    pgphi._citus_progress_shard(text, regclass, name, text, integer, name, name),
    pgphi._citus_sweep(text, regclass, name, text, integer, name, name, text, integer, integer),
    pgphi._citus_distribution_column(regclass), pgphi._citus_is_shard(regclass),
    pgphi._citus_shard_changed(text, name),
    pgphi._citus_shard_step(text, text, name, text, integer, name, name, text) FROM PUBLIC;
REVOKE ALL ON PROCEDURE pgphi._citus_shard_batches(text, text, name, text, integer, name, name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi._citus_table_kind(regclass), pgphi._citus_placements(regclass), pgphi._batch_extent(regclass, integer),
    pgphi._citus_remote(text, integer, text, text, text, name, text, integer, name, name),
    pgphi._citus_run_shard(text, regclass, name, text, integer, name, name, bigint),
    pgphi._citus_progress_shard(text, regclass, name, text, integer, name, name),
    pgphi._citus_sweep(text, regclass, name, text, integer, name, name, text, integer, integer),
    pgphi._citus_distribution_column(regclass), pgphi._citus_is_shard(regclass),
    pgphi._citus_shard_changed(text, name),
    pgphi._citus_shard_step(text, text, name, text, integer, name, name, text)
    TO pgphi_key_custodian, pgphi_encrypt;
GRANT EXECUTE ON PROCEDURE pgphi._citus_shard_batches(text, text, name, text, integer, name, name)
    TO pgphi_key_custodian, pgphi_encrypt;
-- (end: the batch procedures on Citus tables)

-- key_version_usage counts a Citus table through Citus (every shard), and
-- skips the shards themselves.
CREATE OR REPLACE FUNCTION pgphi.key_version_usage(name text, version integer, lock_wait interval DEFAULT interval '2s')
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

-- The DDL guard lets CREATE EXTENSION pgphi make its schema in a database
-- that already has event triggers (Citus's).
CREATE OR REPLACE FUNCTION pgphi._guard_catalog_ddl() RETURNS event_trigger
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

-- The catalog audit says which changes a worker copied from the coordinator.
CREATE OR REPLACE FUNCTION pgphi._audit_catalog_change() RETURNS trigger
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

-- One key catalog on every node of a Citus cluster (src/sql/87_citus.sql).
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

-- (end of section: Citus)


------------------------------------------------------------------------------
-- Section: destruction certificates.
-- pgphi.destruction_certificate(key, version): the signed evidence of a
-- destroyed key version, from its audit records (docs/key-lifecycle.md), and
-- pgphi.verify_destruction_certificate(certificate). The destroy record now
-- keeps the approvals that counted and a last scan for values under the
-- version, which the certificate cites.
------------------------------------------------------------------------------

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

-- The semantic audit records: destroy with its check.
CREATE OR REPLACE FUNCTION pgphi._audit_key_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_TABLE_NAME = 'key_versions' THEN
        IF TG_OP = 'INSERT' THEN
            PERFORM pgphi._audit(CASE WHEN NEW.version = 1 THEN 'create' ELSE 'rotate' END,
                                 NEW.key_id, NEW.version, 'ok',
                                 (SELECT format('provider %s, KEK %s', k.provider, k.kek_ref)
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
    ELSIF TG_TABLE_NAME = 'keys' AND NEW.cryptoperiod IS DISTINCT FROM OLD.cryptoperiod THEN
        PERFORM pgphi._audit('set_cryptoperiod', NEW.key_id, NULL, 'ok', format('%s', NEW.cryptoperiod));
    END IF;
    RETURN NULL;
END
$$;

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

-- (end of section: destruction certificates)


------------------------------------------------------------------------------
-- Section: dedicated KEKs.
-- create_key(..., dedicated_kek => true) makes a KEK in the key manager for
-- that key alone; destroy_key of its last version deletes the KEK there (KMS:
-- schedules its deletion), so that backups and WAL archives of the wrapped
-- DEKs can never be unwrapped. rotate_key refuses a key whose KEK is gone,
-- rekey a key with a KEK of its own; the deletion is audited (delete_kek).
-- deactivate_key leaves a key without an active version, so that its last
-- version can be retired and destroyed.
------------------------------------------------------------------------------

ALTER TABLE pgphi.keys ADD COLUMN kek_dedicated boolean NOT NULL DEFAULT false,
    ADD COLUMN kek_deleted_at timestamptz, ADD COLUMN kek_deletion text;

DROP FUNCTION pgphi.create_key(text, text, text);
CREATE FUNCTION pgphi.create_key(name text, provider text DEFAULT 'local', kek text DEFAULT NULL,
        dedicated_kek boolean DEFAULT false)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_key_id integer;
    kek_ref text := coalesce(create_key.kek, CASE WHEN create_key.provider = 'local' THEN 'default' END);
    dek record;
BEGIN
    IF create_key.name IS NULL OR create_key.name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid pgphi key name'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.',
                  HINT = 'Key names have 1 to 63 letters, digits, "_", "." or "-", and start with a letter or "_".';
    END IF;
    IF create_key.provider IS NULL THEN
        RAISE EXCEPTION 'a pgphi key needs a provider' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_key.dedicated_kek THEN
        IF create_key.provider NOT IN ('vault', 'aws_kms', 'kmip', 'pkcs11') THEN
            RAISE EXCEPTION '%', CASE WHEN create_key.provider = 'local' THEN 'the local provider cannot make a KEK for one key' ELSE 'unknown pgphi key provider' END
                USING ERRCODE = CASE WHEN create_key.provider = 'local' THEN 'feature_not_supported' ELSE 'invalid_parameter_value' END,
                      HINT = 'Dedicated KEKs live in Vault, AWS KMS, a KMIP server or a PKCS#11 token; the local provider has one KEK file.';
        END IF;
        -- pgphi names it: a name of the caller's choosing could be one that
        -- another system creates (or resolves) later, which the deletion of
        -- this key would then take with it.
        IF create_key.kek IS NOT NULL THEN
            RAISE EXCEPTION 'pgphi names a dedicated KEK itself' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Omit kek with dedicated_kek => true: the new KEK is named pgphi-dedicated-<key>-<random> (KMS: its ARN).';
        END IF;
        kek_ref := CASE WHEN create_key.provider = 'aws_kms' THEN ''
            ELSE CASE WHEN create_key.provider = 'pkcs11' THEN 'label:' ELSE '' END
                 || 'pgphi-dedicated-' || create_key.name || '-'
                 || left(pg_catalog.md5(pg_catalog.gen_random_uuid()::text), 12) END;
    END IF;
    IF kek_ref IS NULL THEN
        RAISE EXCEPTION '%', CASE WHEN create_key.provider IN ('vault', 'aws_kms', 'kmip', 'pkcs11') THEN format('provider %s needs the KEK to use', create_key.provider) ELSE 'unknown pgphi key provider' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass kek => the Vault Transit key name, the AWS KMS key id, ARN or alias, the KMIP key''s Name or Unique Identifier, or the PKCS#11 key as label:NAME or id:HEX; or dedicated_kek => true.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.keys k WHERE k.name = create_key.name) THEN
        RAISE EXCEPTION 'pgphi key "%" already exists', create_key.name USING ERRCODE = 'duplicate_object';
    END IF;
    IF create_key.dedicated_kek THEN
        -- Made by the provider's key broker before the key exists; when a
        -- later step fails, the new KEK stays unused in the key manager.
        kek_ref := pgphi._create_dedicated_kek(create_key.provider, kek_ref, create_key.name);
    END IF;

    INSERT INTO pgphi.keys (name, provider, kek_ref, kek_dedicated)
        VALUES (create_key.name, create_key.provider, kek_ref, create_key.dedicated_kek)
        RETURNING key_id INTO new_key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(
        create_key.provider, kek_ref, new_key_id, 1, create_key.name,
        NOT EXISTS (SELECT FROM pgphi.keys k WHERE k.provider = 'local' AND k.key_id <> new_key_id));
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (new_key_id, 1, 'active', dek.wrapped_dek, dek.kek_version);
    RETURN new_key_id;
END
$$;

CREATE FUNCTION pgphi._create_dedicated_kek(provider text, kek_name text, key_name text) RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_create_dedicated_kek' LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION pgphi._delete_dedicated_kek(provider text, kek_ref text, key_id integer, key_name text)
    RETURNS text
    AS 'MODULE_PATHNAME', 'pgphi_delete_dedicated_kek' LANGUAGE C VOLATILE STRICT;

CREATE OR REPLACE FUNCTION pgphi.rotate_key(name text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
    new_version integer;
    dek record;
BEGIN
    SELECT * INTO key FROM pgphi.keys k WHERE k.name = rotate_key.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF key.kek_deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'the dedicated KEK of pgphi key "%" has been deleted', key.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = pg_catalog.format('Every version of the key was destroyed, and then: %s.', key.kek_deletion),
                  HINT = 'Create a new key for new values.';
    END IF;
    SELECT max(v.version) + 1 INTO new_version FROM pgphi.key_versions v WHERE v.key_id = key.key_id;
    SELECT * INTO dek FROM pgphi._generate_wrapped_dek(key.provider, key.kek_ref, key.key_id, new_version,
                                                        key.name, false);
    UPDATE pgphi.key_versions v SET state = 'decrypt_only' WHERE v.key_id = key.key_id AND v.state = 'active';
    INSERT INTO pgphi.key_versions (key_id, version, state, wrapped_dek, kek_version)
        VALUES (key.key_id, new_version, 'active', dek.wrapped_dek, dek.kek_version);
    UPDATE pgphi.keys k SET rotated_at = pg_catalog.now() WHERE k.key_id = key.key_id;
    RETURN new_version;
END
$$;

CREATE OR REPLACE FUNCTION pgphi._rekey_start(key_name text, provider text, kek text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key record;
    target_kek text := pgphi._rekey_target(_rekey_start.provider, _rekey_start.kek);
    approvers name[];
BEGIN
    SELECT * INTO key FROM pgphi.keys k WHERE k.name = _rekey_start.key_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgphi key does not exist' USING ERRCODE = 'undefined_object',
            DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    IF key.provider = _rekey_start.provider AND key.kek_ref = target_kek THEN
        RETURN key.key_id;
    END IF;
    IF key.kek_dedicated THEN
        -- Its KEK is deleted with its last version: under another KEK, that
        -- deletion would no longer reach the DEKs.
        RAISE EXCEPTION 'pgphi key "%" has a KEK of its own, which does not move', key.name
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create a key under the new KEK and move the values with CALL pgphi.reencrypt().';
    END IF;
    IF NOT EXISTS (SELECT FROM pgphi.key_versions v
                    WHERE v.key_id = key.key_id AND v.wrapped_dek IS NOT NULL
                      AND v.rekey_source_provider = _rekey_start.provider AND v.rekey_source_kek = target_kek) THEN
        SELECT array_agg(a.approved_by ORDER BY a.approved_by) INTO approvers
          FROM pgphi.rekey_approvals a
         WHERE a.key_id = key.key_id AND a.provider = _rekey_start.provider AND a.kek_ref = target_kek
           AND a.approved_at > pg_catalog.now() - interval '1 day'
           AND pg_catalog.pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER')
           AND pgphi._approval_dependence(session_user, a.approved_by) IS NULL;
        IF approvers IS NULL THEN
            RAISE EXCEPTION 'moving pgphi key "%" to provider % needs the approval of a second key custodian',
                key.name, _rekey_start.provider
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Whoever holds a KEK can unwrap the DEKs it wraps. Approvals by the caller, or by roles it controls (CREATEROLE, ADMIN OPTION, memberships it granted), do not count.',
                      HINT = pg_catalog.format('Another member of pgphi_key_custodian runs CALL pgphi.approve_rekey(%L, %L, <the KEK>);',
                                               key.name, _rekey_start.provider);
        END IF;
    END IF;
    -- Versions that a rekey left under the new destination are home already.
    UPDATE pgphi.key_versions v SET rekey_source_provider = NULL, rekey_source_kek = NULL
     WHERE v.key_id = key.key_id AND v.rekey_source_provider = _rekey_start.provider
       AND v.rekey_source_kek = target_kek;
    UPDATE pgphi.key_versions v SET rekey_source_provider = key.provider, rekey_source_kek = key.kek_ref
     WHERE v.key_id = key.key_id AND v.wrapped_dek IS NOT NULL AND v.rekey_source_provider IS NULL;
    UPDATE pgphi.keys k SET provider = _rekey_start.provider, kek_ref = target_kek
     WHERE k.key_id = key.key_id;
    DELETE FROM pgphi.rekey_approvals a WHERE a.key_id = key.key_id;
    -- The destination works, or nothing here commits.
    PERFORM pgphi._rekey_next(key.key_id);
    RETURN key.key_id;
END
$$;

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
    PERFORM pgphi._delete_dedicated_kek_if_unused(target_id);
END
$$;

CREATE OR REPLACE FUNCTION pgphi._audit_key_change() RETURNS trigger
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

REVOKE ALL ON FUNCTION pgphi.create_key(text, text, text, boolean), pgphi._create_dedicated_kek(text, text, text),
    pgphi._delete_dedicated_kek(text, text, integer, text), pgphi._delete_dedicated_kek_if_unused(integer),
    pgphi.deactivate_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.create_key(text, text, text, boolean), pgphi.deactivate_key(text) TO pgphi_key_custodian;

-- (end of section: dedicated KEKs)


------------------------------------------------------------------------------
-- Last: every table of pgphi's catalog gets the audit triggers, including the
-- tables the sections above add.
------------------------------------------------------------------------------

-- The catalog audit triggers (section "catalog audit") on every table that
-- belongs to the extension at this point, whichever section added it, but
-- audit_log and audit_anchors (append-only: their own triggers refuse every
-- change; an anchor audited would itself need anchoring, forever). ALWAYS:
-- also under session_replication_role = replica.
DO $attach$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid::regclass AS rel, c.relname
               FROM pg_catalog.pg_depend d
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.objid
              WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                AND d.refobjid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e
                                                        WHERE e.extname OPERATOR(pg_catalog.=) 'pgphi')
                AND d.deptype OPERATOR(pg_catalog.=) 'e'
                AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::"char"[])
                AND c.relname OPERATOR(pg_catalog.<>) ALL (ARRAY['audit_log', 'audit_anchors']::pg_catalog.name[])
              ORDER BY c.relname
    LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW '
                                  'EXECUTE FUNCTION pgphi._audit_catalog_change()',
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_audit', 63), t.rel);
        EXECUTE pg_catalog.format('CREATE TRIGGER %I BEFORE TRUNCATE ON %s FOR EACH STATEMENT '
                                  'EXECUTE FUNCTION pgphi._audit_catalog_change()',
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_truncate', 63), t.rel);
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.rel,
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_audit', 63));
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.rel,
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_truncate', 63));
    END LOOP;
END
$attach$;

-- (end of section: audit triggers on every table)
