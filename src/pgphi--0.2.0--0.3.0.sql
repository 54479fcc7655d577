-- pgphi 0.2.0 -> 0.3.0 (in progress). 0.2.0 is released: its scripts never
-- change again, and a new installation of 0.3.0 runs the chain 0.1.0, 0.2.0,
-- this one, so fresh and upgraded databases get exactly the same objects.
--
-- 0.3.0 closes what the security review of 0.2.0 found. Each section below is
-- one class of finding; an object changed here is changed in full (CREATE OR
-- REPLACE), so its current definition is the last one in the chain.
\echo Use "ALTER EXTENSION pgphi UPDATE" to load this file. \quit

------------------------------------------------------------------------------
-- Caller-privilege SQL resolves nothing through the caller's search_path.
------------------------------------------------------------------------------

-- (end of section: search_path)



------------------------------------------------------------------------------
-- Crypto-shredding and the states of a key version.
------------------------------------------------------------------------------

-- (end of section: version states)



------------------------------------------------------------------------------
-- Every change to pgphi's catalogs is audited, by whatever path.
------------------------------------------------------------------------------

-- (end of section: catalog audit)



------------------------------------------------------------------------------
-- Audit events: coalesced, counted, never silently lost; anchored chain.
------------------------------------------------------------------------------

-- Identical refusals and failures coalesce into one row: `occurrences` counts
-- them, `first_at` and `last_at` are the first and the last. Rows written
-- before 0.3.0 (and rows of one occurrence without times) read as one
-- occurrence; their hash is computed as before, so old chains still verify.
ALTER TABLE pgphi.audit_log
    ADD COLUMN occurrences bigint NOT NULL DEFAULT 1 CHECK (occurrences >= 1),
    ADD COLUMN first_at timestamptz,
    ADD COLUMN last_at timestamptz;

-- The hashed form of a row: a JSON array, whose text form PostgreSQL writes
-- the same way every time, with times in UTC microseconds. A row that is
-- one occurrence without first and last times is hashed exactly as 0.2.0
-- did; any other row also hashes its count and both times (so changing any
-- of them, or turning a coalesced row into a plain one, breaks the chain).
CREATE OR REPLACE FUNCTION pgphi._audit_row_hash(prev_hash bytea, r pgphi.audit_log) RETURNS bytea
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(prev_hash || convert_to(
        CASE WHEN r.occurrences = 1 AND r.first_at IS NULL AND r.last_at IS NULL THEN
            jsonb_build_array(
                r.seq, to_char(r.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                r.login_role, r.acting_role, r.action, r.key_id, r.key_name, r.key_version,
                r.outcome, r.detail)
        ELSE
            jsonb_build_array(
                r.seq, to_char(r.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                r.login_role, r.acting_role, r.action, r.key_id, r.key_name, r.key_version,
                r.outcome, r.detail, r.occurrences,
                to_char(r.first_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                to_char(r.last_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        END::text, 'UTF8'))
$$;

-- Coalesced events from shared memory, written by the audit writer: the
-- 0.2.0 form plus how many identical events the row stands for, and when
-- the first and the last of them happened.
CREATE FUNCTION pgphi._record_audit_event(logged_at timestamptz, login_role text, acting_role text,
        action text, key_id integer, key_name text, key_version integer, outcome text, detail text,
        occurrences bigint, first_at timestamptz, last_at timestamptz)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgphi.audit_log (logged_at, login_role, acting_role, action, key_id, key_name, key_version,
                                 outcome, detail, occurrences, first_at, last_at)
    VALUES (logged_at, login_role, acting_role, action, nullif(key_id, 0), nullif(key_name, ''),
            nullif(key_version, 0), outcome, detail, occurrences, first_at, last_at)
$$;
REVOKE ALL ON FUNCTION pgphi._record_audit_event(timestamptz, text, text, text, integer, text, integer, text,
    text, bigint, timestamptz, timestamptz) FROM PUBLIC;

-- overflow_events: events recorded only as counts per role and action
-- because too many distinct events were waiting at once.
DROP FUNCTION pgphi.audit_queue_status();
CREATE FUNCTION pgphi.audit_queue_status(OUT queued_events integer, OUT dropped_events bigint,
        OUT dropped_counts bigint, OUT overflow_events bigint)
    AS 'MODULE_PATHNAME', 'pgphi_audit_queue_status' LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION pgphi.audit_queue_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.audit_queue_status() TO pgphi_key_auditor, pg_monitor;

-- (end of section: audit events)



------------------------------------------------------------------------------
-- Least privilege, and retirement that nobody can block.
------------------------------------------------------------------------------

-- (end of section: privileges)



------------------------------------------------------------------------------
-- Plaintext is never derived for storage without a client asking.
------------------------------------------------------------------------------

-- (end of section: plaintext)



------------------------------------------------------------------------------
-- Broker and workers.
------------------------------------------------------------------------------

-- (end of section: broker)



------------------------------------------------------------------------------
-- Last: every table of pgphi's catalog gets the audit triggers, including the
-- tables the sections above add.
------------------------------------------------------------------------------

-- (end of section: audit triggers on every table)
