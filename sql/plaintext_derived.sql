-- Plaintext is never derived for storage without a client asking: pgphi
-- refuses to decrypt inside ANALYZE, CREATE INDEX, REINDEX, CLUSTER,
-- materialized views, and functions declared IMMUTABLE (what index
-- expressions, extended statistics and generated columns are made of). The
-- statistics, indexes and views it would have filled hold no plaintext, and
-- every refusal is audited. (Autovacuum and background workers: TAP 021.)
CREATE FUNCTION plaintext_wait_for(condition text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    ok boolean;
BEGIN
    FOR i IN 1..300 LOOP
        EXECUTE condition INTO ok;
        IF ok THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END $$;

-- A role with decrypt rights that owns a table of PHI: the reviewer's attacker.
CREATE ROLE plaintext_owner;
GRANT pgphi_encrypt, pgphi_decrypt TO plaintext_owner;
GRANT CREATE ON SCHEMA public TO plaintext_owner;
SELECT pgphi.create_key('plaintext_key') > 0 AS created;
SELECT pgphi.grant_encrypt('plaintext_key', 'plaintext_owner'), pgphi.grant_decrypt('plaintext_key', 'plaintext_owner');
SET ROLE plaintext_owner;
CREATE TABLE plaintext_patients (id int PRIMARY KEY, ssn pgphi.encrypted);
INSERT INTO plaintext_patients
  SELECT g, pgphi.encrypt_phi(format('zz-ssn-%s', lpad(g::text, 4, '0')), 'plaintext_key') FROM generate_series(1, 200) g;

-- What a client asks for still decrypts, through a STABLE wrapper too.
CREATE FUNCTION plaintext_stable(v pgphi.encrypted) RETURNS text STABLE LANGUAGE sql
    AS $$ SELECT pgphi.decrypt_phi(v) $$;
SELECT pgphi.decrypt_phi(ssn) AS direct, plaintext_stable(ssn) AS through_stable_wrapper
  FROM plaintext_patients WHERE id = 7;

-- A wrapper that claims IMMUTABLE, in SQL or PL/pgSQL, is refused: indexes,
-- extended statistics and generated columns store what IMMUTABLE functions return.
CREATE FUNCTION plaintext_immutable(v pgphi.encrypted) RETURNS text IMMUTABLE LANGUAGE sql
    AS $$ SELECT pgphi.decrypt_phi(v) $$;
CREATE FUNCTION plaintext_immutable_plpgsql(v pgphi.encrypted) RETURNS text IMMUTABLE LANGUAGE plpgsql
    AS $$ BEGIN RETURN pgphi.decrypt_phi(v); END $$;
SELECT plaintext_immutable(ssn) FROM plaintext_patients WHERE id = 7;
\echo :LAST_ERROR_SQLSTATE
SELECT plaintext_immutable_plpgsql(ssn) FROM plaintext_patients WHERE id = 7;
\echo :LAST_ERROR_SQLSTATE
-- Nested inside a STABLE function, the IMMUTABLE one is still refused.
CREATE FUNCTION plaintext_stable_outer(v pgphi.encrypted) RETURNS text STABLE LANGUAGE sql
    AS $$ SELECT plaintext_immutable_plpgsql(v) $$;
SELECT plaintext_stable_outer(ssn) FROM plaintext_patients WHERE id = 7;
\echo :LAST_ERROR_SQLSTATE
-- An error inside a wrapper leaves nothing behind: the next query decrypts.
SELECT pgphi.decrypt_phi(ssn) FROM plaintext_patients WHERE id = 8;

-- Extended statistics on the wrapper: ANALYZE is refused, and
-- pg_statistic_ext_data gets nothing.
CREATE STATISTICS plaintext_stats ON (plaintext_immutable(ssn)) FROM plaintext_patients;
ANALYZE plaintext_patients;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT count(*) AS ext_stats_rows FROM pg_statistic_ext s JOIN pg_statistic_ext_data d ON d.stxoid = s.oid
 WHERE s.stxname = 'plaintext_stats';
SET ROLE plaintext_owner;
DROP STATISTICS plaintext_stats;
-- Without them, ANALYZE works, and the column statistics hold ciphertext only.
ANALYZE plaintext_patients;
RESET ROLE;
SELECT count(*) > 0 AS analyzed,
       bool_and(coalesce(array_to_string(stavalues1, ',') || array_to_string(stavalues2, ','), '') NOT LIKE '%zz-ssn%')
         AS no_plaintext_in_pg_statistic
  FROM pg_statistic WHERE starelid = 'plaintext_patients'::regclass;
SET ROLE plaintext_owner;

-- An expression index on the wrapper: building it over rows is refused...
CREATE INDEX plaintext_ssn_idx ON plaintext_patients (plaintext_immutable(ssn));
\echo :LAST_ERROR_SQLSTATE
-- ... and so is every row an empty one would receive.
CREATE TABLE plaintext_later (id int, ssn pgphi.encrypted);
CREATE INDEX plaintext_later_idx ON plaintext_later (plaintext_immutable(ssn));
INSERT INTO plaintext_later SELECT id, ssn FROM plaintext_patients WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS rows_stored FROM plaintext_later;
-- A function whose body becomes a decrypt after the index was built:
-- inserts, REINDEX, CLUSTER and ANALYZE of the expression index are refused.
CREATE FUNCTION plaintext_swapped(v pgphi.encrypted) RETURNS text IMMUTABLE LANGUAGE sql
    AS $$ SELECT md5(v::bytea) $$;
CREATE INDEX plaintext_swapped_idx ON plaintext_patients (plaintext_swapped(ssn));
CREATE OR REPLACE FUNCTION plaintext_swapped(v pgphi.encrypted) RETURNS text IMMUTABLE LANGUAGE sql
    AS $$ SELECT pgphi.decrypt_phi(v) $$;
INSERT INTO plaintext_patients VALUES (201, pgphi.encrypt_phi('zz-ssn-0201', 'plaintext_key'));
\echo :LAST_ERROR_SQLSTATE
REINDEX INDEX plaintext_swapped_idx;
\echo :LAST_ERROR_SQLSTATE
CLUSTER plaintext_patients USING plaintext_patients_pkey;
\echo :LAST_ERROR_SQLSTATE
ANALYZE plaintext_patients;
\echo :LAST_ERROR_SQLSTATE
-- The index answers no plaintext lookup: it holds what the old body computed.
SET enable_seqscan = off;
SET enable_bitmapscan = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM plaintext_patients WHERE plaintext_swapped(ssn) = 'zz-ssn-0007';
SELECT count(*) AS plaintext_matches FROM plaintext_patients WHERE plaintext_swapped(ssn) = 'zz-ssn-0007';
RESET enable_seqscan;
RESET enable_bitmapscan;
-- Nor can the function leave IMMUTABLE while an index, extended statistics or
-- a generated column uses it (directly or through an operator): pgphi
-- watches IMMUTABLE functions only.
CREATE OR REPLACE FUNCTION plaintext_swapped(v pgphi.encrypted) RETURNS text STABLE LANGUAGE sql
    AS $$ SELECT pgphi.decrypt_phi(v) $$;
\echo :LAST_ERROR_SQLSTATE
ALTER FUNCTION plaintext_swapped(pgphi.encrypted) STABLE;
\echo :LAST_ERROR_SQLSTATE
DROP INDEX plaintext_swapped_idx;
ALTER FUNCTION plaintext_swapped(pgphi.encrypted) STABLE;
CREATE FUNCTION plaintext_op_fn(v pgphi.encrypted, k text) RETURNS text IMMUTABLE LANGUAGE sql
    AS $$ SELECT md5(v::bytea) || k $$;
CREATE OPERATOR ## (LEFTARG = pgphi.encrypted, RIGHTARG = text, FUNCTION = plaintext_op_fn);
CREATE TABLE plaintext_op_t (ssn pgphi.encrypted);
CREATE INDEX plaintext_op_idx ON plaintext_op_t ((ssn ## 'x'));
ALTER FUNCTION plaintext_op_fn(pgphi.encrypted, text) VOLATILE;
\echo :LAST_ERROR_SQLSTATE
DROP INDEX plaintext_op_idx;
CREATE STATISTICS plaintext_op_stats ON ((ssn ## 'y')) FROM plaintext_op_t;
ALTER FUNCTION plaintext_op_fn(pgphi.encrypted, text) VOLATILE;
\echo :LAST_ERROR_SQLSTATE
DROP STATISTICS plaintext_op_stats;
ALTER TABLE plaintext_op_t ADD COLUMN h text GENERATED ALWAYS AS (plaintext_op_fn(ssn, 'z')) STORED;
ALTER FUNCTION plaintext_op_fn(pgphi.encrypted, text) VOLATILE;
\echo :LAST_ERROR_SQLSTATE
ALTER TABLE plaintext_op_t DROP COLUMN h;
ALTER FUNCTION plaintext_op_fn(pgphi.encrypted, text) VOLATILE;

-- A stored generated column computed by the wrapper.
ALTER TABLE plaintext_patients ADD COLUMN ssn_plain text GENERATED ALWAYS AS (plaintext_immutable(ssn)) STORED;
\echo :LAST_ERROR_SQLSTATE

-- Materialized views: creating one that decrypts is refused, and so is
-- refreshing one created empty. One that keeps ciphertext works, and
-- decrypts when read.
CREATE MATERIALIZED VIEW plaintext_mv AS SELECT id, pgphi.decrypt_phi(ssn) AS ssn FROM plaintext_patients;
\echo :LAST_ERROR_SQLSTATE
CREATE MATERIALIZED VIEW plaintext_mv AS SELECT id, pgphi.decrypt_phi(ssn) AS ssn FROM plaintext_patients WITH NO DATA;
REFRESH MATERIALIZED VIEW plaintext_mv;
\echo :LAST_ERROR_SQLSTATE
CREATE MATERIALIZED VIEW plaintext_cipher_mv AS SELECT id, ssn FROM plaintext_patients;
REFRESH MATERIALIZED VIEW plaintext_cipher_mv;
SELECT pgphi.decrypt_phi(ssn) FROM plaintext_cipher_mv WHERE id = 9;

-- Searchable columns keep working: deterministic values are indexed and
-- analyzed without decrypting.
CREATE TABLE plaintext_lookup (id int, ssn pgphi.encrypted);
INSERT INTO plaintext_lookup
  SELECT g, pgphi.encrypt_phi(format('zz-ssn-%s', g), 'plaintext_key', deterministic => true) FROM generate_series(1, 50) g;
CREATE INDEX ON plaintext_lookup (ssn);
ANALYZE plaintext_lookup;
SELECT id FROM plaintext_lookup WHERE ssn = pgphi.encrypt_phi('zz-ssn-42', 'plaintext_key', deterministic => true);
-- Parallel workers of a client's query decrypt.
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
SET parallel_leader_participation = off;
EXPLAIN (COSTS OFF) SELECT count(pgphi.decrypt_phi(ssn)) FROM plaintext_patients;
SELECT count(pgphi.decrypt_phi(ssn)) FROM plaintext_patients;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
RESET parallel_leader_participation;
RESET ROLE;

-- Every refusal is in the audit log, with what refused it.
SELECT plaintext_wait_for($$SELECT count(DISTINCT detail) >= 9 FROM pgphi.audit_log
                            WHERE key_name = 'plaintext_key' AND detail LIKE 'derived data:%'$$) AS refusals_recorded;
SELECT DISTINCT action, outcome, acting_role, detail FROM pgphi.audit_log
 WHERE key_name = 'plaintext_key' AND detail LIKE 'derived data:%' ORDER BY detail;
