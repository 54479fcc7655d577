-- The key broker and the shared DEK cache.
--
-- Their state, for monitoring (pg_monitor), and the cache flushes.

CREATE FUNCTION pgphi.cache_stats(
        OUT hits bigint, OUT misses bigint, OUT key_manager_calls bigint,
        OUT key_manager_errors bigint, OUT avg_key_manager_ms double precision,
        OUT refreshes bigint, OUT evictions bigint, OUT expirations bigint,
        OUT entries bigint, OUT pending bigint, OUT capacity bigint, OUT bytes_per_entry bigint)
    AS 'MODULE_PATHNAME', 'pgphi_cache_stats' LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW pgphi.cache_stats AS SELECT * FROM pgphi.cache_stats();

CREATE FUNCTION pgphi.broker_status(
        OUT running boolean, OUT pid integer, OUT started_at timestamptz,
        OUT restarts integer, OUT pending_requests bigint, OUT in_flight bigint,
        OUT config_reloads bigint)
    AS 'MODULE_PATHNAME', 'pgphi_broker_status' LANGUAGE C VOLATILE PARALLEL SAFE;

-- One key broker process per remote key manager (a hung one delays only its
-- own keys): their pids, starts and reloads. pgphi.broker_status() shows the
-- first, which serves the local provider and does the housekeeping.
CREATE FUNCTION pgphi.broker_processes(
        OUT provider text, OUT pid integer, OUT started_at timestamptz,
        OUT restarts integer, OUT config_reloads bigint)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'pgphi_broker_processes' LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE FUNCTION pgphi.flush_cache() RETURNS bigint
    AS 'MODULE_PATHNAME', 'pgphi_flush_cache' LANGUAGE C VOLATILE;
CREATE FUNCTION pgphi._flush_cache_at_commit() RETURNS void
    AS 'MODULE_PATHNAME', 'pgphi_flush_cache_at_commit' LANGUAGE C VOLATILE;

REVOKE ALL ON pgphi.cache_stats FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgphi.cache_stats(), pgphi.broker_status(), pgphi.broker_processes() TO pg_monitor;
GRANT SELECT ON pgphi.cache_stats TO pg_monitor;
