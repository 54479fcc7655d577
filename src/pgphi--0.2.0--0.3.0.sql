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

-- encrypt_phi(value, key_name, deterministic, context): VOLATILE, since its
-- randomized form returns a new value at every call (STABLE let the planner
-- run it for its estimates: a plain EXPLAIN spent seals and counted against
-- the key's nonce budget). Its deterministic form stays an index condition:
-- when `deterministic` is the constant true, the planner support function
-- replaces the call by pgphi._encrypt_phi_deterministic, a STABLE twin with
-- the same arguments and C function (src/pg/planner_support.cpp).
CREATE FUNCTION pgphi._encrypt_mode_support(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_mode_support' LANGUAGE C STRICT;
REVOKE ALL ON FUNCTION pgphi._encrypt_mode_support(internal) FROM PUBLIC;

CREATE FUNCTION pgphi._encrypt_phi_deterministic(value text, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_deterministic(value bytea, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION pgphi._encrypt_phi_deterministic(value jsonb, key_name text, deterministic boolean, context text)
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb_mode' LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE OR REPLACE FUNCTION pgphi.encrypt_phi(value text, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_text_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;
CREATE OR REPLACE FUNCTION pgphi.encrypt_phi(value bytea, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_bytea_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;
CREATE OR REPLACE FUNCTION pgphi.encrypt_phi(value jsonb, key_name text, deterministic boolean, context text DEFAULT '')
    RETURNS pgphi.encrypted
    AS 'MODULE_PATHNAME', 'pgphi_encrypt_jsonb_mode' LANGUAGE C VOLATILE STRICT PARALLEL SAFE
    SUPPORT pgphi._encrypt_mode_support;

-- The twins go with encrypting, as encrypt_phi does (see its grants above).
REVOKE ALL ON FUNCTION pgphi._encrypt_phi_deterministic(text, text, boolean, text),
    pgphi._encrypt_phi_deterministic(bytea, text, boolean, text),
    pgphi._encrypt_phi_deterministic(jsonb, text, boolean, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi._encrypt_phi_deterministic(text, text, boolean, text),
    pgphi._encrypt_phi_deterministic(bytea, text, boolean, text),
    pgphi._encrypt_phi_deterministic(jsonb, text, boolean, text) TO pgphi_encrypt;

-- One key broker process per remote key manager (a hung one delays only its
-- own keys): their pids, starts and reloads. pgphi.broker_status() shows the
-- first, which serves the local provider and does the housekeeping.
CREATE FUNCTION pgphi.broker_processes(
        OUT provider text, OUT pid integer, OUT started_at timestamptz,
        OUT restarts integer, OUT config_reloads bigint)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'pgphi_broker_processes' LANGUAGE C VOLATILE PARALLEL SAFE;
REVOKE ALL ON FUNCTION pgphi.broker_processes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.broker_processes() TO pg_monitor;

-- (end of section: broker)



------------------------------------------------------------------------------
-- Last: every table of pgphi's catalog gets the audit triggers, including the
-- tables the sections above add.
------------------------------------------------------------------------------

-- (end of section: audit triggers on every table)
