-- Containment (docs/key-lifecycle.md): one custodian suspends a key or a
-- version and every encrypt and decrypt under it is refused (55000) and
-- audited; lifting it takes two custodians; a version marked compromised
-- never encrypts again and decrypts only to be re-encrypted.
CREATE FUNCTION lc_wait_for(condition text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    ok boolean;
BEGIN
    FOR i IN 1..600 LOOP
        EXECUTE condition INTO ok;
        IF ok THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END $$;
CREATE ROLE lc_custodian_a LOGIN;
CREATE ROLE lc_custodian_b LOGIN;
CREATE ROLE lc_app LOGIN;
CREATE ROLE lc_auditor LOGIN;
GRANT pgphi_key_custodian TO lc_custodian_a, lc_custodian_b;
GRANT pgphi_decrypt, pgphi_encrypt TO lc_app;
GRANT pgphi_key_auditor TO lc_auditor;

SELECT pgphi.create_key('lc_key') AS lc_key_id \gset
SELECT pgphi.grant_decrypt('lc_key', 'lc_app'), pgphi.grant_encrypt('lc_key', 'lc_app');
CREATE TABLE lc_t (id int PRIMARY KEY, v pgphi.encrypted);
GRANT SELECT, INSERT, UPDATE ON lc_t TO lc_app;
INSERT INTO lc_t SELECT i, encrypt_phi('value ' || i, 'lc_key') FROM generate_series(1, 10) i;

-- Only custodians suspend.
SET SESSION AUTHORIZATION lc_app;
SELECT pgphi.suspend_key('lc_key');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS decrypted_before FROM lc_t WHERE decrypt_phi(v, 'lc_key') = 'value ' || id;
RESET SESSION AUTHORIZATION;
-- Unknown keys and versions; the unknown name is not repeated.
SET SESSION AUTHORIZATION lc_custodian_a;
SELECT pgphi.suspend_key('123-45-6789');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.suspend_key('lc_key', 9);
\echo :LAST_ERROR_SQLSTATE

-- One custodian suspends the whole key, with a reason.
SELECT pgphi.suspend_key('lc_key', reason => 'incident 42: application credentials leaked');
SELECT pgphi.suspend_key('lc_key') AS suspended_again;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_app;
SELECT decrypt_phi(v, 'lc_key') FROM lc_t WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT encrypt_phi('new', 'lc_key') IS NOT NULL;
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
-- Superusers too: a suspension is no grant question.
SELECT decrypt_phi(v, 'lc_key') FROM lc_t WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT key_name, version, state, suspended, suspended_by, compromised FROM pgphi.key_inventory
 WHERE key_name = 'lc_key';
SELECT action, key_version, outcome, detail, login_role FROM pgphi.audit_log
 WHERE key_name = 'lc_key' AND action = 'suspend';
SELECT lc_wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE action = 'decrypt'
    AND outcome = 'refused' AND key_name = 'lc_key' AND detail = 'key is suspended' AND acting_role = 'lc_app')
    AND EXISTS (SELECT FROM pgphi.audit_log WHERE action = 'encrypt'
    AND outcome = 'refused' AND key_name = 'lc_key' AND detail = 'key is suspended' AND acting_role = 'lc_app')$$)
    AS refusals_audited;

-- Lifting it: one custodian approves, another resumes.
SET SESSION AUTHORIZATION lc_app;
SELECT pgphi.approve_resume('lc_key');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_custodian_a;
SELECT pgphi.resume_key('lc_key');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.approve_resume('lc_key');
-- The approver cannot also be the second custodian.
SELECT pgphi.resume_key('lc_key');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_app;
SELECT pgphi.resume_key('lc_key');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_custodian_b;
SELECT pgphi.resume_key('lc_key', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.resume_key('lc_key');
RESET SESSION AUTHORIZATION;
SELECT action, outcome, detail, login_role FROM pgphi.audit_log
 WHERE key_name = 'lc_key' AND action IN ('approve_resume', 'resume') ORDER BY seq;
SELECT count(*) AS approvals_left FROM pgphi.resume_approvals WHERE key_id = :lc_key_id;
SET SESSION AUTHORIZATION lc_app;
SELECT count(*) AS decrypted_after_resume FROM lc_t WHERE decrypt_phi(v, 'lc_key') = 'value ' || id;
RESET SESSION AUTHORIZATION;

-- One version: values under it are refused, the others work.
SELECT v AS v1_value FROM lc_t WHERE id = 1 \gset
SELECT pgphi.rotate_key('lc_key') AS v2;
INSERT INTO lc_t VALUES (11, encrypt_phi('value 11', 'lc_key'));
SET SESSION AUTHORIZATION lc_custodian_a;
SELECT pgphi.suspend_key('lc_key', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_app;
SELECT decrypt_phi(:'v1_value'::pgphi.encrypted, 'lc_key');
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(v, 'lc_key') FROM lc_t WHERE id = 11;
SELECT decrypt_phi(encrypt_phi('under version 2', 'lc_key'), 'lc_key');
RESET SESSION AUTHORIZATION;
SELECT version, suspended FROM pgphi.key_inventory WHERE key_name = 'lc_key' ORDER BY version;
-- A version's suspension is lifted by its own approvals.
SET SESSION AUTHORIZATION lc_custodian_b;
SELECT pgphi.approve_resume('lc_key');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.approve_resume('lc_key', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_custodian_a;
SELECT pgphi.resume_key('lc_key', 1);
RESET SESSION AUTHORIZATION;
SELECT decrypt_phi(:'v1_value'::pgphi.encrypted, 'lc_key');

-- Compromised: version 1 never decrypts for a reader again, but
-- reencrypt moves its values to the active version.
SET SESSION AUTHORIZATION lc_app;
SELECT pgphi.mark_compromised('lc_key', 1);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_custodian_a;
SELECT pgphi.mark_compromised('lc_key', NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.mark_compromised('lc_key', 1, reason => 'DEK found in a core dump');
SELECT pgphi.mark_compromised('lc_key', 1) AS marked_again;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_app;
SELECT decrypt_phi(:'v1_value'::pgphi.encrypted, 'lc_key');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT decrypt_phi(:'v1_value'::pgphi.encrypted, 'lc_key');
\echo :LAST_ERROR_SQLSTATE
-- Lookups under it (deterministic values of every live version) refuse it.
SELECT pgphi.encrypt_phi_all_versions('x', 'lc_key');
\echo :LAST_ERROR_SQLSTATE
SELECT version, state, compromised, compromised_by FROM pgphi.key_inventory
 WHERE key_name = 'lc_key' ORDER BY version;
-- reencrypt_value (and so pgphi.reencrypt) opens it to seal it again.
SELECT decrypt_phi(pgphi.reencrypt_value(:'v1_value'::pgphi.encrypted, 'lc_key'), 'lc_key');
CALL pgphi.reencrypt('lc_t', 'v');
SELECT (pgphi.ciphertext_info(v)).key_version, count(*) FROM lc_t GROUP BY 1;
SET SESSION AUTHORIZATION lc_app;
SELECT count(*) AS decrypted_after_reencrypt FROM lc_t WHERE decrypt_phi(v, 'lc_key') = 'value ' || id;
RESET SESSION AUTHORIZATION;
-- The mark stays, whoever tries to take it back.
UPDATE pgphi.key_versions SET compromised_at = NULL WHERE key_id = :lc_key_id AND version = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT action, key_version, outcome, detail FROM pgphi.audit_log
 WHERE key_name = 'lc_key' AND action = 'compromise';
-- The active version marked compromised: nothing is encrypted under the
-- key until it is rotated.
SET SESSION AUTHORIZATION lc_custodian_a;
SELECT pgphi.mark_compromised('lc_key', 2);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_app;
SELECT encrypt_phi('x', 'lc_key') IS NOT NULL;
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT pgphi.rotate_key('lc_key') AS v3;
SET SESSION AUTHORIZATION lc_app;
SELECT decrypt_phi(encrypt_phi('under version 3', 'lc_key'), 'lc_key');
RESET SESSION AUTHORIZATION;
SELECT lc_wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE action = 'decrypt'
    AND outcome = 'refused' AND key_name = 'lc_key' AND key_version = 1
    AND detail = 'key version is compromised' AND acting_role = 'lc_app')$$) AS compromised_refusal_audited;
-- A version the key does not have.
SELECT pgphi.suspend_key('lc_key', 7);
\echo :LAST_ERROR_SQLSTATE

-- The rotation report, for auditors: dates, supersession, cryptoperiod,
-- overdue or not, and the marks.
SELECT pgphi.set_cryptoperiod('lc_key', interval '1 day');
UPDATE pgphi.key_versions SET created_at = created_at - interval '2 days'
 WHERE key_id = :lc_key_id AND version = 3;
SET SESSION AUTHORIZATION lc_auditor;
SELECT key_name, version, state, superseded_at IS NOT NULL AS superseded, retired_at IS NOT NULL AS retired,
       cryptoperiod, rotate_by IS NOT NULL AS has_rotate_by, rotation_overdue, values_sealed >= 0 AS counted,
       suspended, compromised
  FROM pgphi.rotation_report() WHERE key_name = 'lc_key' ORDER BY version;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lc_app;
SELECT count(*) FROM pgphi.rotation_report();
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
