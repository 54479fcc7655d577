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

------------------------------------------------------------------------------
-- Anchors: the chain's head (seq, row_hash) authenticated by the key
-- manager, with a key the database never holds (the local provider: an
-- HMAC key derived from its KEK, computed by the key broker). Made on a
-- schedule (pgphi.audit_anchor_interval, when the chain changed) and on
-- demand (pgphi.anchor_audit_log()), stored here and written to the server
-- log. Each anchor's MAC also covers the previous anchor's MAC.
------------------------------------------------------------------------------

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
SELECT pg_catalog.pg_extension_config_dump('pgphi.audit_anchors', '');

CREATE FUNCTION pgphi._audit_anchors_are_append_only() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'pgphi.audit_anchors is append-only'
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Audit anchors cannot be updated, deleted or truncated.';
END
$$;
CREATE TRIGGER audit_anchors_no_change BEFORE UPDATE OR DELETE ON pgphi.audit_anchors
    FOR EACH ROW EXECUTE FUNCTION pgphi._audit_anchors_are_append_only();
CREATE TRIGGER audit_anchors_no_truncate BEFORE TRUNCATE ON pgphi.audit_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._audit_anchors_are_append_only();
ALTER TABLE pgphi.audit_anchors ENABLE ALWAYS TRIGGER audit_anchors_no_change;
ALTER TABLE pgphi.audit_anchors ENABLE ALWAYS TRIGGER audit_anchors_no_truncate;

-- Anchors the head now, unless the last anchor covers it; returns the anchor.
-- It reads the head itself: it MACs nothing it is given.
CREATE FUNCTION pgphi.anchor_audit_log(OUT anchor_seq bigint, OUT audit_seq bigint, OUT audit_hash text,
        OUT mac text)
    AS 'MODULE_PATHNAME', 'pgphi_anchor_audit_log'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION pgphi._verify_audit_anchor(anchor_seq bigint, anchored_at timestamptz, audit_seq bigint,
        audit_hash bytea, prev_mac text, provider text, key_ref text, mac text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'pgphi_verify_audit_anchor' LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION pgphi._audit_anchor_last_known() RETURNS bigint
    AS 'MODULE_PATHNAME', 'pgphi_audit_anchor_last_known' LANGUAGE C VOLATILE;

CREATE FUNCTION pgphi._audit_chain_changed() RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_audit_chain_changed' LANGUAGE C VOLATILE;

-- Numbers and chains each new row, and tells the scheduled anchoring that
-- this database's chain moved. The advisory lock (keyed by the table's oid)
-- serialises writers until they commit, so the chain cannot fork.
CREATE OR REPLACE FUNCTION pgphi._audit_log_chain() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last record;
BEGIN
    PERFORM pg_advisory_xact_lock('pgphi.audit_log'::regclass::oid::integer, 0);
    SELECT a.seq, a.row_hash INTO last FROM pgphi.audit_log a ORDER BY a.seq DESC LIMIT 1;
    NEW.seq := coalesce(last.seq, 0) + 1;
    NEW.logged_at := coalesce(NEW.logged_at, now());
    NEW.prev_hash := coalesce(last.row_hash, '\x'::bytea);
    NEW.row_hash := pgphi._audit_row_hash(NEW.prev_hash, NEW);
    PERFORM pgphi._audit_chain_changed();
    RETURN NEW;
END
$$;

-- Walks the chain, then checks every anchor with the key manager: anchors
-- numbered without gaps, each following the previous one's MAC, each MAC
-- authentic, and each anchored row present with the anchored hash. So rows
-- removed from the end, a TRUNCATE, and a chain rewritten or re-hashed up
-- to an anchored row are found without a head hash recorded by hand. Pass
-- a head_hash recorded earlier to check against it as well.
CREATE OR REPLACE FUNCTION pgphi.verify_audit_log(recorded_head text DEFAULT NULL,
        OUT intact boolean, OUT rows_checked bigint, OUT first_bad_seq bigint, OUT problem text,
        OUT head_seq bigint, OUT head_hash text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r pgphi.audit_log;
    a record;
    prev bytea := '\x';
    recorded_found boolean := recorded_head IS NULL;
    next_anchor bigint := 1;
    prev_mac text := '';
    last_known bigint;
BEGIN
    intact := true;
    rows_checked := 0;
    FOR r IN SELECT * FROM pgphi.audit_log ORDER BY seq LOOP
        IF r.seq <> rows_checked + 1 THEN
            problem := format('row %s is missing', rows_checked + 1);
            first_bad_seq := rows_checked + 1;
        ELSIF r.prev_hash <> prev THEN
            problem := format('row %s does not follow row %s: rows were removed or reordered', r.seq, r.seq - 1);
            first_bad_seq := r.seq;
        ELSIF r.row_hash <> pgphi._audit_row_hash(r.prev_hash, r) THEN
            problem := format('row %s was changed after it was written', r.seq);
            first_bad_seq := r.seq;
        END IF;
        IF problem IS NOT NULL THEN
            intact := false;
            RETURN;
        END IF;
        rows_checked := rows_checked + 1;
        prev := r.row_hash;
        recorded_found := recorded_found OR encode(r.row_hash, 'hex') = lower(recorded_head);
    END LOOP;
    head_seq := rows_checked;
    head_hash := encode(prev, 'hex');

    FOR a IN SELECT an.*, l.row_hash AS chain_hash
               FROM pgphi.audit_anchors an LEFT JOIN pgphi.audit_log l ON l.seq = an.audit_seq
              ORDER BY an.anchor_seq LOOP
        IF a.anchor_seq <> next_anchor THEN
            problem := format('audit anchor %s is missing: anchors were removed', next_anchor);
        ELSIF a.prev_mac <> prev_mac THEN
            problem := format('audit anchor %s does not follow anchor %s: anchors were removed or replaced',
                              a.anchor_seq, a.anchor_seq - 1);
        ELSIF NOT pgphi._verify_audit_anchor(a.anchor_seq, a.anchored_at, a.audit_seq, a.audit_hash, a.prev_mac,
                                             a.provider, a.key_ref, a.mac) THEN
            problem := format('audit anchor %s is not authentic: the key manager does not vouch for its MAC',
                              a.anchor_seq);
        ELSIF a.chain_hash IS NULL THEN
            problem := format('row %s was anchored (anchor %s) but the chain ends at row %s: rows were removed '
                              'from its end', a.audit_seq, a.anchor_seq, rows_checked);
            first_bad_seq := rows_checked + 1;
        ELSIF a.chain_hash <> a.audit_hash THEN
            problem := format('row %s does not match anchor %s: the chain up to it was rewritten',
                              a.audit_seq, a.anchor_seq);
            first_bad_seq := a.audit_seq;
        END IF;
        IF problem IS NOT NULL THEN
            intact := false;
            RETURN;
        END IF;
        next_anchor := a.anchor_seq + 1;
        prev_mac := a.mac;
    END LOOP;
    last_known := pgphi._audit_anchor_last_known();
    IF last_known >= next_anchor THEN
        intact := false;
        problem := format('audit anchors %s to %s were made by this server and are missing: anchors were removed',
                          next_anchor, last_known);
        RETURN;
    END IF;

    IF NOT recorded_found THEN
        intact := false;
        problem := 'the recorded head hash is not in the chain: rows were removed from its end, or the chain was rewritten';
    END IF;
END
$$;

REVOKE ALL ON pgphi.audit_anchors FROM PUBLIC;
REVOKE ALL ON FUNCTION pgphi._audit_anchors_are_append_only(), pgphi.anchor_audit_log(),
    pgphi._verify_audit_anchor(bigint, timestamptz, bigint, bytea, text, text, text, text),
    pgphi._audit_anchor_last_known(), pgphi._audit_chain_changed() FROM PUBLIC;
GRANT SELECT ON pgphi.audit_anchors TO pgphi_key_auditor;
GRANT EXECUTE ON FUNCTION pgphi.anchor_audit_log() TO pgphi_key_custodian, pgphi_key_auditor;

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
