-- Key lifecycle: rotation, re-encryption, rewrap, retirement, destruction.
SELECT pgphi.create_key('mrn_key') AS mrn_key_id \gset
CREATE TABLE charts (id int PRIMARY KEY, mrn text, note pgphi.encrypted, scan bytea);
INSERT INTO charts SELECT i, 'MRN-' || i, encrypt_phi('note ' || i, 'mrn_key', 'MRN-' || i),
                          encrypt_phi(('scan ' || i)::bytea, 'mrn_key')
  FROM generate_series(1, 500) i;

-- Rotation: a new active version; the old one keeps decrypting.
SELECT pgphi.rotate_key('mrn_key') AS new_version;
SELECT version, state FROM pgphi.key_versions WHERE key_id = :mrn_key_id ORDER BY version;
SELECT key_version FROM pgphi.ciphertext_info(encrypt_phi('new write', 'mrn_key'));
SELECT count(*) AS old_values_decrypt FROM charts WHERE decrypt_phi(note, 'mrn_key', mrn) = 'note ' || id;

-- The old version cannot be retired while values use it; the refusal says where.
SELECT * FROM pgphi.key_version_usage('mrn_key', 1) ORDER BY 1, 2;
SELECT pgphi.retire_key_version('mrn_key', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.retire_key_version('mrn_key', 2);
\echo :LAST_ERROR_SQLSTATE

-- Re-encryption moves every value (with its context) to the active version.
CALL pgphi.reencrypt('charts', 'note', batch_size => 100, context_column => 'mrn');
CALL pgphi.reencrypt('charts', 'scan', batch_size => 100);
SELECT key_version, count(*) FROM charts, pgphi.ciphertext_info(note) GROUP BY 1;
SELECT count(*) AS all_decrypt FROM charts
 WHERE decrypt_phi(note, 'mrn_key', mrn) = 'note ' || id
   AND convert_from(decrypt_phi_bytea(scan, 'mrn_key'), 'UTF8') = 'scan ' || id;
SELECT relation, column_name, target_version, rows_reencrypted, finished_at IS NOT NULL AS finished
  FROM pgphi.reencrypt_progress ORDER BY column_name;
-- Again: nothing left to do.
CALL pgphi.reencrypt('charts', 'note', context_column => 'mrn');
SELECT rows_reencrypted FROM pgphi.reencrypt_progress WHERE column_name = 'note';
-- A wrong context fails authentication and changes nothing.
SELECT pgphi.create_key('ctx_key') > 0 AS created;
CREATE TABLE ctx_t AS
SELECT i AS id, 'MRN-' || i AS mrn, encrypt_phi('v' || i, 'ctx_key', 'MRN-' || i) AS v
  FROM generate_series(1, 10) i;
SELECT pgphi.rotate_key('ctx_key') AS new_version;
CALL pgphi.reencrypt('ctx_t', 'v', context_column => 'id');
\echo :LAST_ERROR_SQLSTATE
SELECT key_version, count(*) FROM ctx_t, pgphi.ciphertext_info(v) GROUP BY 1;
CALL pgphi.reencrypt('ctx_t', 'v', context_column => 'mrn');
SELECT key_version, count(*) FROM ctx_t, pgphi.ciphertext_info(v) GROUP BY 1;
-- Only encrypted or bytea columns.
CALL pgphi.reencrypt('charts', 'mrn');
\echo :LAST_ERROR_SQLSTATE

-- Now retirement succeeds; a retired version decrypts nothing, but its DEK is kept
-- (a custodian can un-retire it).
SELECT pgphi.retire_key_version('mrn_key', 1);
SELECT version, state, retired_at IS NOT NULL AS retired FROM pgphi.key_versions
 WHERE key_id = :mrn_key_id ORDER BY version;

-- KEK rewrap: new wrapped DEKs, same DEKs, no table data touched.
CREATE TEMP TABLE before AS SELECT version, wrapped_dek FROM pgphi.key_versions WHERE key_id = :mrn_key_id;
SELECT pgphi.rewrap_keys('mrn_key') AS rewrapped;
SELECT count(*) AS changed FROM before b JOIN pgphi.key_versions v USING (version)
 WHERE v.key_id = :mrn_key_id AND v.wrapped_dek <> b.wrapped_dek;
SELECT pgphi.flush_cache() >= 0 AS flushed;
SELECT count(*) AS still_decrypt FROM charts WHERE decrypt_phi(note, 'mrn_key', mrn) = 'note ' || id;

-- Destruction needs two different custodians' approval, of a retired
-- version: version 2 is rotated out, its values re-encrypted and the version
-- retired first. A copy of one of its values is kept outside the tables (as
-- in a backup) to show what destruction does to it.
CREATE ROLE custodian_a LOGIN;
CREATE ROLE custodian_b LOGIN;
CREATE ROLE not_a_custodian LOGIN;
GRANT pgphi_key_custodian TO custodian_a, custodian_b;
GRANT USAGE ON SCHEMA pgphi TO not_a_custodian;
SELECT encrypt_phi('to be shredded', 'mrn_key') AS shredded_value \gset
SELECT pgphi.rotate_key('mrn_key') AS new_version;
CALL pgphi.reencrypt('charts', 'note', context_column => 'mrn');
CALL pgphi.reencrypt('charts', 'scan');
SELECT pgphi.retire_key_version('mrn_key', 2);
CREATE TABLE shredded AS SELECT encrypt_phi('custodians cannot read this', 'mrn_key') AS v;
GRANT SELECT ON shredded TO custodian_a;
SET SESSION AUTHORIZATION not_a_custodian;
SELECT pgphi.approve_destroy('mrn_key', 2);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION custodian_a;
SELECT pgphi.approve_destroy('mrn_key', 2);
SELECT pgphi.destroy_key('mrn_key', 2);
\echo :LAST_ERROR_SQLSTATE
-- A custodian cannot decrypt.
SELECT decrypt_phi(v) FROM shredded;
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION custodian_b;
SELECT pgphi.approve_destroy('mrn_key', 2);
SELECT pgphi.destroy_key('mrn_key', 2);
RESET SESSION AUTHORIZATION;
SELECT version, state, wrapped_dek IS NULL AS dek_erased FROM pgphi.key_versions
 WHERE key_id = :mrn_key_id ORDER BY version;
SELECT decrypt_phi(:'shredded_value'::pgphi.encrypted);
\echo :LAST_ERROR_SQLSTATE
-- destroy_key never destroys the active version; a superuser's direct DML
-- can, and the key then has no version to encrypt with until it is rotated.
UPDATE pgphi.key_versions SET state = 'destroyed', wrapped_dek = NULL, destroyed_at = now()
 WHERE key_id = :mrn_key_id AND state = 'active';
SELECT encrypt_phi('x', 'mrn_key');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.rotate_key('mrn_key') AS new_version;
SELECT decrypt_phi(encrypt_phi('after the shredding', 'mrn_key'));

-- Protecting an existing plaintext column, online and resumable.
CREATE TABLE intake (id int PRIMARY KEY, mrn text, ssn text, seen date);
INSERT INTO intake SELECT i, 'MRN-' || i, lpad(i::text, 9, '0'), date '2026-01-01' + i % 300
  FROM generate_series(1, 3000) i;
INSERT INTO intake VALUES (3001, 'MRN-3001', NULL, NULL);
CALL pgphi.protect_column('intake', 'ssn', 'ssn_key', batch_size => 500, context_column => 'mrn');
SELECT attname, atttypid::regtype FROM pg_attribute
 WHERE attrelid = 'intake'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum;
SELECT count(*) AS protected FROM intake WHERE decrypt_phi(ssn, 'ssn_key', mrn) = lpad(id::text, 9, '0');
SELECT ssn IS NULL AS null_stays_null FROM intake WHERE id = 3001;
-- Writes after the conversion encrypt as usual; plaintext is refused.
INSERT INTO intake (id, mrn, ssn) VALUES (3002, 'MRN-3002', encrypt_phi('999-99-9999', 'ssn_key', 'MRN-3002'));
INSERT INTO intake (id, mrn, ssn) VALUES (3003, 'MRN-3003', '999-99-9999');
\echo :LAST_ERROR_SQLSTATE
CALL pgphi.protect_column('intake', 'ssn', 'ssn_key');
\echo :LAST_ERROR_SQLSTATE

-- Interrupted in the middle of the backfill: the shadow column and its trigger
-- stay, writes made meanwhile are encrypted by the trigger, and a second CALL
-- finishes the job.
CREATE TABLE admissions (id int PRIMARY KEY, mrn text, ssn text);
INSERT INTO admissions SELECT i, 'MRN-' || i, 'ssn-' || i FROM generate_series(1, 200000) i;
VACUUM ANALYZE admissions;
-- A row trigger cancels the backfill half-way, on whatever machine (a
-- statement timeout would depend on its speed, and valgrind's).
CREATE FUNCTION cancel_backfill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'backfill cancelled at row %', NEW.id USING ERRCODE = 'query_canceled';
END $$;
CREATE TRIGGER cancel_backfill BEFORE UPDATE ON admissions FOR EACH ROW WHEN (NEW.id = 100000)
    EXECUTE FUNCTION cancel_backfill();
\set VERBOSITY terse
CALL pgphi.protect_column('admissions', 'ssn', 'ssn_key', batch_size => 1000, context_column => 'mrn');
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
DROP TRIGGER cancel_backfill ON admissions;
SELECT count(*) FILTER (WHERE pgphi_protecting_ssn IS NOT NULL) BETWEEN 1 AND 199999 AS partly_filled
  FROM admissions;
UPDATE admissions SET ssn = 'changed-' || id WHERE id % 1000 = 0;
INSERT INTO admissions (id, mrn, ssn) VALUES (200001, 'MRN-200001', 'ssn-200001');
-- A change of the context column re-encrypts under the new context too.
UPDATE admissions SET mrn = 'MRN-moved-' || id WHERE id % 997 = 0;
-- Resuming with another key is refused.
CALL pgphi.protect_column('admissions', 'ssn', 'name_key', context_column => 'mrn');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS kept_in_step FROM admissions
 WHERE id % 1000 = 0 AND decrypt_phi(pgphi_protecting_ssn, 'ssn_key', mrn) = 'changed-' || id;
CALL pgphi.protect_column('admissions', 'ssn', 'ssn_key', batch_size => 1000, context_column => 'mrn');
SELECT count(*) AS all_protected FROM admissions
 WHERE decrypt_phi(ssn, 'ssn_key', mrn) = CASE WHEN id % 1000 = 0 THEN 'changed-' || id ELSE 'ssn-' || id END;
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgrelid = 'admissions'::regclass;

-- A key custodian who owns a table re-encrypts it without any right on the
-- key catalog, once another custodian (here a superuser) granted it both
-- decrypt and encrypt on the key: re-encrypting opens every value.
CREATE ROLE owner_custodian LOGIN;
GRANT pgphi_key_custodian TO owner_custodian;
CREATE TABLE custodian_t (id int, v pgphi.encrypted);
INSERT INTO custodian_t SELECT i, encrypt_phi('c' || i, 'ssn_key') FROM generate_series(1, 50) i;
ALTER TABLE custodian_t OWNER TO owner_custodian;
SELECT pgphi.rotate_key('ssn_key') > 1 AS rotated;
SET SESSION AUTHORIZATION owner_custodian;
CALL pgphi.reencrypt('custodian_t', 'v');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT pgphi.grant_decrypt('ssn_key', 'owner_custodian'), pgphi.grant_encrypt('ssn_key', 'owner_custodian');
SET SESSION AUTHORIZATION owner_custodian;
CALL pgphi.reencrypt('custodian_t', 'v');
RESET SESSION AUTHORIZATION;
SELECT count(DISTINCT (pgphi.ciphertext_info(v)).key_version) AS versions,
       count(*) FILTER (WHERE decrypt_phi(v) = 'c' || id) AS decrypt FROM custodian_t;
