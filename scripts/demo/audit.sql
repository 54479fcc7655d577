\set ON_ERROR_STOP on
\pset footer off
SET client_min_messages = warning;
\echo
\echo '== 8. The audit trail: key events, the clerk''s refused decrypt, volumes per role'
-- Refusals and volumes reach the log through the audit writer within seconds.
DO $$
BEGIN
    FOR i IN 1..150 LOOP
        EXIT WHEN EXISTS (SELECT FROM pgphi.audit_log WHERE outcome = 'refused')
              AND EXISTS (SELECT FROM pgphi.key_use WHERE role_name = 'clinician');
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT seq, to_char(logged_at, 'HH24:MI:SS') AS at, acting_role, action, key_name, key_version, outcome, detail
  FROM pgphi.audit_log ORDER BY seq;
SELECT role_name, key_name, encryptions, decryptions FROM pgphi.key_use ORDER BY role_name, key_name;
\echo
\echo '== 9. The key inventory, and the audit log''s hash chain checked'
SELECT key_name, version, state, provider, cryptoperiod, rotation_overdue, decrypt_grantees
  FROM pgphi.key_inventory ORDER BY key_name, version;
SELECT intact, rows_checked, head_hash FROM pgphi.verify_audit_log();
