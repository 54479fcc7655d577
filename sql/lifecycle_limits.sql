-- Decrypt limits and break-glass (docs/key-lifecycle.md): the SQL surface.
-- A limit counts the values a role decrypts per window and refuses the next
-- one (53400); break-glass roles take two custodians; break_glass() grants a
-- time-limited decrypt, audited with its reason, and counts each value.
-- Sessions, listeners, standbys and the alerts' timing: TAP 034.
CREATE ROLE lcl_cust_a LOGIN;
CREATE ROLE lcl_cust_b LOGIN;
CREATE ROLE lcl_reader LOGIN;
CREATE ROLE lcl_doc LOGIN;
CREATE ROLE lcl_ward;
CREATE ROLE lcl_nurse LOGIN;
CREATE ROLE lcl_cust_doc LOGIN;
CREATE ROLE lcl_team;
GRANT lcl_ward TO lcl_nurse;
GRANT pgphi_key_custodian TO lcl_cust_a, lcl_cust_b, lcl_cust_doc;
GRANT pgphi_decrypt TO lcl_reader, lcl_doc, lcl_nurse;
GRANT lcl_team TO lcl_cust_doc;
SELECT pgphi.create_key('lcl_key') AS lcl_key_id \gset
CREATE TABLE lcl_t (id int PRIMARY KEY, v pgphi.encrypted);
GRANT SELECT ON lcl_t TO lcl_reader, lcl_doc;
INSERT INTO lcl_t SELECT i, encrypt_phi('value ' || i, 'lcl_key') FROM generate_series(1, 40) i;
SELECT pgphi.grant_decrypt('lcl_key', 'lcl_reader');

-- Limits: set by a custodian, checked, audited.
SET SESSION AUTHORIZATION lcl_cust_a;
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_reader', 25, interval '1 day') AS set_limit;
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_reader', 25, interval '1 day') AS same_again;
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_reader', 10, interval '10 seconds');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_reader', -1);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.set_decrypt_limit('lcl_nokey', 'lcl_reader', 1);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT role, max_values, per, set_by FROM pgphi.decrypt_limits WHERE key_id = :lcl_key_id;

SET SESSION AUTHORIZATION lcl_reader;
SELECT count(decrypt_phi(v, 'lcl_key')) AS within_limit FROM lcl_t WHERE id <= 20;
SELECT count(decrypt_phi(v, 'lcl_key')) AS the_rest FROM lcl_t WHERE id <= 5;
-- The 26th value (and the WARNING of the alert, once).
\set VERBOSITY terse
SELECT count(decrypt_phi(v, 'lcl_key')) FROM lcl_t WHERE id <= 1;
\echo :LAST_ERROR_SQLSTATE
SELECT count(decrypt_phi(v, 'lcl_key')) FROM lcl_t WHERE id <= 1;
\echo :LAST_ERROR_SQLSTATE
\set VERBOSITY default
-- Custodians cannot change a limit on a role they belong to.
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcl_cust_doc;
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_team', 5);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcl_cust_b;
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_reader', NULL) AS removed;
SELECT pgphi.set_decrypt_limit('lcl_key', 'lcl_reader', NULL) AS nothing_to_remove;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcl_reader;
SELECT count(decrypt_phi(v, 'lcl_key')) AS without_limit FROM lcl_t;
RESET SESSION AUTHORIZATION;
SELECT action, outcome, detail FROM pgphi.audit_log
 WHERE key_name = 'lcl_key' AND action = 'set_decrypt_limit' ORDER BY seq;

-- Break-glass roles: two custodians, a person's role.
SET SESSION AUTHORIZATION lcl_cust_a;
SELECT pgphi.set_break_glass_role('lcl_key', 'lcl_ward', interval '1 hour');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.set_break_glass_role('lcl_key', 'lcl_doc', interval '2 days');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.set_break_glass_role('lcl_key', 'pgphi_key_custodian', interval '1 hour');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.set_break_glass_role('lcl_key', 'lcl_doc', interval '30 minutes') AS first_custodian;
SELECT pgphi.set_break_glass_role('lcl_key', 'lcl_doc', interval '30 minutes');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcl_doc;
SELECT pgphi.break_glass('lcl_key', 'before approval');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcl_cust_b;
SELECT pgphi.set_break_glass_role('lcl_key', 'lcl_doc', interval '30 minutes') AS second_custodian;
RESET SESSION AUTHORIZATION;
SELECT role, max_duration, proposed_by, approved_by FROM pgphi.break_glass_roles WHERE key_id = :lcl_key_id;

-- Breaking the glass.
SET SESSION AUTHORIZATION lcl_doc;
SELECT count(decrypt_phi(v, 'lcl_key')) FROM lcl_t;
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.break_glass('lcl_key', NULL);
\echo :LAST_ERROR_SQLSTATE
-- (Its WARNING names the end, a time: TAP 034 checks it.)
SET client_min_messages = error;
SELECT pgphi.break_glass('lcl_key', 'incident 42: chart needed in theatre') AS ends \gset
RESET client_min_messages;
SELECT :'ends'::timestamptz BETWEEN now() + interval '29 minutes' AND now() + interval '31 minutes'
    AS ends_in_30_minutes;
SELECT count(decrypt_phi(v, 'lcl_key')) AS decrypted_under_break_glass FROM lcl_t;
RESET SESSION AUTHORIZATION;
SELECT grantee, valid_until > now() AS time_limited FROM pgphi.key_grants
 WHERE key_id = :lcl_key_id AND grantee = 'lcl_doc'::regrole;
SELECT role, login_role, reason, ends_at - started_at AS period FROM pgphi.break_glass_events
 WHERE key_id = :lcl_key_id;
SELECT action, outcome, detail ~ '^lcl_doc may decrypt until .*; reason: incident 42: chart needed in theatre$' AS with_reason
  FROM pgphi.audit_log WHERE key_name = 'lcl_key' AND action IN ('propose_break_glass', 'set_break_glass_role', 'break_glass')
 ORDER BY seq;
-- Removing the role takes one custodian; the event in force runs out.
SET SESSION AUTHORIZATION lcl_cust_a;
SELECT pgphi.set_break_glass_role('lcl_key', 'lcl_doc', NULL) AS removed;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcl_doc;
SELECT pgphi.break_glass('lcl_key', 'again');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
