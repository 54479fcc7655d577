-- Round trips through encrypt_phi / decrypt_phi for every supported type.

-- text, with and without the key name check
SELECT decrypt_phi(encrypt_phi('123-45-6789', 'ssn_key'));
SELECT decrypt_phi(encrypt_phi('123-45-6789', 'ssn_key'), 'ssn_key');
SELECT decrypt_phi(encrypt_phi('', 'ssn_key')) = '' AS empty_string_round_trips;
SELECT decrypt_phi(encrypt_phi('Zoë Ångström 患者', 'name_key'), 'name_key');

-- NULL in, NULL out
SELECT encrypt_phi(NULL::text, 'ssn_key') IS NULL AS null_value,
       encrypt_phi('x', NULL) IS NULL AS null_key,
       decrypt_phi(NULL::pgphi.encrypted) IS NULL AS null_ciphertext,
       decrypt_phi(encrypt_phi('x', 'ssn_key'), 'ssn_key', NULL) IS NULL AS null_context;

-- the context is bound as associated data
SELECT decrypt_phi(encrypt_phi('E11.9', 'notes_key', 'patient:1001'), 'notes_key', 'patient:1001');

-- randomized: equal plaintexts never give equal ciphertexts
SELECT count(DISTINCT encrypt_phi('same', 'ssn_key')::bytea) AS distinct_ciphertexts
  FROM generate_series(1, 1000);

-- 39 bytes of overhead: 11-byte header, 12-byte nonce, 16-byte tag
SELECT length(encrypt_phi('123-45-6789', 'ssn_key')::bytea) AS ciphertext_bytes;
SELECT format_version, algorithm, key_id, key_version, plaintext_bytes
  FROM pgphi.ciphertext_info(encrypt_phi('123-45-6789', 'ssn_key'));

-- bytea and jsonb, and their typed decrypt functions
SELECT decrypt_phi_bytea(encrypt_phi('\x00ff10'::bytea, 'ssn_key'));
SELECT decrypt_phi_jsonb(encrypt_phi('{"dx": "E11.9", "meds": ["metformin"]}'::jsonb, 'notes_key'));
SELECT decrypt_phi(encrypt_phi('{"a": 1}'::jsonb, 'notes_key')) AS jsonb_read_as_text;
SELECT decrypt_phi_bytea(encrypt_phi('abc', 'ssn_key')) AS text_read_as_bytea;

-- values large enough to be compressed and toasted
CREATE TABLE big_notes (note pgphi.encrypted);
INSERT INTO big_notes SELECT encrypt_phi(repeat('ABCDEFGH', 100000), 'notes_key');
SELECT length(decrypt_phi(note)) AS chars,
       md5(decrypt_phi(note)) = md5(repeat('ABCDEFGH', 100000)) AS intact
  FROM big_notes;

-- The seed's schema: plain BYTEA columns and the key name in a column.
CREATE TABLE patients_seed (
    id SERIAL PRIMARY KEY,
    ssn_encrypted BYTEA,
    name_encrypted BYTEA,
    diagnosis_encrypted BYTEA,
    encryption_key_id TEXT NOT NULL
);
INSERT INTO patients_seed (ssn_encrypted, name_encrypted, diagnosis_encrypted, encryption_key_id)
VALUES (encrypt_phi('123-45-6789', 'ssn_key'), encrypt_phi('John Smith', 'ssn_key'),
        encrypt_phi('Type 2 Diabetes', 'ssn_key'), 'ssn_key');
SELECT id,
       decrypt_phi(ssn_encrypted, encryption_key_id) AS ssn,
       decrypt_phi(name_encrypted, encryption_key_id) AS name,
       decrypt_phi(diagnosis_encrypted, encryption_key_id) AS diagnosis
  FROM patients_seed WHERE id = 1;

-- Columns of the encrypted type, each value bound to its row's MRN.
CREATE TABLE patients (
    id integer PRIMARY KEY,
    mrn text NOT NULL,
    ssn pgphi.encrypted NOT NULL,
    name pgphi.encrypted NOT NULL
);
INSERT INTO patients
SELECT i, 'MRN-' || i,
       encrypt_phi(format('%s-45-6789', 100 + i % 800), 'ssn_key', 'MRN-' || i),
       encrypt_phi('Patient ' || i, 'name_key', 'MRN-' || i)
  FROM generate_series(1, 2000) AS i;
SELECT count(*) AS all_decrypt FROM patients
 WHERE decrypt_phi(ssn, 'ssn_key', mrn) = format('%s-45-6789', 100 + id % 800)
   AND decrypt_phi(name, 'name_key', mrn) = 'Patient ' || id;
UPDATE patients SET name = encrypt_phi('Renamed ' || id, 'name_key', mrn) WHERE id <= 10;
SELECT decrypt_phi(name, 'name_key', mrn) FROM patients WHERE id = 3;

-- Parallel workers decrypt too, each with its own key cache. The leader does
-- not take part, so the workers must do every decryption.
SET parallel_leader_participation = off;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF)
SELECT count(*) FROM patients WHERE decrypt_phi(ssn, 'ssn_key', mrn) LIKE '1%';
SELECT count(*) FROM patients WHERE decrypt_phi(ssn, 'ssn_key', mrn) LIKE '1%';
CREATE FUNCTION workers_launched(query text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE 'EXPLAIN (ANALYZE, FORMAT JSON) ' || query INTO plan;
    RETURN (plan -> 0 -> 'Plan' -> 'Plans' -> 0 ->> 'Workers Launched')::integer;
END $$;
SELECT workers_launched($$SELECT count(*) FROM patients
                         WHERE decrypt_phi(ssn, 'ssn_key', mrn) LIKE '1%'$$) > 0 AS workers_decrypted;
RESET parallel_leader_participation;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;

-- Values move between bytea and encrypted columns by assignment.
INSERT INTO patients_seed (ssn_encrypted, encryption_key_id)
SELECT ssn, 'ssn_key' FROM patients WHERE id = 1;
INSERT INTO patients (id, mrn, ssn, name)
SELECT 9999, 'MRN-1', ssn_encrypted, ssn_encrypted FROM patients_seed WHERE id = 2;
SELECT decrypt_phi(ssn, 'ssn_key', mrn) FROM patients WHERE id = 9999;

-- Nothing is encrypted under a key version before it is committed: a value
-- that outlived a rollback of its key could never be decrypted.
BEGIN;
SELECT pgphi.create_key('short_lived_key') > 0 AS created;
SELECT encrypt_phi('inside', 'short_lived_key');
ROLLBACK;
SELECT encrypt_phi('after rollback', 'short_lived_key');
SELECT pgphi.create_key('committed_key') > 0 AS created;
SELECT decrypt_phi(encrypt_phi('after commit', 'committed_key'));
