-- Every kind of bad input gets its own clear error and SQLSTATE, and none
-- echoes plaintext or key bytes.
CREATE TABLE sample AS SELECT encrypt_phi('123-45-6789', 'ssn_key')::bytea AS v;

-- Truncated: inside the header's key reference, then inside the tag.
SELECT decrypt_phi(substring(v FROM 1 FOR 8)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(substring(v FROM 1 FOR length(v) - 1)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
-- Padded.
SELECT decrypt_phi(v || '\x00'::bytea) FROM sample;
\echo :LAST_ERROR_SQLSTATE
-- Empty.
SELECT decrypt_phi(''::bytea);
\echo :LAST_ERROR_SQLSTATE

-- A flipped bit in each field: magic, version, algorithm, key id, key
-- version, nonce, body, tag.
SELECT decrypt_phi(set_byte(v, 0, get_byte(v, 0) # 1)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, 1, get_byte(v, 1) # 2)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, 2, get_byte(v, 2) # 8)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, 6, get_byte(v, 6) # 64)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, 10, get_byte(v, 10) # 4)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, 11, get_byte(v, 11) # 1)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, 25, get_byte(v, 25) # 128)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(set_byte(v, length(v) - 1, get_byte(v, length(v) - 1) # 1)) FROM sample;
\echo :LAST_ERROR_SQLSTATE
-- Pointing the header at another existing key fails. (That the header is
-- authenticated data is shown bit by bit in the unit tests.)
SELECT decrypt_phi(set_byte(v, 6, 2)) FROM sample;
\echo :LAST_ERROR_SQLSTATE

-- Wrong key name, wrong or missing context.
SELECT decrypt_phi(v, 'name_key') FROM sample;
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(encrypt_phi('x', 'ssn_key', 'patient:1'), 'ssn_key', 'patient:2');
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi(encrypt_phi('x', 'ssn_key', 'patient:1'), 'ssn_key');
\echo :LAST_ERROR_SQLSTATE

-- Bytes that are not valid text, or text that is not JSON.
SELECT decrypt_phi(encrypt_phi('\xff00'::bytea, 'ssn_key'));
\echo :LAST_ERROR_SQLSTATE
SELECT decrypt_phi_jsonb(encrypt_phi('not json: 123-45-6789', 'ssn_key'));
\echo :LAST_ERROR_SQLSTATE

-- Keys that do not exist, and bad key definitions; nothing is half-created.
SELECT encrypt_phi('x', 'missing_key');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_key('ssn_key');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_key('bad name!');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_key('hsm_key', provider => 'hsm', kek => 'k1');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_key('other_kek_key', kek => 'other');
\echo :LAST_ERROR_SQLSTATE
SELECT pgphi.create_key('vault_key', provider => 'vault');
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS half_created FROM pgphi.keys WHERE name IN ('hsm_key', 'other_kek_key', 'vault_key');
-- Internal functions are strict: NULL arguments give NULL, not a crash.
SELECT * FROM pgphi._generate_wrapped_dek(NULL, NULL, 9, 1, 'x', true);

-- A damaged wrapped DEK in the catalog is refused when unwrapped. The update
-- also shows that a catalog change reaches this session's key cache at once.
CREATE TABLE names AS SELECT encrypt_phi('cached', 'name_key') AS v;
SELECT decrypt_phi(v) FROM names;
BEGIN;
UPDATE pgphi.key_versions SET wrapped_dek = set_byte(wrapped_dek, 30, get_byte(wrapped_dek, 30) # 1)
 WHERE key_id = 2;
SELECT decrypt_phi(v) FROM names;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
-- An uncommitted change to a key version also stops encryption under it.
BEGIN;
UPDATE pgphi.key_versions SET kek_version = kek_version WHERE key_id = 2;
SELECT encrypt_phi('x', 'name_key');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT decrypt_phi(v) FROM names;

-- A wrapped DEK moved to another key's catalog row does not unwrap.
BEGIN;
UPDATE pgphi.key_versions
   SET wrapped_dek = (SELECT wrapped_dek FROM pgphi.key_versions WHERE key_id = 1)
 WHERE key_id = 2;
SELECT decrypt_phi(v) FROM names;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- A destroyed key version: the DEK is gone, and decrypts say so.
CREATE TABLE doomed AS SELECT encrypt_phi('shredded', 'notes_key') AS v;
BEGIN;
UPDATE pgphi.key_versions SET state = 'destroyed', wrapped_dek = NULL WHERE key_id = 3;
SELECT decrypt_phi(v) FROM doomed;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT decrypt_phi(v) FROM doomed;

-- Overlong names: refused by create_key, and in a catalog row edited by hand.
SELECT pgphi.create_key('long_kek_key', kek => repeat('k', 300));
\echo :LAST_ERROR_SQLSTATE
BEGIN;
UPDATE pgphi.keys SET kek_ref = repeat('k', 300) WHERE key_id = 2;
SELECT decrypt_phi(v) FROM names;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- Bad arguments to the batch procedures, each refused before any change.
CREATE TABLE intake_forms (id int, notes text, card pgphi.encrypted,
                           a_column_name_that_is_more_than_46_characters_long text);
CALL pgphi.reencrypt('intake_forms', 'card', batch_size => 0);
\echo :LAST_ERROR_SQLSTATE
CALL pgphi.reencrypt('intake_forms', 'no_such_column');
\echo :LAST_ERROR_SQLSTATE
CALL pgphi.reencrypt('intake_forms', 'notes');
\echo :LAST_ERROR_SQLSTATE
CALL pgphi.protect_column('intake_forms', 'id', 'ssn_key');
\echo :LAST_ERROR_SQLSTATE
-- (A long column name is no bad input: the shadow column's name is cut to fit.)
CALL pgphi.protect_column('intake_forms', 'a_column_name_that_is_more_than_46_characters_long', 'ssn_key');
SELECT count(*) AS columns_after FROM pg_attribute WHERE attrelid = 'intake_forms'::regclass AND attnum > 0
   AND NOT attisdropped;

-- Approving a destruction takes a key custodian, even for a role that was
-- given EXECUTE on the function directly.
CREATE ROLE not_a_custodian;
GRANT EXECUTE ON FUNCTION pgphi.approve_destroy(text, integer) TO not_a_custodian;
SET SESSION AUTHORIZATION not_a_custodian;
SELECT pgphi.approve_destroy('ssn_key', 1);
\echo :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
REVOKE EXECUTE ON FUNCTION pgphi.approve_destroy(text, integer) FROM not_a_custodian;
DROP ROLE not_a_custodian;
