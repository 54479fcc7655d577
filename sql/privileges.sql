-- Who may encrypt, decrypt, administer keys, audit and see the configuration.
CREATE ROLE phi_reader;
CREATE ROLE phi_writer;
CREATE ROLE outsider;
CREATE ROLE custodian_one;
CREATE ROLE custodian_two;
CREATE ROLE auditor;
GRANT pgphi_decrypt TO phi_reader;
GRANT pgphi_encrypt TO phi_writer;
GRANT pgphi_key_custodian TO custodian_one, custodian_two;
GRANT pgphi_key_auditor TO auditor;

CREATE TABLE clinic (id int, ssn pgphi.encrypted);
INSERT INTO clinic SELECT 1, encrypt_phi('123-45-6789', 'ssn_key');
CREATE VIEW clinic_decrypted AS SELECT id, decrypt_phi(ssn, 'ssn_key') AS ssn FROM clinic;
GRANT SELECT ON clinic TO phi_reader, outsider, custodian_one, auditor;
GRANT INSERT ON clinic TO phi_writer;
GRANT SELECT ON clinic_decrypted TO phi_reader;

-- A new key has no grants: membership in pgphi_decrypt is not enough.
SET ROLE phi_reader;
SELECT decrypt_phi(ssn) FROM clinic;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- Custodians grant keys, but not to themselves, a role they belong to, or
-- the custodian and auditor groups.
SET SESSION AUTHORIZATION custodian_one;
SELECT pgphi.grant_decrypt('ssn_key', 'phi_reader') AS granted,
       pgphi.grant_encrypt('ssn_key', 'phi_writer') AS granted,
       pgphi.grant_decrypt('ssn_key', 'phi_reader') AS granted_again;
SELECT pgphi.grant_decrypt('ssn_key', 'custodian_one');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('ssn_key', 'pgphi_key_custodian');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('ssn_key', 'pgphi_key_auditor');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.grant_decrypt('no_such_key', 'phi_reader');
\echo :LAST_ERROR_SQLSTATE
-- Shadowing pg_has_role in a schema of the caller's does not help.
RESET SESSION AUTHORIZATION;
CREATE SCHEMA custodian_trap AUTHORIZATION custodian_one;
SET SESSION AUTHORIZATION custodian_one;
CREATE FUNCTION custodian_trap.pg_has_role(name, oid, text) RETURNS boolean LANGUAGE sql AS 'SELECT false';
SET search_path = custodian_trap, pg_catalog, public, pgphi;
SELECT pgphi.grant_decrypt('ssn_key', 'custodian_one');
\echo :LAST_ERROR_SQLSTATE
RESET search_path;
-- ... and a custodian cannot decrypt.
SELECT pgphi.decrypt_phi(ssn) FROM clinic;
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
DROP SCHEMA custodian_trap CASCADE;

-- Another custodian may grant a custodian a key, which then is its own.
SET SESSION AUTHORIZATION custodian_two;
SELECT pgphi.grant_decrypt('ssn_key', 'custodian_one');
RESET SESSION AUTHORIZATION;
SELECT pgphi.has_key_privilege('custodian_one', 'ssn_key', 'decrypt') AS custodian_one_may_decrypt;
SELECT pgphi.revoke_decrypt('ssn_key', 'custodian_one') AS revoked;

-- The auditor reads the inventory and cannot decrypt.
SET ROLE auditor;
SELECT key_name, version, state, encrypt_grantees, decrypt_grantees
  FROM pgphi.key_inventory WHERE key_name = 'ssn_key';
SELECT pgphi.decrypt_phi(ssn) FROM clinic;
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM pgphi.key_versions;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- The authorized reader decrypts through the view and directly, but cannot encrypt.
SET ROLE phi_reader;
SELECT * FROM clinic_decrypted;
SELECT decrypt_phi(ssn) FROM clinic;
SELECT encrypt_phi('x', 'ssn_key');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- The writer encrypts but cannot read back.
SET ROLE phi_writer;
INSERT INTO clinic SELECT 2, encrypt_phi('987-65-4321', 'ssn_key');
SELECT decrypt_phi(encrypt_phi('x', 'ssn_key'));
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- Everyone else sees ciphertext at most.
SET ROLE outsider;
SELECT * FROM clinic_decrypted;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(ssn) FROM clinic;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) FROM clinic;
SELECT * FROM pgphi.keys;
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM pgphi.key_versions;
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_key('outsider_key');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM pgphi._generate_wrapped_dek('local', 'default', 100, 1, 'x', false);
\echo :LAST_ERROR_SQLSTATE
-- Settings that say where secrets live are hidden from non-superusers; only
-- the cache's tuning is visible. (PostgreSQL's wording of the refusal differs
-- between major versions, so only its SQLSTATE is shown.)
\set VERBOSITY sqlstate
SHOW pgphi.local_kek_file;
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
SELECT name AS visible_pgphi_settings FROM pg_settings WHERE name LIKE 'pgphi.%' ORDER BY name;
RESET ROLE;
SELECT name, setting, context FROM pg_settings WHERE name LIKE 'pgphi.%' ORDER BY name;

-- Object shadowing: a caller's own "=" operator on text, first in its
-- search_path, must not take part in pgphi's key lookups.
CREATE SCHEMA trap;
GRANT USAGE, CREATE ON SCHEMA trap TO phi_writer;
SET ROLE phi_writer;
CREATE FUNCTION trap.always_equal(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'shadowing operator called';
    RETURN true;
END $$;
CREATE OPERATOR trap.= (LEFTARG = text, RIGHTARG = text, FUNCTION = trap.always_equal);
SET search_path = trap, pg_catalog, public, pgphi;
RESET ROLE;
SELECT pgphi.create_key('fresh_key') > 0 AS created;  -- clears key caches
SELECT pgphi.grant_encrypt('fresh_key', 'phi_writer');
SET ROLE phi_writer;
INSERT INTO clinic SELECT 3, encrypt_phi('555-12-3456', 'fresh_key');
RESET ROLE;
RESET search_path;
SELECT k.name FROM clinic c JOIN pgphi.keys k ON k.key_id = (pgphi.ciphertext_info(c.ssn)).key_id
 WHERE c.id = 3;

-- Grants and revocations reach a session at its next statement, and so do
-- changes to role membership.
CREATE ROLE clinicians;
CREATE ROLE nurse;
GRANT pgphi_decrypt TO nurse;
GRANT SELECT ON clinic TO nurse;
SELECT pgphi.grant_decrypt('ssn_key', 'clinicians');
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
-- A grant covers the members its grantee has when it is made, not those
-- added later (who may add members is not who may grant keys).
GRANT clinicians TO nurse;
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
-- The nurse joined clinicians after the grant: a custodian approves it.
SELECT pgphi.has_key_privilege('nurse', 'ssn_key', 'decrypt');
SELECT pgphi.approve_grant_member('ssn_key', 'decrypt', 'clinicians', 'nurse');
SELECT pgphi.has_key_privilege('nurse', 'ssn_key', 'decrypt');
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
RESET ROLE;
SELECT pgphi.revoke_decrypt('ssn_key', 'clinicians');
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
-- A grant made now covers the nurse, a member by then.
SELECT pgphi.grant_decrypt('ssn_key', 'clinicians');
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
RESET ROLE;
SELECT member, reason FROM pgphi.key_grant_members WHERE grantee = 'clinicians'::regrole;
SELECT pgphi.revoke_decrypt('ssn_key', 'clinicians');
SELECT count(*) FROM pgphi.key_grant_members WHERE grantee = 'clinicians'::regrole;
SELECT pgphi.grant_decrypt('ssn_key', 'nurse');
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
RESET ROLE;
REVOKE pgphi_decrypt FROM nurse;
SET ROLE nurse;
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- A view for authorized roles, in one call.
CREATE TABLE ward (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted, notes bytea, diagnosis pgphi.encrypted);
INSERT INTO ward
    SELECT 1, 'MRN-1', encrypt_phi('123-45-6789', 'ssn_key', '1'), encrypt_phi('seen'::bytea, 'ssn_key', '1'),
           encrypt_phi('J45', 'ssn_key', '1');
SELECT pgphi.create_decrypted_view('ward', 'ward_for_nurse', 'nurse',
                                   columns => ARRAY['ssn', 'diagnosis'], key_name => 'ssn_key',
                                   context_column => 'id');
GRANT pgphi_decrypt TO nurse;
SET ROLE nurse;
SELECT id, mrn, ssn, diagnosis, length(notes) AS notes_ciphertext_bytes FROM ward_for_nurse;
SELECT * FROM ward;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
-- The view decrypts with the reader's rights: without a key grant, nothing.
CREATE ROLE temp_staff;
GRANT pgphi_decrypt TO temp_staff;
SELECT pgphi.create_decrypted_view('ward', 'ward_for_temp', 'temp_staff', key_name => 'ssn_key',
                                   context_column => 'id');
SET ROLE temp_staff;
SELECT id, mrn FROM ward_for_temp;
SELECT ssn FROM ward_for_temp;
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
SELECT pgphi.create_decrypted_view('ward', 'ward_bad', 'temp_staff', columns => ARRAY['mrn']);
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_decrypted_view('ward', 'ward_bad', 'temp_staff', context_column => 'id');
\echo :LAST_ERROR_SQLSTATE

-- Plaintext only over TLS: this suite connects over a Unix-domain socket.
SET pgphi.plaintext_transport = 'tls';
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
\echo :LAST_ERROR_SQLSTATE
SET pgphi.plaintext_transport = 'tls_or_local';
SELECT decrypt_phi(ssn) FROM clinic WHERE id = 1;
RESET pgphi.plaintext_transport;
SET ROLE nurse;
SET pgphi.plaintext_transport = 'any';
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;
