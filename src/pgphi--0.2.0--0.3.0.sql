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

-- (end of section: broker)



------------------------------------------------------------------------------
-- Last: every table of pgphi's catalog gets the audit triggers, including the
-- tables the sections above add.
------------------------------------------------------------------------------

-- (end of section: audit triggers on every table)
