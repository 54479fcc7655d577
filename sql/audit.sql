-- The audit trail: key administration recorded in the same transaction,
-- refusals and volumes through the audit writer, an append-only log whose
-- hash chain exposes tampering, and the key inventory.
CREATE FUNCTION wait_for(condition text) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    ok boolean;
BEGIN
    FOR i IN 1..300 LOOP
        EXECUTE condition INTO ok;
        IF ok THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END $$;

CREATE ROLE audit_custodian;
CREATE ROLE audit_clerk;
CREATE ROLE audit_snoop;
CREATE ROLE audit_reader;
GRANT pgphi_key_custodian TO audit_custodian;
GRANT pgphi_encrypt, pgphi_decrypt TO audit_clerk, audit_snoop;
GRANT pgphi_key_auditor TO audit_reader;

-- Key administration, by a custodian, is in the log at commit.
SET ROLE audit_custodian;
SELECT pgphi.create_key('audited_key') > 0 AS created;
SELECT pgphi.grant_encrypt('audited_key', 'audit_clerk'), pgphi.grant_decrypt('audited_key', 'audit_clerk');
SELECT pgphi.rotate_key('audited_key');
SELECT pgphi.set_cryptoperiod('audited_key', '90 days');
SELECT pgphi.revoke_encrypt('audited_key', 'audit_clerk');
SELECT pgphi.grant_encrypt('audited_key', 'audit_clerk');
RESET ROLE;
SELECT action, key_name, key_version, outcome, login_role = session_user AS by_login, acting_role, detail
  FROM pgphi.audit_log WHERE key_name = 'audited_key' ORDER BY seq;

-- Volume per role and key, and a refused decrypt, arrive through the audit
-- writer within seconds.
CREATE TABLE audited (id int, v pgphi.encrypted);
GRANT SELECT, INSERT ON audited TO audit_clerk, audit_snoop;
SET ROLE audit_clerk;
INSERT INTO audited SELECT g, encrypt_phi('value ' || g, 'audited_key') FROM generate_series(1, 3) g;
SELECT count(decrypt_phi(v)) FROM audited, generate_series(1, 5);
RESET ROLE;
SET ROLE audit_snoop;
SELECT decrypt_phi(v) FROM audited;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT wait_for($$SELECT EXISTS (SELECT FROM pgphi.key_use WHERE role_name = 'audit_clerk'
                                   AND key_name = 'audited_key' AND decryptions = 15)$$) AS volume_recorded;
SELECT role_name, key_name, sum(encryptions) AS encryptions, sum(decryptions) AS decryptions,
       bool_and(window_start = to_timestamp(floor(extract(epoch FROM window_start) / 3600) * 3600)) AS hourly_windows
  FROM pgphi.key_use WHERE key_name = 'audited_key' GROUP BY 1, 2;
SELECT wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE acting_role = 'audit_snoop')$$) AS refusal_recorded;
SELECT action, key_name, key_version, outcome, acting_role, detail
  FROM pgphi.audit_log WHERE acting_role = 'audit_snoop';
-- A value that fails authentication (tampered, or the wrong context) is
-- evidence too.
SELECT decrypt_phi(v, 'audited_key', 'another row') FROM audited WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SELECT wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE outcome = 'failed'
                                   AND key_name = 'audited_key')$$) AS failure_recorded;
SELECT action, key_name, key_version, outcome, acting_role, detail
  FROM pgphi.audit_log WHERE outcome = 'failed' AND key_name = 'audited_key';
SELECT queued_events, dropped_events, dropped_counts FROM pgphi.audit_queue_status();

-- The auditor reads the log, the volumes and the inventory, and verifies.
SET ROLE audit_reader;
SELECT count(*) > 0 AS reads_log FROM pgphi.audit_log;
SELECT count(*) > 0 AS reads_volume FROM pgphi.key_use;
SELECT key_name, version, state, cryptoperiod, rotate_by IS NOT NULL AS has_deadline, rotation_overdue,
       encrypt_grantees, decrypt_grantees
  FROM pgphi.key_inventory WHERE key_name = 'audited_key' ORDER BY version;
SELECT intact, problem FROM pgphi.verify_audit_log();
SELECT decrypt_phi(v) FROM audited;
\echo :LAST_ERROR_SQLSTATE
INSERT INTO pgphi.audit_log (acting_role, action, outcome, prev_hash, row_hash) VALUES ('x', 'x', 'ok', '', '');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- A version past its cryptoperiod is overdue for rotation.
SET ROLE audit_custodian;
SELECT pgphi.set_cryptoperiod('audited_key', '1 microsecond');
SELECT key_name, version, state, rotation_overdue FROM pgphi.key_inventory
 WHERE key_name = 'audited_key' ORDER BY version;
SELECT pgphi.set_cryptoperiod('no_such_key', '1 day');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- Append-only, even for the superuser that owns it.
UPDATE pgphi.audit_log SET detail = 'edited' WHERE seq = 1;
\echo :LAST_ERROR_SQLSTATE
DELETE FROM pgphi.audit_log WHERE seq = 1;
\echo :LAST_ERROR_SQLSTATE
TRUNCATE pgphi.audit_log;
\echo :LAST_ERROR_SQLSTATE

-- A superuser's direct DML on the key catalog is audited too, under actions
-- of its own that name every changed column (here rolled back).
BEGIN;
SELECT max(seq) AS seq_before_dml FROM pgphi.audit_log \gset
UPDATE pgphi.key_grants SET grantee = 'audit_snoop'
 WHERE grantee = 'audit_clerk'::regrole AND privilege = 'decrypt';
UPDATE pgphi.keys SET name = 'renamed_key' WHERE name = 'audited_key';
SELECT action, key_name, outcome, detail FROM pgphi.audit_log
 WHERE action LIKE 'catalog%' AND seq > :seq_before_dml ORDER BY seq;
ROLLBACK;

-- Nor can the superuser just switch the guards off: DDL on pgphi's tables
-- is refused (42501) outside the extension's scripts, and each attempt is
-- recorded (through the audit writer, since the refused transaction aborts).
\set SHOW_CONTEXT never
ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_no_change;
\echo :LAST_ERROR_SQLSTATE
\set SHOW_CONTEXT errors
SELECT wait_for($$SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE action = 'catalog_ddl')$$) AS refusal_recorded;
SELECT login_role, action, outcome, detail FROM pgphi.audit_log WHERE action = 'catalog_ddl';

-- Tampering by a superuser who disables the guards (pgphi's event trigger
-- first, which no trigger sees) is detected: an edited row, a deleted row,
-- two rows swapped, and rows cut from the end (which needs a head hash
-- recorded earlier).
SELECT wait_for($$SELECT queued_events = 0 FROM pgphi.audit_queue_status()$$) AS queue_empty;
SELECT head_hash AS recorded_head FROM pgphi.verify_audit_log() \gset
CREATE TEMP TABLE saved AS SELECT * FROM pgphi.audit_log;
ALTER EVENT TRIGGER pgphi_guard_catalog_ddl DISABLE;
ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_no_change;
ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_chain;

UPDATE pgphi.audit_log SET acting_role = 'someone_else' WHERE seq = 3;
SELECT intact, first_bad_seq, problem FROM pgphi.verify_audit_log();
UPDATE pgphi.audit_log a SET acting_role = s.acting_role FROM saved s WHERE a.seq = s.seq AND s.seq = 3;
SELECT intact FROM pgphi.verify_audit_log();

DELETE FROM pgphi.audit_log WHERE seq = 3;
SELECT intact, first_bad_seq, problem FROM pgphi.verify_audit_log();
INSERT INTO pgphi.audit_log SELECT * FROM saved WHERE seq = 3;
SELECT intact FROM pgphi.verify_audit_log();

UPDATE pgphi.audit_log SET seq = -3 WHERE seq = 3;
UPDATE pgphi.audit_log SET seq = 3 WHERE seq = 4;
UPDATE pgphi.audit_log SET seq = 4 WHERE seq = -3;
SELECT intact, first_bad_seq, problem FROM pgphi.verify_audit_log();
UPDATE pgphi.audit_log a SET seq = -s.seq FROM saved s WHERE a.row_hash = s.row_hash AND s.seq IN (3, 4);
UPDATE pgphi.audit_log SET seq = -seq WHERE seq < 0;
SELECT intact FROM pgphi.verify_audit_log();

DELETE FROM pgphi.audit_log WHERE seq = (SELECT max(seq) FROM pgphi.audit_log);
SELECT intact, problem IS NULL AS no_problem_seen FROM pgphi.verify_audit_log();
SELECT intact, problem FROM pgphi.verify_audit_log(:'recorded_head');
INSERT INTO pgphi.audit_log SELECT * FROM saved WHERE seq = (SELECT max(seq) FROM saved);

ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_no_change;
ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
ALTER EVENT TRIGGER pgphi_guard_catalog_ddl ENABLE ALWAYS;
SELECT intact, problem FROM pgphi.verify_audit_log(:'recorded_head');

-- Anchored by the key manager, a cut end is found without a head hash
-- recorded by hand. The anchors are append-only too.
SELECT audit_seq = (SELECT max(seq) FROM pgphi.audit_log) AS head_anchored,
       mac LIKE 'local:v1:%' AS local_mac FROM pgphi.anchor_audit_log();
SELECT intact, problem FROM pgphi.verify_audit_log();
CREATE TEMP TABLE saved_again AS SELECT * FROM pgphi.audit_log;
ALTER EVENT TRIGGER pgphi_guard_catalog_ddl DISABLE;
ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_no_change;
ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_chain;
-- (From the anchored row on: events still on their way may land after it.)
DELETE FROM pgphi.audit_log WHERE seq >= (SELECT max(audit_seq) FROM pgphi.audit_anchors);
SELECT intact, problem ~ '^row \d+ was anchored \(anchor \d+\) but the chain ends at row \d+: rows were removed from its end$'
       AS cut_end_found FROM pgphi.verify_audit_log();
INSERT INTO pgphi.audit_log SELECT * FROM saved_again s
 WHERE NOT EXISTS (SELECT FROM pgphi.audit_log l WHERE l.seq = s.seq) ORDER BY s.seq;
ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_no_change;
ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
ALTER EVENT TRIGGER pgphi_guard_catalog_ddl ENABLE ALWAYS;
SELECT intact FROM pgphi.verify_audit_log();
DELETE FROM pgphi.audit_anchors;
\echo :LAST_ERROR_SQLSTATE
SET ROLE audit_reader;
SELECT count(*) > 0 AS reads_anchors FROM pgphi.audit_anchors;
SELECT anchor_seq > 0 AS anchors FROM pgphi.anchor_audit_log();
RESET ROLE;
