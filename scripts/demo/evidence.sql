-- The evidence an auditor takes away (docs/key-lifecycle.md): the access
-- review, the rotation report and a destruction certificate. As the
-- database owner, who sets up two key custodians and an auditor.
\set ON_ERROR_STOP on
\pset footer off
SET client_min_messages = warning;
\echo
\echo '== 10. Evidence for an auditor: who can decrypt what, and a destroyed key version''s certificate'
CREATE ROLE custodian_ana LOGIN;
CREATE ROLE custodian_ben LOGIN;
CREATE ROLE auditor_kim LOGIN;
GRANT pgphi_key_custodian TO custodian_ana, custodian_ben;
GRANT pgphi_key_auditor TO auditor_kim;
-- The diagnosis key's first version: rotated, its values re-encrypted,
-- retired (a scan finds no value under it), then destroyed by two custodians.
SELECT pgphi.rotate_key('diagnosis_key') AS new_diagnosis_version;
CALL pgphi.reencrypt('public.patients', 'diagnosis', context_column => 'mrn');
SELECT pgphi.retire_key_version('diagnosis_key', 1);
SET SESSION AUTHORIZATION custodian_ana;
SELECT pgphi.approve_destroy('diagnosis_key', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION custodian_ben;
SELECT pgphi.approve_destroy('diagnosis_key', 1);
SELECT pgphi.destroy_key('diagnosis_key', 1);
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION auditor_kim;
SELECT key_name, privilege, role_name, role_chain, granted_by, in_force
  FROM pgphi.access_review() ORDER BY key_name, privilege, role_name;
SELECT key_name, version, state, rotation_overdue, values_sealed, destroyed_at IS NOT NULL AS destroyed
  FROM pgphi.rotation_report() ORDER BY key_name, version;
-- The certificate: one canonical JSON text, signed by the key manager with
-- the audit anchors' key; shown pretty-printed, verified as issued.
\echo 'The destruction certificate of diagnosis_key version 1:'
\pset format unaligned
\pset tuples_only on
SELECT jsonb_pretty(pgphi.destruction_certificate('diagnosis_key', 1)::jsonb) AS destruction_certificate;
\pset format aligned
\pset tuples_only off
SELECT pgphi.verify_destruction_certificate(pgphi.destruction_certificate('diagnosis_key', 1)) AS certificate_verifies;
RESET SESSION AUTHORIZATION;
