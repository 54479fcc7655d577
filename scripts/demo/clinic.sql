-- The clinical scenario pgphi's demo runs, as the database owner.
\set ON_ERROR_STOP on
\pset footer off
SET client_min_messages = warning;

\echo
\echo '== 1. Install pgphi and create one key per kind of PHI'
CREATE EXTENSION pgphi;
SELECT pgphi.create_key('ssn_key') AS ssn_key_id,
       pgphi.create_key('name_key') AS name_key_id,
       pgphi.create_key('diagnosis_key') AS diagnosis_key_id;
SELECT k.name, k.provider, v.version, v.state, length(v.wrapped_dek) AS wrapped_dek_bytes
  FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) ORDER BY k.key_id;

\echo
\echo '== 2. A patients table: encrypted SSN, name and diagnosis, each bound to the MRN'
CREATE TABLE patients (
    id            serial PRIMARY KEY,
    mrn           text NOT NULL UNIQUE,
    ssn           pgphi.encrypted NOT NULL,
    full_name     pgphi.encrypted NOT NULL,
    diagnosis     bytea NOT NULL,          -- a plain BYTEA column works as well
    admitted_on   date NOT NULL
);
INSERT INTO patients (mrn, ssn, full_name, diagnosis, admitted_on) VALUES
  ('MRN-1001', encrypt_phi('123-45-6789', 'ssn_key', 'MRN-1001'),
               encrypt_phi('John Smith', 'name_key', 'MRN-1001'),
               encrypt_phi('E11.9 Type 2 diabetes mellitus', 'diagnosis_key', 'MRN-1001'), '2026-11-02'),
  ('MRN-1002', encrypt_phi('987-65-4321', 'ssn_key', 'MRN-1002'),
               encrypt_phi('Maria Garcia', 'name_key', 'MRN-1002'),
               encrypt_phi('I10 Essential hypertension', 'diagnosis_key', 'MRN-1002'), '2026-11-09'),
  ('MRN-1003', encrypt_phi('555-12-3456', 'ssn_key', 'MRN-1003'),
               encrypt_phi('Wei Chen', 'name_key', 'MRN-1003'),
               encrypt_phi('J45.909 Asthma, uncomplicated', 'diagnosis_key', 'MRN-1003'), '2026-11-15');

\echo
\echo '== 3. What is stored on disk (and in backups): ciphertext only'
SELECT mrn, substr(encode(ssn::bytea, 'hex'), 1, 40) || '...' AS ssn_as_stored,
       length(ssn::bytea) AS bytes
  FROM patients ORDER BY id;

\echo
\echo '== 4. A view that decrypts, for the one role granted the keys'
CREATE VIEW patients_decrypted AS
SELECT id, mrn,
       decrypt_phi(ssn, 'ssn_key', mrn) AS ssn,
       decrypt_phi(full_name, 'name_key', mrn) AS full_name,
       decrypt_phi(diagnosis, 'diagnosis_key', mrn) AS diagnosis,
       admitted_on
  FROM patients;
CREATE ROLE clinician LOGIN;
CREATE ROLE billing_clerk LOGIN;
-- Both hold the decrypt role, but only the clinician is granted the keys.
GRANT pgphi_decrypt TO clinician, billing_clerk;
SELECT pgphi.grant_decrypt(key_name, 'clinician') AS granted
  FROM unnest(ARRAY['ssn_key', 'name_key', 'diagnosis_key']) AS key_name;
GRANT SELECT ON patients_decrypted TO clinician;
GRANT SELECT (id, mrn, admitted_on, ssn) ON patients TO billing_clerk;
