-- Hostile identifiers in every batch procedure and create_decrypted_view.
-- Table and column names are generated from styles that have broken
-- formatted SQL: quotes, "%" and "$" (format specifiers, dollar quotes),
-- spaces, unicode, exactly 63 bytes of multibyte characters, mixed case and
-- reserved words. Every pair (table style, column style) is one case, in its
-- own schema; the context column and the blind index column of a case take
-- two other styles. Each case is converted by protect_column (interrupted
-- half-way, then resumed), re-encrypted after a rotation, given a blind
-- index and a decrypted view, and every value is checked. (The statements
-- generated for each case are run by \gexec and not echoed; a failing one is.)
SET client_min_messages = warning;
\set VERBOSITY terse
SELECT pgphi.create_key('hostile_key') > 0 AS created;
SELECT pgphi.create_blind_index_key('hostile_index_key') > 0 AS created;
CREATE ROLE hostile_reader;
GRANT pgphi_decrypt TO hostile_reader;
SELECT pgphi.grant_decrypt('hostile_key', 'hostile_reader');

CREATE TABLE hostile_styles (style int PRIMARY KEY, name text NOT NULL);
INSERT INTO hostile_styles VALUES
    (1, 'We"ird''Name'),
    (2, '100% $1 off'),
    (3, 'select'),
    (4, 'Ünïcødé 日本 name'),
    (5, repeat('é', 31) || 'x'),
    (6, '%s%I%L%%$$x$1'),
    (7, 'MixedCase'),
    (8, 'user');
SELECT count(*) AS styles, count(*) FILTER (WHERE octet_length(name) = 63) AS of_63_bytes,
       count(*) FILTER (WHERE name <> quote_ident(name)) AS need_quoting
  FROM hostile_styles;

-- The cases: every table style with every column style.
CREATE TABLE hostile_cases AS
SELECT t.style * 10 + c.style AS case_id, 'hostile_' || (t.style * 10 + c.style) AS schema_name,
       t.name AS table_name, c.name AS col, x.name AS ctx, i.name AS idx
  FROM hostile_styles t, hostile_styles c
  JOIN hostile_styles x ON x.style = c.style % 8 + 1
  JOIN hostile_styles i ON i.style = (c.style + 1) % 8 + 1;
SELECT count(*) AS cases FROM hostile_cases;
ALTER TABLE hostile_cases ADD COLUMN tbl regclass;

\set ECHO errors
SELECT format('CREATE SCHEMA %I', schema_name) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
\set ECHO errors
SELECT format('CREATE TABLE %I.%I (id int PRIMARY KEY, %I text, %I text, %I bytea)',
              schema_name, table_name, col, ctx, idx) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
UPDATE hostile_cases SET tbl = format('%I.%I', schema_name, table_name)::regclass;
\set ECHO errors
SELECT format('INSERT INTO %s SELECT n, %L || n, %L || n FROM generate_series(1, 60) n',
              tbl, 'value ' || case_id || ' ', 'context ' || case_id || ' ') FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
\set ECHO errors
SELECT format('GRANT USAGE ON SCHEMA %I TO hostile_reader', schema_name) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
GRANT SELECT ON hostile_cases TO hostile_reader;

-- protect_column, interrupted by a row trigger half-way through the backfill.
CREATE FUNCTION hostile_interrupt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'backfill interrupted' USING ERRCODE = 'query_canceled';
END $$;
\set ECHO errors
SELECT format('CREATE TRIGGER interrupt BEFORE UPDATE ON %s FOR EACH ROW WHEN (NEW.id = 40)
               EXECUTE FUNCTION hostile_interrupt()', tbl) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
-- Each CALL is its own statement (it commits); \gexec runs them in order.
\set ECHO errors
SELECT format('CALL pgphi.protect_column(%L, %L, %L, batch_size => 10, context_column => %L)',
              tbl, col, 'hostile_key', ctx) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
-- Interrupted in every case: the shadow column and trigger stayed, partly filled.
SELECT count(*) AS interrupted_with_shadow_and_trigger
  FROM hostile_cases h
 WHERE EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = h.tbl AND NOT a.attisdropped
                  AND a.attname = (pgphi._protect_column_names(h.col)).shadow
                  AND a.atttypid = 'pgphi.encrypted'::regtype)
   AND EXISTS (SELECT FROM pg_trigger g WHERE g.tgrelid = h.tbl
                  AND g.tgname = (pgphi._protect_column_names(h.col)).trigger_name);
-- The names derived for the shadow column and trigger fit, whole characters.
SELECT count(*) AS names_that_fit
  FROM hostile_cases h, pgphi._protect_column_names(h.col) n
 WHERE octet_length(n.shadow) <= 63 AND octet_length(n.trigger_name) <= 63
   AND n.shadow::text = convert_from(convert_to(n.shadow::text, 'UTF8'), 'UTF8')
   AND (pgphi._protect_column_names(h.col)).shadow = n.shadow;
-- Writes while it is interrupted are encrypted by the trigger.
\set ECHO errors
SELECT format('UPDATE %s SET %I = %L || id WHERE id %% 7 = 0', tbl, col, 'changed ' || case_id || ' ')
  FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
\set ECHO errors
SELECT format('DROP TRIGGER interrupt ON %s', tbl) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
-- Resumed: every case finishes.
\set ECHO errors
SELECT format('CALL pgphi.protect_column(%L, %L, %L, batch_size => 10, context_column => %L)',
              tbl, col, 'hostile_key', ctx) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
-- Nothing left behind, and the column is encrypted in place.
SELECT count(*) AS converted,
       count(*) FILTER (WHERE EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = h.tbl AND NOT a.attisdropped
                                         AND a.attname LIKE 'pgphi\_%')) AS shadow_columns_left,
       count(*) FILTER (WHERE EXISTS (SELECT FROM pg_trigger g WHERE g.tgrelid = h.tbl)) AS triggers_left
  FROM hostile_cases h
 WHERE (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = h.tbl AND a.attname = h.col
           AND NOT a.attisdropped) = 'pgphi.encrypted'::regtype;

-- Every value decrypts, under its context, to what was written.
CREATE FUNCTION hostile_check(h hostile_cases) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s WHERE pgphi.decrypt_phi(%I, %L, %I) IS DISTINCT FROM
                        CASE WHEN id %% 7 = 0 THEN %L ELSE %L END || id',
                   h.tbl, h.col, 'hostile_key', h.ctx, 'changed ' || h.case_id || ' ', 'value ' || h.case_id || ' ')
        INTO bad;
    RETURN bad;
END $$;
SELECT count(*) AS cases, sum(hostile_check(h)) AS wrong_values FROM hostile_cases h;

-- reencrypt after a rotation: every value moves to version 2.
SELECT pgphi.rotate_key('hostile_key');
\set ECHO errors
SELECT format('CALL pgphi.reencrypt(%L, %L, batch_size => 10, context_column => %L)', tbl, col, ctx)
  FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
CREATE FUNCTION hostile_versions(h hostile_cases) RETURNS int[] LANGUAGE plpgsql AS $$
DECLARE
    versions int[];
BEGIN
    EXECUTE format('SELECT array_agg(DISTINCT (pgphi.ciphertext_info(%I)).key_version) FROM %s', h.col, h.tbl)
        INTO versions;
    RETURN versions;
END $$;
SELECT hostile_versions(h) AS versions, count(*) AS cases, sum(hostile_check(h)) AS wrong_values
  FROM hostile_cases h GROUP BY 1;
SELECT count(*) AS progress_rows, count(*) FILTER (WHERE p.finished_at IS NOT NULL) AS finished
  FROM pgphi.reencrypt_progress p JOIN hostile_cases h ON p.relation = h.tbl AND p.column_name = h.col;

-- rebuild_blind_index from the encrypted column, with its context.
\set ECHO errors
SELECT format('CALL pgphi.rebuild_blind_index(%L, %L, %L, %L, batch_size => 10, context_column => %L)',
              tbl, idx, col, 'hostile_index_key', ctx) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
CREATE FUNCTION hostile_index_check(h hostile_cases) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s WHERE %I IS DISTINCT FROM
                        pgphi.blind_index(pgphi.decrypt_phi(%I, %L, %I), %L)',
                   h.tbl, h.idx, h.col, 'hostile_key', h.ctx, 'hostile_index_key')
        INTO bad;
    RETURN bad;
END $$;
SELECT count(*) AS cases, sum(hostile_index_check(h)) AS wrong_indexes FROM hostile_cases h;

-- create_decrypted_view, the view named in the column's style.
-- (Called with the names as values, not through formatted SQL.)
SELECT count(*) AS views
  FROM hostile_cases h,
       LATERAL (SELECT pgphi.create_decrypted_view(h.tbl, 'view ' || h.col, 'hostile_reader',
                                                   columns => ARRAY[h.col], key_name => 'hostile_key',
                                                   context_column => h.ctx)) v;
CREATE FUNCTION hostile_view_check(h hostile_cases) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %I.%I WHERE %I IS DISTINCT FROM CASE WHEN id %% 7 = 0 THEN %L ELSE %L END || id',
                   h.schema_name, 'view ' || h.col, h.col, 'changed ' || h.case_id || ' ', 'value ' || h.case_id || ' ')
        INTO bad;
    RETURN bad;
END $$;
SET ROLE hostile_reader;
SELECT count(*) AS cases, sum(hostile_view_check(h)) AS wrong_in_views FROM hostile_cases h;
RESET ROLE;

-- A column that has the shadow's name but no conversion trigger is not the
-- user's to lose: refused, and left as it was.
CREATE TABLE hostile_clash (id int, "ÜberName" text, "pgphi_protecting_ÜberName" text);
INSERT INTO hostile_clash VALUES (1, 'plain', 'mine');
CALL pgphi.protect_column('hostile_clash', 'ÜberName', 'hostile_key');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM hostile_clash;
DROP TABLE hostile_clash;

-- Clean up.
DELETE FROM pgphi.reencrypt_progress p USING hostile_cases h WHERE p.relation = h.tbl;
\set ECHO errors
SELECT format('DROP SCHEMA %I CASCADE', schema_name) FROM hostile_cases ORDER BY case_id \gexec
\set ECHO all
DROP FUNCTION hostile_interrupt(), hostile_check(hostile_cases), hostile_versions(hostile_cases),
    hostile_index_check(hostile_cases), hostile_view_check(hostile_cases);
DROP TABLE hostile_cases, hostile_styles;
RESET client_min_messages;
