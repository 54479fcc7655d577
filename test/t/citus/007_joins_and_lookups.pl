# Searchable columns on Citus: deterministic values join co-located across
# distributed tables (each shard joins its own rows), and blind-index
# lookups route to one shard when the table is distributed by the blind
# index, or use each shard's index otherwise. Every answer is checked
# against the plaintext.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use CitusTest;

my ($coordinator, @workers) = CitusTest::new_cluster();
my $rows = 2000;
$coordinator->safe_psql('postgres', qq{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn_det');
	SELECT pgphi.create_blind_index_key('ssn_index');
	-- Two tables distributed by the deterministic ciphertext of the SSN, co-located.
	CREATE TABLE patients (ssn pgphi.encrypted NOT NULL, id int NOT NULL, mrn text NOT NULL);
	CREATE TABLE claims (ssn pgphi.encrypted NOT NULL, claim_id int NOT NULL, amount int NOT NULL);
	SELECT create_distributed_table('patients', 'ssn');
	SELECT create_distributed_table('claims', 'ssn', colocate_with => 'patients');
	INSERT INTO patients SELECT pgphi.encrypt_phi(format('%s-45-6789', 100 + i), 'ssn_det', true), i, 'MRN-' || i
	  FROM generate_series(1, $rows) i;
	-- Three claims for every even patient.
	INSERT INTO claims SELECT pgphi.encrypt_phi(format('%s-45-6789', 100 + i), 'ssn_det', true), i * 10 + c, c
	  FROM generate_series(2, $rows, 2) i, generate_series(1, 3) c;
	-- A blind index beside a randomized column: one table distributed by id,
	-- one by the index.
	CREATE TABLE visits (id int PRIMARY KEY, ssn pgphi.encrypted, ssn_bidx bytea);
	CREATE INDEX ON visits (ssn_bidx);
	SELECT create_distributed_table('visits', 'id');
	INSERT INTO visits SELECT i, pgphi.encrypt_phi(format('%s-45-6789', 100 + i), 'ssn_det', 'visit-' || i),
	       pgphi.blind_index(format('%s-45-6789', 100 + i), 'ssn_index')
	  FROM generate_series(1, 10 * $rows) i;
	CREATE TABLE visits_by_ssn (ssn_bidx bytea NOT NULL, id int NOT NULL, ssn pgphi.encrypted);
	SELECT create_distributed_table('visits_by_ssn', 'ssn_bidx');
	INSERT INTO visits_by_ssn SELECT ssn_bidx, id, ssn FROM visits;
	ANALYZE patients, claims, visits, visits_by_ssn;
});

# --- co-located joins on the deterministic column ----------------------------------

my $join = q{SELECT count(*), count(DISTINCT p.id), sum(c.amount) FROM patients p JOIN claims c ON c.ssn OPERATOR(pgphi.=) p.ssn};
is($coordinator->safe_psql('postgres', $join), join('|', 3 * $rows / 2, $rows / 2, 6 * $rows / 2),
	'the join on the deterministic ciphertext finds every claim of every patient');
my $plan = $coordinator->safe_psql('postgres', "EXPLAIN (COSTS OFF, VERBOSE) $join");
like($plan, qr/Task Count: 8/, 'it runs as 8 shard-to-shard joins');
unlike($plan, qr/repartition|MapMergeJob|intermediate result/i, '... with no data moved between nodes');
is($coordinator->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(p.ssn, 'ssn_det') || ' ' || p.mrn
	FROM patients p JOIN claims c ON c.ssn OPERATOR(pgphi.=) p.ssn WHERE c.claim_id = 423}), '142-45-6789 MRN-42',
	'a joined row decrypts to its patient');
# A lookup by value: Citus routes an equality on the distribution column to
# one shard when the value is known at planning, so the value is computed
# first and passed as a parameter (encrypt_phi in the WHERE clause would run
# on every shard).
my $value = $coordinator->safe_psql('postgres', q{SELECT pgphi.encrypt_phi('1100-45-6789', 'ssn_det', true)});
my $lookup = qq{PREPARE by_ssn(pgphi.encrypted) AS SELECT id FROM patients WHERE ssn OPERATOR(pgphi.=) \$1;
	%s EXECUTE by_ssn('$value')};
is($coordinator->safe_psql('postgres', sprintf($lookup, '')), '1000', 'a lookup by deterministic value finds the patient');
like($coordinator->safe_psql('postgres', sprintf($lookup, 'EXPLAIN (COSTS OFF)')), qr/Task Count: 1\b/,
	'... on one shard');

# --- blind-index lookups ------------------------------------------------------------------

my $by_index = q{SELECT id, pgphi.decrypt_phi(ssn, 'ssn_det', 'visit-' || id) FROM %s
	WHERE ssn_bidx = pgphi.blind_index('1337-45-6789', 'ssn_index')};
is($coordinator->safe_psql('postgres', sprintf($by_index, 'visits')), '1237|1337-45-6789',
	'a blind-index lookup on a table distributed by id finds the row');
$plan = $coordinator->safe_psql('postgres', 'SET citus.explain_all_tasks = on; EXPLAIN (COSTS OFF) '
	  . sprintf($by_index, 'visits'));
like($plan, qr/Task Count: 8/, '... asking every shard');
my $index_scans = () = $plan =~ /Index Scan using visits_ssn_bidx_idx_\d+|Bitmap Index Scan on visits_ssn_bidx_idx_\d+/g;
is($index_scans, 8, '... each through its shard\'s index') or diag($plan);
# Distributed by the blind index: computed first, the lookup goes to one shard.
my $token = $coordinator->safe_psql('postgres', q{SELECT pgphi.blind_index('1337-45-6789', 'ssn_index')});
my $routed = qq{PREPARE by_index(bytea) AS SELECT id, pgphi.decrypt_phi(ssn, 'ssn_det', 'visit-' || id)
	FROM visits_by_ssn WHERE ssn_bidx = \$1; %s EXECUTE by_index('$token')};
is($coordinator->safe_psql('postgres', sprintf($routed, '')), '1237|1337-45-6789',
	'on a table distributed by the blind index, the lookup finds the row');
like($coordinator->safe_psql('postgres', sprintf($routed, 'EXPLAIN (COSTS OFF)')), qr/Task Count: 1\b/,
	'... on the one shard that holds it');

done_testing();
