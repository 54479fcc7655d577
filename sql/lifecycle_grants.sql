-- Time-limited grants (docs/key-lifecycle.md): grant_decrypt and
-- grant_encrypt with valid_until stop working at that moment, also inside
-- a statement that started before it, without a revoke; the expiry is
-- audited at the first refused use and when expire_key_grants() removes it.
CREATE ROLE lcg_custodian LOGIN;
CREATE ROLE lcg_temp LOGIN;
CREATE ROLE lcg_auditor LOGIN;
GRANT pgphi_key_custodian TO lcg_custodian;
GRANT pgphi_decrypt, pgphi_encrypt TO lcg_temp;
GRANT pgphi_key_auditor TO lcg_auditor;
SELECT pgphi.create_key('lcg_key') AS lcg_key_id \gset
CREATE TABLE lcg_t (id int PRIMARY KEY, v pgphi.encrypted);
GRANT SELECT ON lcg_t TO lcg_temp;
INSERT INTO lcg_t SELECT i, encrypt_phi('value ' || i, 'lcg_key') FROM generate_series(1, 40) i;

SET SESSION AUTHORIZATION lcg_custodian;
-- An expiry in the past is refused.
SELECT pgphi.grant_decrypt('lcg_key', 'lcg_temp', valid_until => now() - interval '1 minute');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('lcg_key', 'lcg_temp', valid_until => clock_timestamp() + interval '10 seconds');
SELECT pgphi.grant_encrypt('lcg_key', 'lcg_temp', valid_until => clock_timestamp() + interval '1 hour');
RESET SESSION AUTHORIZATION;
SELECT valid_until AS decrypt_until FROM pgphi.key_grants
 WHERE key_id = :lcg_key_id AND privilege = 'decrypt' \gset
-- Granting again with the same expiry changes nothing.
SET SESSION AUTHORIZATION lcg_custodian;
SELECT pgphi.grant_decrypt('lcg_key', 'lcg_temp', valid_until => :'decrypt_until') AS same_expiry;
RESET SESSION AUTHORIZATION;
SELECT privilege, grantee, valid_until IS NOT NULL AS time_limited FROM pgphi.key_grants
 WHERE key_id = :lcg_key_id ORDER BY privilege;
SELECT action, outcome, detail ~ '^to lcg_temp until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$' AS detail_has_expiry
  FROM pgphi.audit_log WHERE key_name = 'lcg_key' AND action LIKE 'grant_%' ORDER BY seq;
SET SESSION AUTHORIZATION lcg_temp;
SELECT pgphi.has_key_privilege('lcg_temp', 'lcg_key', 'decrypt') AS can_decrypt_now;
SELECT count(*) AS decrypted_in_time FROM lcg_t WHERE decrypt_phi(v, 'lcg_key') = 'value ' || id;
-- A statement that crosses the expiry stops inside it (0.4 s a row, 40
-- rows: 16 s, past the 10 s grant; OFFSET 0 keeps the sleep between the
-- decrypts).
SELECT count(decrypt_phi(v, 'lcg_key')) FROM (SELECT v, pg_sleep(0.4) FROM lcg_t ORDER BY id OFFSET 0) s;
\echo :LAST_ERROR_SQLSTATE
SELECT lc_wait_for(format('SELECT clock_timestamp() > %L::timestamptz', :'decrypt_until')) AS expired_by_now;
SELECT decrypt_phi(v, 'lcg_key') FROM lcg_t WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.has_key_privilege('lcg_temp', 'lcg_key', 'decrypt') AS can_decrypt_after;
-- The encrypt grant, with its own expiry, still works.
SELECT encrypt_phi('x', 'lcg_key') IS NOT NULL AS encrypts;
RESET SESSION AUTHORIZATION;

-- Removing expired grants is audited as an expiry, not as a revocation.
SET SESSION AUTHORIZATION lcg_custodian;
SELECT pgphi.expire_key_grants() AS expired_removed;
SELECT pgphi.expire_key_grants() AS nothing_left;
-- A grant without expiry replaces a time-limited one.
SELECT pgphi.grant_encrypt('lcg_key', 'lcg_temp') AS made_permanent;
RESET SESSION AUTHORIZATION;
SELECT privilege, valid_until IS NULL AS without_expiry FROM pgphi.key_grants WHERE key_id = :lcg_key_id ORDER BY privilege;
SELECT action, outcome, detail ~ '^from lcg_temp; expired at ' AS expiry_detail FROM pgphi.audit_log
 WHERE key_name = 'lcg_key' AND action IN ('expire_decrypt', 'revoke_decrypt');
SELECT action, detail ~ 'without expiry \(was' AS replaced FROM pgphi.audit_log
 WHERE key_name = 'lcg_key' AND action = 'grant_encrypt' ORDER BY seq DESC LIMIT 1;
SELECT lc_wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE action = 'decrypt'
    AND outcome = 'refused' AND key_name = 'lcg_key' AND detail = 'decrypt grant expired'
    AND acting_role = 'lcg_temp')$$) AS expiry_refusal_audited;

-- The access review: who can use the key, through which grant and role
-- chain, granted by whom, until when, and whether it is in force.
CREATE ROLE lcg_group NOLOGIN;
CREATE ROLE lcg_member LOGIN;
GRANT lcg_group TO lcg_member;
GRANT pgphi_decrypt TO lcg_group;
SET SESSION AUTHORIZATION lcg_custodian;
SELECT pgphi.grant_decrypt('lcg_key', 'lcg_group', valid_until => now() + interval '1 day');
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcg_auditor;
SELECT privilege, role_name, via_grant_to, role_chain, granted_by, valid_until IS NOT NULL AS time_limited, in_force
  FROM pgphi.access_review() WHERE key_name = 'lcg_key' ORDER BY privilege, role_name;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcg_temp;
SELECT count(*) FROM pgphi.access_review();
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
