-- Installs pgphi and the keys the other suites use.
CREATE EXTENSION pgphi;
-- (A query rather than \dx, whose columns differ between psql versions.)
SELECT e.extname, e.extversion, n.nspname AS schema, obj_description(e.oid, 'pg_extension') AS description
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pgphi';
ALTER DATABASE :"DBNAME" SET search_path = public, pgphi;
SET search_path = public, pgphi;

-- The first local key creates the KEK file, and says so.
SELECT pgphi.create_key('ssn_key');
SELECT pgphi.create_key('name_key');
SELECT pgphi.create_key('notes_key', provider => 'local', kek => 'default');

SELECT key_id, name, provider, kek_ref FROM pgphi.keys ORDER BY key_id;
-- Only the wrapped DEK is stored: 69 bytes for the local provider.
SELECT key_id, version, state, length(wrapped_dek) AS wrapped_bytes,
       kek_version ~ '^[0-9a-f]{16}$' AS kek_fingerprint_recorded
  FROM pgphi.key_versions ORDER BY key_id;
