-- Who may encrypt, decrypt, create keys and see the configuration.
CREATE ROLE phi_reader;
CREATE ROLE phi_writer;
CREATE ROLE outsider;
GRANT pgphi_decrypt TO phi_reader;
GRANT pgphi_encrypt TO phi_writer;

CREATE TABLE clinic (id int, ssn pgphi.encrypted);
INSERT INTO clinic SELECT 1, encrypt_phi('123-45-6789', 'ssn_key');
CREATE VIEW clinic_decrypted AS SELECT id, decrypt_phi(ssn, 'ssn_key') AS ssn FROM clinic;
GRANT SELECT ON clinic TO phi_reader, outsider;
GRANT INSERT ON clinic TO phi_writer;
GRANT SELECT ON clinic_decrypted TO phi_reader;

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
-- the cache's tuning is visible.
SHOW pgphi.local_kek_file;
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
SET ROLE phi_writer;
INSERT INTO clinic SELECT 3, encrypt_phi('555-12-3456', 'fresh_key');
RESET ROLE;
RESET search_path;
SELECT k.name FROM clinic c JOIN pgphi.keys k ON k.key_id = (pgphi.ciphertext_info(c.ssn)).key_id
 WHERE c.id = 3;
