-- Searchable encrypted columns: deterministic encryption (AES-256-SIV) and
-- blind indexes, with index scans over 100,000 rows, the refusals of mixed
-- modes, and rotation followed by re-encryption and re-indexing.
SELECT pgphi.create_key('det_key') AS det_key_id \gset
SELECT pgphi.create_blind_index_key('ssn_index', normalization => 'digits') AS ssn_index_id \gset
SELECT pgphi.create_blind_index_key('email_index', normalization => 'trim_lower', index_bytes => 8) > 0 AS created;
SELECT name, purpose, normalization, index_bytes FROM pgphi.keys
 WHERE name IN ('ssn_key', 'det_key', 'ssn_index', 'email_index') ORDER BY key_id;

-- Deterministic values: the same plaintext, key version and context give the
-- same value; they decrypt like any other.
SELECT encrypt_phi('123-45-6789', 'det_key', deterministic => true)
         = encrypt_phi('123-45-6789', 'det_key', deterministic => true) AS same_plaintext,
       encrypt_phi('123-45-6789', 'det_key', deterministic => true)
         = encrypt_phi('123-45-6780', 'det_key', deterministic => true) AS other_plaintext,
       encrypt_phi('123-45-6789', 'det_key', deterministic => true, context => 'patient:1')
         = encrypt_phi('123-45-6789', 'det_key', true, 'patient:2') AS other_context;
SELECT decrypt_phi(encrypt_phi('123-45-6789', 'det_key', deterministic => true)) AS plaintext,
       decrypt_phi(encrypt_phi('', 'det_key', deterministic => true)) = '' AS empty_string,
       decrypt_phi(encrypt_phi('x', 'det_key', true, 'patient:1'), 'det_key', 'patient:1') AS with_context,
       decrypt_phi_bytea(encrypt_phi('\x00ff'::bytea, 'det_key', deterministic => true)) AS bytes;
-- jsonb is encrypted in its canonical text form: equal documents, equal values.
SELECT encrypt_phi('{"b": 1, "a": [2]}'::jsonb, 'det_key', deterministic => true)
         = encrypt_phi('{"a":[2],"b":1}'::jsonb, 'det_key', deterministic => true) AS equal_documents,
       decrypt_phi_jsonb(encrypt_phi('{"b": 1, "a": [2]}'::jsonb, 'det_key', deterministic => true)) AS document;
-- The header says AES-256-SIV; 28 bytes of overhead (no nonce, one framing byte).
SELECT i.algorithm, i.key_version, i.plaintext_bytes, length(v) - i.plaintext_bytes AS overhead
  FROM (SELECT encrypt_phi('123-45-6789', 'det_key', deterministic => true)::bytea AS v) s,
       pgphi.ciphertext_info(s.v) i;
SELECT (pgphi.ciphertext_info(encrypt_phi('x', 'det_key', deterministic => false))).algorithm AS deterministic_false;
-- Every encrypt_phi is VOLATILE (planning must not run a randomized one);
-- with deterministic => true given as a constant, the planner's support
-- function turns the call into the STABLE _encrypt_phi_deterministic, which
-- index conditions can use.
SELECT p.oid::regprocedure AS function, p.provolatile
  FROM pg_proc p WHERE p.proname IN ('encrypt_phi', 'blind_index', 'encrypt_phi_all_versions',
                                     '_encrypt_phi_deterministic')
   AND p.pronamespace = 'pgphi'::regnamespace ORDER BY p.oid::regprocedure::text;

-- Blind indexes: the key id and version, then the truncated HMAC; each key's
-- normalisation applies to every caller.
SELECT length(blind_index('123-45-6789', 'ssn_index')) AS ssn_index_bytes,
       length(blind_index('a@b.org', 'email_index')) AS email_index_bytes,
       substring(blind_index('123-45-6789', 'ssn_index') FROM 1 FOR 8)
         = int4send(:ssn_index_id) || int4send(1) AS prefix_is_key_and_version;
SELECT blind_index('123-45-6789', 'ssn_index') = blind_index('123 45 6789', 'ssn_index') AS digits_only,
       blind_index('123-45-6789', 'ssn_index') = blind_index('123-45-6780', 'ssn_index') AS other_value,
       blind_index('  Jane.Doe@Example.org ', 'email_index') = blind_index('jane.doe@example.org', 'email_index')
         AS trim_lower,
       blind_index('jane.doe@example.org', 'email_index') = blind_index('jane.doe@example.com', 'email_index')
         AS other_email;

-- 100,000 enrollees (patients): the SSN randomized (with the MRN as context), the SSN
-- deterministic, and a blind index of the SSN.
CREATE FUNCTION test_ssn(i integer) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT overlay(overlay(lpad(i::text, 9, '0') PLACING '-' FROM 4 FOR 0) PLACING '-' FROM 7 FOR 0) $$;
CREATE TABLE enrollees (
    id integer PRIMARY KEY,
    mrn text NOT NULL,
    ssn pgphi.encrypted,
    ssn_det pgphi.encrypted,
    ssn_bidx bytea
);
INSERT INTO enrollees
SELECT i, 'MRN-' || i, encrypt_phi(test_ssn(i), 'ssn_key', 'MRN-' || i),
       encrypt_phi(test_ssn(i), 'det_key', deterministic => true), blind_index(test_ssn(i), 'ssn_index')
  FROM generate_series(1, 100000) i;
ANALYZE enrollees;
-- ANALYZE handles both kinds: deterministic and blind index columns get full
-- statistics (all distinct), the randomized column only its width.
SELECT attname, n_distinct, avg_width FROM pg_stats
 WHERE tablename = 'enrollees' AND attname LIKE 'ssn%' ORDER BY attname;

-- Lookups on the deterministic column, with a btree index ...
CREATE INDEX enrollees_ssn_det_btree ON enrollees (ssn_det);
EXPLAIN (COSTS OFF)
SELECT id FROM enrollees WHERE ssn_det = encrypt_phi('000-01-2345', 'det_key', deterministic => true);
SELECT id, mrn, decrypt_phi(ssn_det) AS ssn FROM enrollees
 WHERE ssn_det = encrypt_phi('000-01-2345', 'det_key', deterministic => true);
SELECT count(*) AS no_such_patient FROM enrollees
 WHERE ssn_det = encrypt_phi('999-99-9999', 'det_key', deterministic => true);
-- ... and with a hash index.
DROP INDEX enrollees_ssn_det_btree;
CREATE INDEX enrollees_ssn_det_hash ON enrollees USING hash (ssn_det);
EXPLAIN (COSTS OFF)
SELECT id FROM enrollees WHERE ssn_det = encrypt_phi('000-09-9999', 'det_key', deterministic => true);
SELECT id, decrypt_phi(ssn_det) AS ssn FROM enrollees
 WHERE ssn_det = encrypt_phi('000-09-9999', 'det_key', deterministic => true);
-- A hash index compares only values whose hashes match, so there a search
-- value under another key finds nothing; a btree or a scan refuses it (below).
SELECT count(*) AS other_key_through_hash FROM enrollees
 WHERE ssn_det = encrypt_phi('000-09-9999', 'ssn_key', deterministic => true);
DROP INDEX enrollees_ssn_det_hash;
-- A unique index enforces uniqueness of the deterministic values.
-- (Terse: the error's detail shows the value, which differs with each run's DEK.)
CREATE UNIQUE INDEX enrollees_ssn_det_unique ON enrollees (ssn_det);
\set VERBOSITY terse
INSERT INTO enrollees VALUES (100001, 'MRN-100001', NULL, encrypt_phi('000-00-0042', 'det_key', deterministic => true));
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE

-- Lookups through the blind index, beside the randomized column.
CREATE INDEX enrollees_ssn_bidx ON enrollees (ssn_bidx);
EXPLAIN (COSTS OFF)
SELECT id FROM enrollees WHERE ssn_bidx = blind_index('000-05-0000', 'ssn_index');
SELECT id, decrypt_phi(ssn, 'ssn_key', mrn) AS ssn FROM enrollees
 WHERE ssn_bidx = blind_index('000 05 0000', 'ssn_index');

-- Equality also serves joins and grouping; this is what deterministic
-- values reveal: which rows share a value, and how often.
CREATE TABLE claims (claim_id integer, ssn_det pgphi.encrypted);
INSERT INTO claims SELECT c, encrypt_phi(test_ssn(c % 50 + 1), 'det_key', deterministic => true)
  FROM generate_series(1, 200) c;
SELECT count(*) AS matched_claims FROM claims JOIN enrollees USING (ssn_det);
SELECT count(*) AS claims, count(DISTINCT ssn_det) AS distinct_ssns FROM claims;

-- Mixed modes are refused. A randomized search value, or a randomized column:
SELECT count(*) FROM enrollees WHERE ssn_det = encrypt_phi('000-01-2345', 'det_key');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM enrollees WHERE ssn = encrypt_phi('000-01-2345', 'ssn_key', deterministic => true);
\echo :LAST_ERROR_SQLSTATE
SET max_parallel_maintenance_workers = 0;
CREATE INDEX ON enrollees (ssn);
\echo :LAST_ERROR_SQLSTATE
RESET max_parallel_maintenance_workers;
-- Values under different keys (a btree or a scan compares them and refuses;
-- terse, as the detail names key ids):
\set VERBOSITY terse
SELECT count(*) FROM enrollees WHERE ssn_det = encrypt_phi('000-01-2345', 'ssn_key', deterministic => true);
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
-- A key of the wrong purpose, either way, and a header forged to name a
-- blind-index key:
SELECT encrypt_phi('000-01-2345', 'ssn_index', deterministic => true);
\echo :LAST_ERROR_SQLSTATE
SELECT blind_index('000-01-2345', 'det_key');
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(overlay(encrypt_phi('x', 'det_key', deterministic => true)::bytea
                           PLACING int4send(:ssn_index_id) FROM 4 FOR 4));
\echo :LAST_ERROR_SQLSTATE
CALL pgphi.rebuild_blind_index('enrollees', 'ssn_bidx', 'ssn', 'det_key');
\echo :LAST_ERROR_SQLSTATE
-- Bad blind-index key definitions; nothing is created.
SELECT pgphi.create_blind_index_key('bad_index', normalization => 'upper');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_blind_index_key('bad_index', index_bytes => 4);
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS bad_index_keys FROM pgphi.keys WHERE name = 'bad_index';

-- Rotation of the blind-index key: values under version 1 stay findable
-- through all versions, and block retirement until the index is rebuilt.
SELECT pgphi.rotate_key('ssn_index') AS index_version;
SELECT count(*) AS plain_lookup FROM enrollees WHERE ssn_bidx = blind_index('000-00-0500', 'ssn_index');
EXPLAIN (COSTS OFF)
SELECT id FROM enrollees WHERE ssn_bidx = ANY (blind_index_all_versions('000-00-0500', 'ssn_index'));
SELECT id FROM enrollees WHERE ssn_bidx = ANY (blind_index_all_versions('000-00-0500', 'ssn_index'));
SELECT blind_index('000-00-0500', 'ssn_index', 1) = ssn_bidx AS version_1_value FROM enrollees WHERE id = 500;
SELECT * FROM pgphi.key_version_usage('ssn_index', 1);
SELECT pgphi.retire_key_version('ssn_index', 1);
\echo :LAST_ERROR_SQLSTATE
-- The rebuild decrypts the randomized column (with its context) in batches,
-- each committed. One row whose context no longer matches stops it in the
-- last batch (the row's new version lands at the end of the table); once the
-- row is repaired, the same CALL resumes where it stopped.
UPDATE enrollees SET mrn = 'MRN-changed' WHERE id = 99999;
\set VERBOSITY terse
CALL pgphi.rebuild_blind_index('enrollees', 'ssn_bidx', 'ssn', 'ssn_index', batch_size => 20000,
                               context_column => 'mrn');
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
SELECT next_page > 0 AS committed_batches, finished_at IS NULL AS unfinished
  FROM pgphi.reencrypt_progress WHERE column_name = 'ssn_bidx';
UPDATE enrollees SET mrn = 'MRN-99999' WHERE id = 99999;
SET client_min_messages = warning;
CALL pgphi.rebuild_blind_index('enrollees', 'ssn_bidx', 'ssn', 'ssn_index', batch_size => 20000,
                               context_column => 'mrn');
RESET client_min_messages;
SELECT total_pages = next_page AS all_pages, rows_reencrypted AS rows_rebuilt, finished_at IS NOT NULL AS finished
  FROM pgphi.reencrypt_progress WHERE column_name = 'ssn_bidx';
SELECT pgphi._blind_index_version_of(ssn_bidx, :ssn_index_id) AS version, count(*) FROM enrollees GROUP BY 1;
SELECT id, decrypt_phi(ssn, 'ssn_key', mrn) AS ssn FROM enrollees
 WHERE ssn_bidx = blind_index('000-00-0500', 'ssn_index');
SELECT count(*) AS every_row_findable FROM enrollees WHERE ssn_bidx = blind_index(test_ssn(id), 'ssn_index');
SELECT pgphi.retire_key_version('ssn_index', 1);
SELECT blind_index('x', 'ssn_index', 1);
\echo :LAST_ERROR_SQLSTATE

-- Rotation of the deterministic key: new values use version 2, so a plain
-- lookup misses rows not yet re-encrypted; the all-versions form, still an
-- index scan, finds them.
SELECT pgphi.rotate_key('det_key') AS det_version;
UPDATE enrollees SET ssn_det = encrypt_phi(test_ssn(id), 'det_key', deterministic => true) WHERE id <= 100;
SELECT count(*) AS plain_lookup FROM enrollees
 WHERE ssn_det = encrypt_phi('000-00-0500', 'det_key', deterministic => true);
EXPLAIN (COSTS OFF)
SELECT id FROM enrollees WHERE ssn_det = ANY (encrypt_phi_all_versions('000-00-0500', 'det_key'));
SELECT id FROM enrollees WHERE ssn_det = ANY (encrypt_phi_all_versions('000-00-0500', 'det_key'))
UNION ALL
SELECT id FROM enrollees WHERE ssn_det = ANY (encrypt_phi_all_versions('000-00-0050', 'det_key'));
-- Re-encryption keeps deterministic values deterministic, under version 2.
CALL pgphi.reencrypt('enrollees', 'ssn_det', batch_size => 25000);
CALL pgphi.reencrypt('claims', 'ssn_det');
SELECT i.algorithm, i.key_version, count(*) FROM enrollees, pgphi.ciphertext_info(ssn_det) i GROUP BY 1, 2;
SELECT id, decrypt_phi(ssn_det) AS ssn FROM enrollees
 WHERE ssn_det = encrypt_phi('000-00-0500', 'det_key', deterministic => true);
SELECT pgphi.retire_key_version('det_key', 1);
SELECT encrypt_phi_all_versions('x', 'det_key') = ARRAY[encrypt_phi('x', 'det_key', deterministic => true)]
       AS only_live_versions;

-- The rebuild also fills a new index column from a plaintext source, and
-- clears the index of rows whose source is NULL.
CREATE TABLE contacts (id integer, email text, email_bidx bytea);
INSERT INTO contacts VALUES (1, 'Jane.Doe@Example.org', NULL), (2, NULL, '\x00'), (3, ' JOHN@example.org', NULL);
CALL pgphi.rebuild_blind_index('contacts', 'email_bidx', 'email', 'email_index');
SELECT id, email_bidx IS NULL AS no_index, email_bidx = blind_index(email, 'email_index') AS matches
  FROM contacts ORDER BY id;
SELECT id FROM contacts WHERE email_bidx = blind_index('john@EXAMPLE.org', 'email_index');

-- Writers hold pgphi_encrypt and the keys' encrypt grants: that is enough for
-- deterministic values and blind indexes; without them, neither is allowed.
CREATE ROLE search_writer;
CREATE ROLE search_outsider;
GRANT pgphi_encrypt TO search_writer, search_outsider;
SELECT pgphi.grant_encrypt('det_key', 'search_writer'), pgphi.grant_encrypt('ssn_index', 'search_writer');
SET ROLE search_writer;
SELECT encrypt_phi('1', 'det_key', deterministic => true) IS NOT NULL AS encrypts,
       blind_index('1', 'ssn_index') IS NOT NULL AS indexes,
       cardinality(encrypt_phi_all_versions('1', 'det_key')) AS versions;
RESET ROLE;
SET ROLE search_outsider;
SELECT encrypt_phi('1', 'det_key', deterministic => true);
\echo :LAST_ERROR_SQLSTATE
SELECT blind_index('1', 'ssn_index');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
REVOKE pgphi_encrypt FROM search_outsider;
SET ROLE search_outsider;
SELECT encrypt_phi('1', 'det_key', deterministic => true);
\echo :LAST_ERROR_SQLSTATE
SELECT blind_index('1', 'ssn_index');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- This library also serves a database whose pgphi is still 0.1.0 (after a
-- package upgrade, before ALTER EXTENSION UPDATE): its keys are encryption
-- keys. The update adds the key purposes; old values keep decrypting.
CREATE DATABASE pgphi_upgrade_test;
\c pgphi_upgrade_test
CREATE EXTENSION pgphi VERSION '0.1.0';
SELECT pgphi.create_key('old_key') > 0 AS created;
CREATE TABLE old_values AS SELECT pgphi.encrypt_phi('written under 0.1.0', 'old_key') AS v;
SELECT pgphi.decrypt_phi(v) FROM old_values;
ALTER EXTENSION pgphi UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'pgphi';
SELECT name, purpose FROM pgphi.keys;
SELECT pgphi.decrypt_phi(v) FROM old_values;
SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('deterministic after the update', 'old_key', deterministic => true));

-- A version that does not exist.
SELECT pgphi.create_blind_index_key('late_index') > 0 AS created;
SELECT pgphi.blind_index('1', 'late_index', 99);
\echo :LAST_ERROR_SQLSTATE
