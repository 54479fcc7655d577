-- Least privilege (0.3.0): group-wide grants take two custodians, grants go
-- only to real roles, re-encryption needs both key grants, conversions
-- belong to the role that started them, and retirement cannot be blocked by
-- a forged value in someone else's table.
\set VERBOSITY default
SET client_min_messages = notice;
CREATE ROLE pv_custodian_a;
CREATE ROLE pv_custodian_b;
GRANT pgphi_key_custodian TO pv_custodian_a, pv_custodian_b;
CREATE ROLE pv_writer;
CREATE ROLE pv_app;
CREATE ROLE pv_other_app;
CREATE ROLE pv_mallory;
GRANT pgphi_encrypt TO pv_writer, pv_app, pv_other_app, pv_mallory;
GRANT pgphi_decrypt TO pv_app, pv_other_app;
GRANT CREATE ON SCHEMA public TO pv_mallory;
SELECT pgphi.create_key('pv_key') > 0 AS created;

-- A grant to one of pgphi's groups, or to a role it is a member of, reaches
-- every member: one custodian cannot make it alone.
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_decrypt('pv_key', 'pgphi_decrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
CREATE ROLE pv_umbrella;
GRANT pv_umbrella TO pgphi_decrypt;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_decrypt('pv_key', 'pv_umbrella');
\echo :LAST_ERROR_SQLSTATE
-- Approving one's own grant does not count.
SELECT pgphi.approve_grant('pv_key', 'pgphi_decrypt', 'decrypt');
SELECT pgphi.grant_decrypt('pv_key', 'pgphi_decrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
-- A second custodian's approval does; it serves one grant.
SET SESSION AUTHORIZATION pv_custodian_b;
SELECT pgphi.approve_grant('pv_key', 'pgphi_decrypt', 'decrypt');
RESET SESSION AUTHORIZATION;
SELECT k.name, a.privilege, a.grantee, a.approved_by FROM pgphi.grant_approvals a JOIN pgphi.keys k USING (key_id)
 ORDER BY a.approved_by;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_decrypt('pv_key', 'pgphi_decrypt') AS granted;
SELECT pgphi.revoke_decrypt('pv_key', 'pgphi_decrypt') AS revoked;
SELECT pgphi.grant_decrypt('pv_key', 'pgphi_decrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT count(*) AS approvals_left FROM pgphi.grant_approvals;

-- An approval older than a day has lapsed.
SET SESSION AUTHORIZATION pv_custodian_b;
SELECT pgphi.approve_grant('pv_key', 'pgphi_encrypt', 'encrypt');
RESET SESSION AUTHORIZATION;
UPDATE pgphi.grant_approvals SET approved_at = now() - interval '25 hours';
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_encrypt('pv_key', 'pgphi_encrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
DELETE FROM pgphi.grant_approvals;

-- A role with more than ten member roles is a group too; ten are not.
CREATE ROLE pv_ward;
CREATE ROLE pv_nurse_1; CREATE ROLE pv_nurse_2; CREATE ROLE pv_nurse_3; CREATE ROLE pv_nurse_4;
CREATE ROLE pv_nurse_5; CREATE ROLE pv_nurse_6; CREATE ROLE pv_nurse_7; CREATE ROLE pv_nurse_8;
CREATE ROLE pv_nurse_9; CREATE ROLE pv_nurse_10; CREATE ROLE pv_nurse_11;
GRANT pv_ward TO pv_nurse_1, pv_nurse_2, pv_nurse_3, pv_nurse_4, pv_nurse_5, pv_nurse_6, pv_nurse_7,
    pv_nurse_8, pv_nurse_9, pv_nurse_10;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_decrypt('pv_key', 'pv_ward') AS ten_members_granted;
SELECT pgphi.revoke_decrypt('pv_key', 'pv_ward') AS revoked;
RESET SESSION AUTHORIZATION;
GRANT pv_ward TO pv_nurse_11;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_decrypt('pv_key', 'pv_ward');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
-- A custodian who belongs to the group cannot approve a grant to it.
GRANT pv_ward TO pv_custodian_b;
SET SESSION AUTHORIZATION pv_custodian_b;
SELECT pgphi.approve_grant('pv_key', 'pv_ward', 'decrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
REVOKE pv_ward FROM pv_custodian_b;
-- Only custodians approve, and approvals count session users: a custodian's
-- SECURITY DEFINER function does not make its caller one.
SET SESSION AUTHORIZATION pv_app;
SELECT pgphi.approve_grant('pv_key', 'pv_ward', 'decrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
CREATE SCHEMA pv_custodian_tools AUTHORIZATION pv_custodian_a;
SET SESSION AUTHORIZATION pv_custodian_a;
CREATE FUNCTION pv_custodian_tools.approve_for_me() RETURNS void LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog AS $$ SELECT pgphi.approve_grant('pv_key', 'pv_ward', 'decrypt') $$;
GRANT USAGE ON SCHEMA pv_custodian_tools TO pv_app;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pv_app;
SELECT pv_custodian_tools.approve_for_me();
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
DROP SCHEMA pv_custodian_tools CASCADE;

-- PUBLIC (OID 0) and OIDs that are no role are refused outright; revoking
-- from a dropped role's OID still works.
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.grant_decrypt('pv_key', '-'::regrole);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('pv_key', 0::oid::regrole);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('pv_key', 4000000000::oid::regrole);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.approve_grant('pv_key', 0::oid::regrole, 'decrypt');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.revoke_decrypt('pv_key', 4000000000::oid::regrole) AS revoked_nothing;
-- A key name that does not exist is not repeated.
SELECT pgphi.grant_decrypt('123-45-6789', 'pv_app');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('pv_key', 'pv_app') AS granted, pgphi.grant_encrypt('pv_key', 'pv_app') AS granted,
       pgphi.grant_encrypt('pv_key', 'pv_writer') AS granted,
       pgphi.grant_decrypt('pv_key', 'pv_other_app') AS granted, pgphi.grant_encrypt('pv_key', 'pv_other_app') AS granted;
RESET SESSION AUTHORIZATION;

-- The audit trail shows who approved what, and who granted it.
SELECT action, login_role, detail FROM pgphi.audit_log
 WHERE action IN ('approve_grant', 'grant_decrypt', 'grant_encrypt', 'revoke_decrypt')
   AND key_name = 'pv_key' ORDER BY seq;

-- Asking about other roles' grants is for custodians and auditors.
SET SESSION AUTHORIZATION pv_app;
SELECT pgphi.has_key_privilege('pv_app', 'pv_key', 'decrypt') AS own_grant;
SELECT pgphi.has_key_privilege('pv_other_app', 'pv_key', 'decrypt');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT pgphi.has_key_privilege('pv_other_app', 'pv_key', 'decrypt') AS custodian_may_ask;
RESET SESSION AUTHORIZATION;

-- reencrypt_value opens and seals: it needs decrypt and encrypt on the key.
CREATE TABLE pv_charts (id int, v pgphi.encrypted);
INSERT INTO pv_charts SELECT i, encrypt_phi('chart ' || i, 'pv_key') FROM generate_series(1, 30) i;
GRANT SELECT, UPDATE ON pv_charts TO pv_writer, pv_app, pv_other_app, pv_mallory;
SELECT pgphi.rotate_key('pv_key');
SET SESSION AUTHORIZATION pv_writer;
SELECT pgphi.reencrypt_value(v, 'pv_key') IS NOT NULL FROM pv_charts WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
CALL pgphi.reencrypt('pv_charts', 'v', batch_size => 5);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
-- The refused CALL had recorded its conversion: it belongs to pv_writer, and
-- nobody else takes it over; a custodian sees it and may discard it.
SET SESSION AUTHORIZATION pv_app;
SELECT (pgphi.ciphertext_info(pgphi.reencrypt_value(v, 'pv_key'))).key_version FROM pv_charts WHERE id = 1;
SELECT count(*) AS visible FROM pgphi.reencrypt_progress;
CALL pgphi.reencrypt('pv_charts', 'v', batch_size => 5);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT relation, column_name, started_by, finished_at IS NULL AS unfinished
  FROM pgphi.reencrypt_progress WHERE relation = 'pv_charts'::regclass;
UPDATE pgphi.reencrypt_progress SET next_page = 0 WHERE relation = 'pv_charts'::regclass RETURNING relation, column_name;
DELETE FROM pgphi.reencrypt_progress WHERE relation = 'pv_charts'::regclass;
RESET SESSION AUTHORIZATION;
-- Now pv_app converts the column; its row is its own.
SET SESSION AUTHORIZATION pv_app;
CALL pgphi.reencrypt('pv_charts', 'v', batch_size => 5);
SELECT relation, column_name, started_by, rows_reencrypted, finished_at IS NOT NULL AS finished
  FROM pgphi.reencrypt_progress WHERE relation = 'pv_charts'::regclass;
-- (as if it had been interrupted)
UPDATE pgphi.reencrypt_progress SET next_page = 0, finished_at = NULL WHERE relation = 'pv_charts'::regclass;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pv_mallory;
SELECT count(*) AS visible FROM pgphi.reencrypt_progress;
UPDATE pgphi.reencrypt_progress SET finished_at = now() RETURNING relation, column_name;
DELETE FROM pgphi.reencrypt_progress RETURNING relation, column_name;
INSERT INTO pgphi.reencrypt_progress (relation, column_name, key_id, target_version, total_pages, started_by)
    VALUES ('pv_charts', 'other', 1, 1, 1, 'pv_app');
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT relation, column_name, started_by, finished_at IS NULL AS unfinished
  FROM pgphi.reencrypt_progress WHERE relation = 'pv_charts'::regclass;
SET SESSION AUTHORIZATION pv_other_app;
CALL pgphi.reencrypt('pv_charts', 'v', batch_size => 5);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
-- Finished, it is replaced by the next conversion, whoever runs it.
SET SESSION AUTHORIZATION pv_app;
CALL pgphi.reencrypt('pv_charts', 'v', batch_size => 5);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pv_other_app;
CALL pgphi.reencrypt('pv_charts', 'v', batch_size => 5);
SELECT relation, started_by, finished_at IS NOT NULL AS finished FROM pgphi.reencrypt_progress
 WHERE relation = 'pv_charts'::regclass;
RESET SESSION AUTHORIZATION;

-- Retirement: a forged header in a table anyone could create does not block
-- it forever. The refusal names the relation and its owner; a custodian
-- retires anyway, ignoring it, with a reason, and that is audited.
SET SESSION AUTHORIZATION pv_mallory;
CREATE TABLE pv_forged (payload bytea);
INSERT INTO pv_forged
    SELECT '\xa70101'::bytea || int4send((SELECT (pgphi.ciphertext_info(v)).key_id FROM pv_charts LIMIT 1))
           || int4send(1) || '\x000000000000000000000000000000000000000000000000000000000000'::bytea;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION pv_custodian_a;
SELECT relation, column_name, "values", owner, not_scanned FROM pgphi.key_version_usage('pv_key', 1);
SELECT pgphi.retire_key_version('pv_key', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.retire_key_version('pv_key', 1, ignore_relations => ARRAY['pv_forged']::regclass[]);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.retire_key_version('pv_key', 1, ignore_relations => ARRAY['pv_forged', 'pv_charts']::regclass[],
                                reason => 'pv_forged holds forged values (ticket 1234)');
SELECT version, state FROM pgphi.key_inventory WHERE key_name = 'pv_key' ORDER BY version;
SELECT pgphi.key_version_usage('pv_key', 1, lock_wait => '0');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.retire_key_version('no-such-key', 1);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
SELECT action, login_role, key_version, detail FROM pgphi.audit_log
 WHERE key_name = 'pv_key' AND action IN ('retire', 'retire_ignoring') ORDER BY seq;

DROP TABLE pv_forged, pv_charts;
DROP ROLE pv_umbrella, pv_ward, pv_nurse_1, pv_nurse_2, pv_nurse_3, pv_nurse_4, pv_nurse_5, pv_nurse_6,
    pv_nurse_7, pv_nurse_8, pv_nurse_9, pv_nurse_10, pv_nurse_11;
