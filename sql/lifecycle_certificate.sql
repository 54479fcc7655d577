-- Destruction certificates (docs/key-lifecycle.md): what an auditor checks.
-- The certificate of a destroyed version names the version, both approving
-- custodians, the check made at destruction (no value left) and the audit
-- records with their place in the hash chain; it is the same every time,
-- its MAC verifies, and a certificate with one byte changed does not. A
-- version not destroyed is refused, and so is a role without the grant.
-- The standby: TAP 017.
\set VERBOSITY terse
CREATE ROLE lcc_cust_a LOGIN;
CREATE ROLE lcc_cust_b LOGIN;
CREATE ROLE lcc_auditor LOGIN;
CREATE ROLE lcc_nobody LOGIN;
GRANT pgphi_key_custodian TO lcc_cust_a, lcc_cust_b;
GRANT pgphi_key_auditor TO lcc_auditor;
GRANT pgphi_decrypt, pgphi_encrypt TO lcc_nobody;
SELECT pgphi.create_key('lcc_key') AS lcc_key_id \gset
CREATE TABLE lcc_t (id int PRIMARY KEY, v pgphi.encrypted);
INSERT INTO lcc_t SELECT i, encrypt_phi('value ' || i, 'lcc_key') FROM generate_series(1, 20) i;
SELECT pgphi.rotate_key('lcc_key') AS new_version;
CALL pgphi.reencrypt('lcc_t', 'v');
SELECT pgphi.retire_key_version('lcc_key', 1);

-- Not destroyed yet: refused (55000), as are a version the key does not
-- have, a key that does not exist and a missing version.
SET SESSION AUTHORIZATION lcc_auditor;
SELECT pgphi.destruction_certificate('lcc_key', 1);
SELECT pgphi.destruction_certificate('lcc_key', 2);
SELECT pgphi.destruction_certificate('lcc_key', 9);
SELECT pgphi.destruction_certificate('lcc_nokey', 1);
SELECT pgphi.destruction_certificate('lcc_key', NULL);
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION lcc_cust_a;
SELECT pgphi.approve_destroy('lcc_key', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcc_cust_b;
SELECT pgphi.approve_destroy('lcc_key', 1);
SELECT pgphi.destroy_key('lcc_key', 1);
RESET SESSION AUTHORIZATION;

-- The destroy record keeps the approvals that counted and the check.
SELECT detail ~ '^approved by lcc_cust_a, lcc_cust_b; checked at destruction: 0 values under the version in [0-9]+ columns scanned, 0 columns not scanned$'
       AS destroy_detail
  FROM pgphi.audit_log WHERE key_id = :lcc_key_id AND key_version = 1 AND action = 'destroy';

-- The certificate, as the auditor reads it.
SET SESSION AUTHORIZATION lcc_auditor;
SELECT pgphi.destruction_certificate('lcc_key', 1) AS cert \gset
SELECT c->>'certificate' AS format, c->>'key' AS key, c->'version' AS version, c->>'purpose' AS purpose,
       c->'approved_by' AS approved_by, c->>'destroyed_by' AS destroyed_by,
       c->'no_value_remained' AS no_value_remained,
       c->'check_at_destruction'->'values_found' AS values_found,
       (c->'check_at_destruction'->>'columns_scanned')::int > 0 AS columns_scanned,
       c->'check_at_destruction'->'columns_not_scanned' AS columns_not_scanned,
       c->'retirement'->'ignored_relations' AS ignored_relations,
       c->'signature'->>'provider' AS provider, c->'signature'->>'key' AS mac_key,
       c->'signature'->>'mac' ~ '^local:v1:[0-9a-f]{64}$' AS mac_form
  FROM (SELECT :'cert'::jsonb AS c) s;
-- The times are the catalog's.
SELECT (c->>'destroyed_at')::timestamptz = v.destroyed_at AS destroyed_at,
       (c->>'retired_at')::timestamptz = v.retired_at AS retired_at,
       (c->>'version_created_at')::timestamptz = v.created_at AS created_at
  FROM (SELECT :'cert'::jsonb AS c) s, pgphi.key_inventory v
 WHERE v.key_name = 'lcc_key' AND v.version = 1;
-- Every record it cites is in the chain, at its seq with its hash: the
-- retirement, both approvals and the destruction, in that order.
SELECT r->>'action' AS action, r->>'login_role' AS login_role,
       a.seq IS NOT NULL AS in_chain, a.row_hash = decode(r->>'row_hash', 'hex') AS same_hash,
       a.detail IS NOT DISTINCT FROM r->>'detail' AS same_detail
  FROM jsonb_array_elements(:'cert'::jsonb->'audit_records') WITH ORDINALITY AS e(r, n)
  LEFT JOIN pgphi.audit_log a ON a.seq = (r->>'seq')::bigint AND a.action = r->>'action'
 ORDER BY e.n;
SELECT (c->'check_at_destruction'->>'audit_seq')::bigint = d.seq AS check_is_destroy_record,
       (c->'retirement'->>'audit_seq')::bigint = rt.seq AS retirement_record,
       (SELECT array_agg((x->>'audit_seq')::bigint ORDER BY x->>'approver') FROM jsonb_array_elements(c->'approvals') x)
         = (SELECT array_agg(a.seq ORDER BY a.login_role) FROM pgphi.audit_log a
             WHERE a.key_id = :lcc_key_id AND a.key_version = 1 AND a.action = 'approve_destroy') AS approval_records
  FROM (SELECT :'cert'::jsonb AS c) s,
       pgphi.audit_log d, pgphi.audit_log rt
 WHERE d.key_id = :lcc_key_id AND d.key_version = 1 AND d.action = 'destroy'
   AND rt.key_id = :lcc_key_id AND rt.key_version = 1 AND rt.action = 'retire';
-- Nothing secret: no wrapped DEK, no value.
SELECT :'cert' !~ 'wrapped_dek"|value [0-9]' AS no_secrets;
-- The same answer every time; it verifies.
SELECT pgphi.destruction_certificate('lcc_key', 1) = :'cert' AS same_again;
SELECT pgphi.verify_destruction_certificate(:'cert') AS verifies;
-- One byte changed, wherever: in the MAC, a name, a count, a time, the
-- whitespace; or the signature taken away, or not JSON at all.
SELECT position(needle IN :'cert') > 0 AS found, pgphi.verify_destruction_certificate(
           overlay(:'cert' PLACING replacement FROM position(needle IN :'cert') + offs FOR 1)) AS verifies, what
  FROM (VALUES ('the MAC', (:'cert'::jsonb->'signature'->>'mac'), 20,
                CASE substr(:'cert'::jsonb->'signature'->>'mac', 21, 1) WHEN 'a' THEN 'b' ELSE 'a' END),
               ('an approver', '"lcc_cust_a"', 10, 'c'),
               ('the values found', '"values_found": 0', 16, '1'),
               ('the time of destruction', '"destroyed_at": "', 17, '1'),
               ('a space', '"key": ', 6, E'\t')) AS t(what, needle, offs, replacement);
SELECT pgphi.verify_destruction_certificate((:'cert'::jsonb - 'signature')::text) AS unsigned;
SELECT pgphi.verify_destruction_certificate(jsonb_pretty(:'cert'::jsonb)) AS pretty_printed;
SELECT pgphi.verify_destruction_certificate('not a certificate') AS not_json;
SELECT pgphi.verify_destruction_certificate(left(:'cert', 100)) AS cut_short;
RESET SESSION AUTHORIZATION;

-- Custodians read it too; a role that is neither is refused (42501).
SET SESSION AUTHORIZATION lcc_cust_a;
SELECT pgphi.destruction_certificate('lcc_key', 1) = :'cert' AS custodian_reads_it;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcc_nobody;
SELECT pgphi.destruction_certificate('lcc_key', 1);
SELECT pgphi.verify_destruction_certificate(:'cert');
RESET SESSION AUTHORIZATION;
SELECT has_function_privilege('public', 'pgphi.destruction_certificate(text, integer)', 'EXECUTE') AS public_may,
       has_function_privilege('public', 'pgphi.verify_destruction_certificate(text)', 'EXECUTE') AS public_may_verify;

-- A version retired while ignoring a table that still holds values under
-- it: the check at destruction finds them, and the certificate says that
-- values remained.
SELECT pgphi.create_key('lcc_left') AS lcc_left_id \gset
CREATE TABLE lcc_junk (v pgphi.encrypted);
INSERT INTO lcc_junk SELECT encrypt_phi('left ' || i, 'lcc_left') FROM generate_series(1, 3) i;
SELECT pgphi.rotate_key('lcc_left') AS new_version;
SET SESSION AUTHORIZATION lcc_cust_a;
SELECT pgphi.retire_key_version('lcc_left', 1, ignore_relations => ARRAY['lcc_junk']::regclass[],
                                reason => 'test values, not kept');
SELECT pgphi.approve_destroy('lcc_left', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcc_cust_b;
SELECT pgphi.approve_destroy('lcc_left', 1);
SELECT pgphi.destroy_key('lcc_left', 1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION lcc_auditor;
SELECT pgphi.destruction_certificate('lcc_left', 1) AS left_cert \gset
SELECT c->'no_value_remained' AS no_value_remained, c->'check_at_destruction'->'values_found' AS values_found,
       c->'approved_by' AS approved_by,
       c->'retirement'->>'ignored_relations' ~ '^ignored public\.lcc_junk\.v \(owner [^)]+\): 3 values; reason: test values, not kept$'
         AS ignored_relations,
       (SELECT array_agg(r->>'action' ORDER BY n) FROM jsonb_array_elements(c->'audit_records') WITH ORDINALITY e(r, n))
         AS records
  FROM (SELECT :'left_cert'::jsonb AS c) s;
SELECT pgphi.verify_destruction_certificate(:'left_cert') AS verifies;
RESET SESSION AUTHORIZATION;

-- A destruction without its audit record (a superuser's UPDATE with the
-- audit triggers off, under session_replication_role = replica) gets no
-- certificate: XX001, the log is missing what it must hold.
SELECT pgphi.create_key('lcc_quiet') AS lcc_quiet_id \gset
SELECT pgphi.rotate_key('lcc_quiet') AS new_version;
SELECT pgphi.retire_key_version('lcc_quiet', 1);
SET session_replication_role = replica;
UPDATE pgphi.key_versions SET state = 'destroyed', wrapped_dek = NULL, destroyed_at = now()
 WHERE key_id = :lcc_quiet_id AND version = 1;
RESET session_replication_role;
SELECT count(*) AS destroy_records FROM pgphi.audit_log
 WHERE key_id = :lcc_quiet_id AND key_version = 1 AND action = 'destroy';
SET SESSION AUTHORIZATION lcc_auditor;
SELECT pgphi.destruction_certificate('lcc_quiet', 1);
RESET SESSION AUTHORIZATION;
\set VERBOSITY default
