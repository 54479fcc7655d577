-- pgphi's SQL, by concern: the schema and the roles.
--
-- The files in src/sql/ hold the current definition of every object of the
-- extension, each exactly once, grouped by concern; `make sql` concatenates them
-- in the order of their numbers into the install script of the version in
-- progress (src/pgphi--<default_version>.sql). See src/sql/README.md for how
-- to add or change an object: edit its file here AND write the step into the
-- update script in progress (src/pgphi--<previous>--<version>.sql), so that
-- new and updated databases get the same objects.

-- A schema "pgphi" that existed before CREATE EXTENSION is adopted by it; it
-- must then belong to a superuser, or its owner could tamper with the key
-- catalog's surroundings.
DO $schema$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n
              JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
             WHERE n.nspname OPERATOR(pg_catalog.=) 'pgphi') THEN
        RAISE EXCEPTION 'schema pgphi exists and is not owned by a superuser'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Drop the schema, or have a superuser own it, before CREATE EXTENSION pgphi.';
    END IF;
END
$schema$;

-- Roles that hold the coarse privileges. They are cluster-wide and outlive the
-- extension (another database may have created them), so they are created
-- only when missing, and an existing one is refused if it can log in.
-- pgphi_key_auditor reads the key inventory and the audit trail and cannot
-- decrypt (grants of keys to it are refused).
DO $roles$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['pgphi_encrypt', 'pgphi_decrypt', 'pgphi_key_custodian', 'pgphi_key_auditor'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) role_name) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', role_name);
        ELSIF (SELECT rolcanlogin OR rolsuper FROM pg_catalog.pg_roles
                WHERE rolname OPERATOR(pg_catalog.=) role_name) THEN
            RAISE EXCEPTION 'role % exists and can log in', role_name
                USING ERRCODE = 'duplicate_object',
                      HINT = 'pgphi grants privileges to this role; it must be a NOLOGIN group role.';
        END IF;
    END LOOP;
END
$roles$;

GRANT USAGE ON SCHEMA pgphi TO PUBLIC;
