-- The catalog: every table pgphi keeps.
--
-- Keys and their DEK versions (only wrapped DEKs are stored), per-key grants
-- and the approvals of dual control, the progress of batch conversions, and
-- the audit trail. The tables that are extension configuration are dumped by
-- pg_dump with their rows, so key ids survive a restore (end of this file).
-- Every table but audit_log and audit_anchors also gets the catalog audit
-- triggers (99_catalog_audit_triggers.sql).

CREATE SEQUENCE pgphi.keys_key_id_seq AS integer;

CREATE TABLE pgphi.keys (
    key_id      integer PRIMARY KEY DEFAULT pg_catalog.nextval('pgphi.keys_key_id_seq'),
    name        text NOT NULL UNIQUE
                CHECK (name OPERATOR(pg_catalog.~) '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$'),
    provider    text NOT NULL,
    kek_ref     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  name NOT NULL DEFAULT CURRENT_USER,
    rotated_at  timestamptz,
    -- How long a key version may stay active (NIST SP 800-57 suggests at most
    -- two years for a symmetric data-encryption key; one is the default).
    cryptoperiod interval NOT NULL DEFAULT interval '1 year'
                CHECK (cryptoperiod > interval '0'),
    -- Every key has a purpose, fixed when it is created: 'encryption'
    -- (encrypt_phi, decrypt_phi) or 'blind_index' (pgphi.blind_index). A
    -- blind-index key also fixes its normalisation and length, so that every
    -- caller computes the same index for a value. No function changes them
    -- afterwards.
    purpose     text NOT NULL DEFAULT 'encryption' CHECK (purpose IN ('encryption', 'blind_index')),
    normalization text CHECK (normalization IN ('none', 'trim', 'lower', 'trim_lower', 'digits')),
    index_bytes integer CHECK (index_bytes BETWEEN 8 AND 32),
    -- Containment (suspend_key, 80_lifecycle.sql): the whole key suspended.
    suspended_at timestamptz,
    suspended_by name,
    -- A KEK made for this key alone (create_key(..., dedicated_kek => true)):
    -- once every version is destroyed, pgphi deletes the KEK in the key
    -- manager, or schedules its deletion (KMS), and records when and what
    -- the key manager did. Backups and WAL archives of the catalog then hold
    -- wrapped DEKs that nothing can unwrap.
    kek_dedicated boolean NOT NULL DEFAULT false,
    kek_deleted_at timestamptz,
    kek_deletion text,
    CONSTRAINT keys_blind_index_settings
        CHECK ((purpose = 'blind_index') = (normalization IS NOT NULL)
               AND (purpose = 'blind_index') = (index_bytes IS NOT NULL))
);

ALTER SEQUENCE pgphi.keys_key_id_seq OWNED BY pgphi.keys.key_id;

CREATE TABLE pgphi.key_versions (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    version     integer NOT NULL CHECK (version > 0),
    state       text NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'decrypt_only', 'retired', 'destroyed')),
    wrapped_dek bytea,
    kek_version text,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    retired_at  timestamptz,
    destroyed_at timestamptz,
    -- Containment (80_lifecycle.sql): this version suspended, or marked
    -- compromised (for good: it never encrypts again).
    suspended_at timestamptz,
    suspended_by name,
    compromised_at timestamptz,
    compromised_by name,
    -- Set while pgphi.rekey (40_key_admin.sql) moves the key to another
    -- provider or KEK: the provider and KEK that still wrap this version's
    -- DEK. NULL: the key's own (keys.provider, keys.kek_ref).
    rekey_source_provider text,
    rekey_source_kek text,
    PRIMARY KEY (key_id, version),
    CONSTRAINT key_versions_rekey_source CHECK ((rekey_source_provider IS NULL) = (rekey_source_kek IS NULL)),
    -- A destroyed version has no DEK left; every other state has one.
    CHECK ((state = 'destroyed') = (wrapped_dek IS NULL))
);

-- Every copy of a wrapped DEK stays inside the row, where the shredding at
-- destruction reaches it (80_lifecycle.sql): PLAIN storage is never
-- compressed nor moved to TOAST (a wrapped DEK is at most a few hundred
-- bytes). ANALYZE never samples the column, so no histogram of pg_statistic
-- holds a wrapped DEK.
ALTER TABLE pgphi.key_versions ALTER COLUMN wrapped_dek SET STORAGE PLAIN;
ALTER TABLE pgphi.key_versions ALTER COLUMN wrapped_dek SET STATISTICS 0;

-- encrypt_phi writes under the one active version of a key.
CREATE UNIQUE INDEX key_versions_one_active ON pgphi.key_versions (key_id) WHERE state = 'active';

-- Per-key grants decide which roles may encrypt and decrypt under a key; the
-- coarse roles pgphi_encrypt and pgphi_decrypt still decide who may call the
-- functions at all (70_access_control_and_views.sql).
CREATE TABLE pgphi.key_grants (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    grantee     regrole NOT NULL,
    granted_by  name NOT NULL DEFAULT SESSION_USER,
    granted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    valid_until timestamptz,            -- a time-limited grant (NULL: until revoked)
    PRIMARY KEY (key_id, privilege, grantee)
);

-- Dual control: destroying a key version needs the approval of two different
-- key custodians (approve_destroy), and a grant that reaches a group that of
-- a second custodian (approve_grant), each within the last day.
CREATE TABLE pgphi.destroy_approvals (
    key_id      integer NOT NULL,
    version     integer NOT NULL,
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version, approved_by)
);

CREATE TABLE pgphi.grant_approvals (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    grantee     regrole NOT NULL,
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, privilege, grantee, approved_by)
);

-- A second custodian's approval of moving a key to another provider or KEK
-- (pgphi.approve_rekey): whoever holds a KEK can unwrap the key's DEKs, so
-- one custodian alone cannot hand them to a KEK of their choosing.
CREATE TABLE pgphi.rekey_approvals (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    provider    text NOT NULL,
    kek_ref     text NOT NULL,
    approved_by name NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, provider, kek_ref, approved_by)
);

-- Where each batch conversion (reencrypt, rebuild_blind_index) stands; a
-- CALL that was interrupted continues from next_page. Each conversion
-- belongs to the role that started it (started_by). Row-level security lets
-- only that role see and change its rows; key custodians see every row and
-- may discard one (DELETE), for instance a conversion its role abandoned.
-- Rows from before 0.3.0 have no owner: only custodians and superusers see
-- them.
CREATE TABLE pgphi.reencrypt_progress (
    relation     regclass NOT NULL,
    column_name  name NOT NULL,
    key_id       integer NOT NULL,
    target_version integer NOT NULL,
    next_page    bigint NOT NULL DEFAULT 0,
    total_pages  bigint NOT NULL,
    rows_reencrypted bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at  timestamptz,
    started_by   regrole DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER::pg_catalog.text)),
    PRIMARY KEY (relation, column_name)
);

ALTER TABLE pgphi.reencrypt_progress ENABLE ROW LEVEL SECURITY;

CREATE POLICY own_conversions ON pgphi.reencrypt_progress
    USING (started_by::pg_catalog.oid OPERATOR(pg_catalog.=)
           pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER::pg_catalog.text))::pg_catalog.oid)
    WITH CHECK (started_by::pg_catalog.oid OPERATOR(pg_catalog.=)
                pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER::pg_catalog.text))::pg_catalog.oid);

CREATE POLICY custodians_read ON pgphi.reencrypt_progress FOR SELECT
    USING (pg_catalog.pg_has_role('pgphi_key_custodian'::pg_catalog.name, 'USAGE'::pg_catalog.text));
CREATE POLICY custodians_discard ON pgphi.reencrypt_progress FOR DELETE
    USING (pg_catalog.pg_has_role('pgphi_key_custodian'::pg_catalog.name, 'USAGE'::pg_catalog.text));

-- The audit log: append-only and hash-chained (85_audit.sql). Row n stores
-- the SHA-256 of row n-1's hash and its own content, so an edited, deleted or
-- reordered row breaks the chain where it happened. Identical refusals and
-- failures coalesce into one row: `occurrences` counts them, `first_at` and
-- `last_at` are the first and the last.
CREATE TABLE pgphi.audit_log (
    seq         bigint PRIMARY KEY,
    logged_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    login_role  text NOT NULL DEFAULT SESSION_USER,     -- who connected
    acting_role text NOT NULL,                          -- whose privileges were used
    action      text NOT NULL,
    key_id      integer,
    key_name    text,
    key_version integer,
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'refused', 'failed')),
    detail      text,
    prev_hash   bytea NOT NULL,
    row_hash    bytea NOT NULL,
    occurrences bigint NOT NULL DEFAULT 1 CHECK (occurrences >= 1),
    first_at    timestamptz,
    last_at     timestamptz
);

-- Anchors: the chain's head (seq, row_hash) authenticated by the key manager,
-- with a key the database never holds. Each anchor's MAC also covers the
-- previous anchor's MAC.
CREATE TABLE pgphi.audit_anchors (
    anchor_seq  bigint PRIMARY KEY,
    anchored_at timestamptz NOT NULL,
    audit_seq   bigint NOT NULL,     -- the anchored row of pgphi.audit_log
    audit_hash  bytea NOT NULL,      -- and its row_hash
    provider    text NOT NULL,
    key_ref     text NOT NULL,
    prev_mac    text NOT NULL,       -- the previous anchor's mac ('' for the first)
    mac         text NOT NULL
);

-- Volume: values encrypted and decrypted per role, key and time window
-- (pgphi.key_use_window), counted in shared memory, written by the audit
-- writer every few seconds.
CREATE TABLE pgphi.key_use_stats (
    window_start timestamptz NOT NULL,
    role_name    text NOT NULL,
    key_id       integer NOT NULL,
    encryptions  bigint NOT NULL DEFAULT 0,
    decryptions  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (window_start, role_name, key_id)
);

-- A randomized encryption draws a random 96-bit nonce, so a DEK version may
-- seal only so many values (pgphi.dek_rotation_threshold, hard limit four
-- times that). The counts live in shared memory and in a file of the data
-- directory, which is neither replicated nor complete after a crash. So a
-- version seals only inside a reservation committed here, in WAL: the key
-- broker's reservation worker raises `reserved` ahead of use, and a server
-- that cannot trust its own count (after a crash, a promotion, a base
-- backup) starts the version's count at what was reserved. Each row also
-- names the database that seals under the version: a database copied from
-- it (CREATE DATABASE ... TEMPLATE) finds another database's name there, and
-- must rotate the key before it encrypts at random, or both copies would
-- spend the one budget. A restored dump has no rows (the table is not
-- dumped) and must rotate too. Rows are written by pgphi._generate_wrapped_dek
-- (first reservation, with the new version) and by the reservation worker
-- (src/pg/workers/seal_reservation_worker.cpp), and audited as every catalog change is.
CREATE TABLE pgphi.seal_reservations (
    key_id             integer NOT NULL,
    version            integer NOT NULL,
    database_oid       oid NOT NULL,       -- the database whose values these seals are
    reserved           bigint NOT NULL CHECK (reserved >= 0),
    server_incarnation bigint NOT NULL,    -- which server life made the reservation
    reserved_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version)
);

-- Who a grant to a role covers besides that role: the roles that had its
-- privileges when a custodian made the grant (a group's members then), and
-- those a custodian approved since (approve_grant_member). A role that joins
-- the grantee later, by whoever may add members to it, gets nothing from the
-- grant until then: widening a group is not granting a key.
CREATE TABLE pgphi.key_grant_members (
    key_id      integer NOT NULL REFERENCES pgphi.keys,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    grantee     regrole NOT NULL,
    member      regrole NOT NULL,
    reason      text NOT NULL CHECK (reason IN ('member when granted', 'approved')),
    approved_by name NOT NULL DEFAULT SESSION_USER,
    approved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, privilege, grantee, member)
);

-- Configuration tables: pg_dump dumps their rows (in this order).
SELECT pg_catalog.pg_extension_config_dump('pgphi.keys', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_versions', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.keys_key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_grants', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_use_stats', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.audit_anchors', '');
SELECT pg_catalog.pg_extension_config_dump('pgphi.key_grant_members', '');

-- Privileges on the tables: none for PUBLIC. Key custodians and auditors
-- read what they audit; the batch procedures' callers record progress.
REVOKE ALL ON pgphi.key_grants, pgphi.audit_log, pgphi.key_use_stats, pgphi.audit_anchors,
    pgphi.grant_approvals, pgphi.key_grant_members, pgphi.rekey_approvals FROM PUBLIC;
GRANT SELECT ON pgphi.audit_log, pgphi.key_use_stats, pgphi.audit_anchors TO pgphi_key_auditor;
GRANT SELECT ON pgphi.grant_approvals, pgphi.key_grant_members, pgphi.rekey_approvals TO pgphi_key_custodian, pgphi_key_auditor;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgphi.reencrypt_progress TO pgphi_key_custodian, pgphi_encrypt;
REVOKE ALL ON pgphi.seal_reservations FROM PUBLIC;
GRANT SELECT ON pgphi.seal_reservations TO pgphi_key_auditor;

-- Any committed change to the keys or the grants clears every backend's
-- cached keys and grant checks. ALWAYS: also under session_replication_role
-- = replica (logical replication apply, some restore tools): a missed
-- invalidation would keep a destroyed key alive.
CREATE FUNCTION pgphi._key_catalog_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'pgphi_key_catalog_changed' LANGUAGE C;
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.keys
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
CREATE TRIGGER key_versions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.key_versions
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
CREATE TRIGGER key_grants_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.key_grants
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
ALTER TABLE pgphi.keys ENABLE ALWAYS TRIGGER keys_changed;
ALTER TABLE pgphi.key_versions ENABLE ALWAYS TRIGGER key_versions_changed;
ALTER TABLE pgphi.key_grants ENABLE ALWAYS TRIGGER key_grants_changed;

-- Catalog facts that functions running as their caller need, without
-- giving callers read access to the key catalog.
CREATE FUNCTION pgphi._key_id(name text) RETURNS integer
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT key_id FROM pgphi.keys WHERE keys.name = _key_id.name $$;

CREATE FUNCTION pgphi._key_name(key_id integer) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT name FROM pgphi.keys WHERE keys.key_id = _key_name.key_id $$;

CREATE FUNCTION pgphi._active_version(key_id integer) RETURNS integer
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT version FROM pgphi.key_versions v WHERE v.key_id = _active_version.key_id AND v.state = 'active' $$;

CREATE FUNCTION pgphi._key_purpose(key_id integer) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ SELECT purpose FROM pgphi.keys WHERE keys.key_id = _key_purpose.key_id $$;

GRANT EXECUTE ON FUNCTION pgphi._key_id(text), pgphi._key_name(integer), pgphi._active_version(integer),
    pgphi._key_purpose(integer) TO pgphi_key_custodian, pgphi_encrypt;
