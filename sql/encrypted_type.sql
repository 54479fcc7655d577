-- The encrypted type accepts nothing but well-formed pgphi ciphertexts.

-- Text input: plaintext, foreign bytes, a cut-off header, bad hex.
SELECT 'hello'::pgphi.encrypted;
\echo :LAST_ERROR_SQLSTATE
SELECT '\x0102'::pgphi.encrypted;
\echo :LAST_ERROR_SQLSTATE
SELECT '\xa701'::pgphi.encrypted;
\echo :LAST_ERROR_SQLSTATE
SELECT '\xzz'::pgphi.encrypted;
\echo :LAST_ERROR_SQLSTATE

CREATE TABLE enc (v pgphi.encrypted);
INSERT INTO enc SELECT encrypt_phi('round trip', 'ssn_key');

-- Plaintext cannot be stored in an encrypted column by mistake.
INSERT INTO enc VALUES ('123-45-6789');
\echo :LAST_ERROR_SQLSTATE
INSERT INTO enc SELECT '123-45-6789'::bytea;
\echo :LAST_ERROR_SQLSTATE
INSERT INTO enc SELECT '123-45-6789'::text;
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS still_one_row FROM enc;

-- Text output and input round-trip (as pg_dump does).
SELECT decrypt_phi((v::text)::pgphi.encrypted) FROM enc;

-- Binary COPY goes through receive/send, and receive validates too.
\getenv abs_builddir PG_ABS_BUILDDIR
\set enc_file :abs_builddir '/results/enc.bin'
\set plain_file :abs_builddir '/results/plain.bin'
COPY enc TO :'enc_file' WITH (FORMAT binary);
CREATE TABLE enc_copy (v pgphi.encrypted);
COPY enc_copy FROM :'enc_file' WITH (FORMAT binary);
SELECT decrypt_phi(v) FROM enc_copy;
CREATE TABLE plain (v bytea);
INSERT INTO plain VALUES ('123-45-6789');
COPY plain TO :'plain_file' WITH (FORMAT binary);
COPY enc_copy FROM :'plain_file' WITH (FORMAT binary);
\echo :LAST_ERROR_SQLSTATE

-- Randomized ciphertexts refuse equality, ordering and hashing (only
-- deterministic values compare; see searchable.sql).
CREATE TABLE enc_pair AS SELECT encrypt_phi('same', 'ssn_key') AS v FROM generate_series(1, 2);
SELECT v = v FROM enc;
\echo :LAST_ERROR_SQLSTATE
SELECT v FROM enc_pair ORDER BY v;
\echo :LAST_ERROR_SQLSTATE
SELECT DISTINCT v FROM enc_pair;
\echo :LAST_ERROR_SQLSTATE
CREATE INDEX ON enc_pair (v);
\echo :LAST_ERROR_SQLSTATE
CREATE INDEX ON enc_pair USING hash (v);
\echo :LAST_ERROR_SQLSTATE

-- Binary-coercible to bytea, in assignment (and explicitly).
SELECT castcontext, castmethod FROM pg_cast
 WHERE castsource = 'pgphi.encrypted'::regtype AND casttarget = 'bytea'::regtype;
SELECT v::bytea = v::bytea AS explicit_bytea_comparison FROM enc;
