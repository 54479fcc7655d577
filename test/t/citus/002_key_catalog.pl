# One key catalog on every node (src/sql/87_citus.sql): the seed's patients
# scenario on a distributed table. Keys, versions and grants made on the
# coordinator reach the workers with the same ids, in the same transaction;
# decrypt_phi runs on the workers (pushed down with the shard queries) as the
# user who issued the query, so an ungranted role is refused there; a
# rotation and a revocation reach every node; key administration on a
# worker is refused; a node added later gets the catalog (citus_sync), shards
# moved onto it still decrypt; each node's audit chain verifies.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use CitusTest;

my ($coordinator, @workers) = CitusTest::new_cluster();
is($coordinator->safe_psql('postgres', 'SELECT pgphi.citus_setup()'), '0', 'citus_setup on an empty catalog');

$coordinator->safe_psql('postgres', q{
	SELECT pgphi.create_key('ssn_key'), pgphi.create_key('name_key');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted, full_name pgphi.encrypted);
	SELECT create_distributed_table('patients', 'id');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi(format('%s-45-6789', 100 + i), 'ssn_key', 'MRN-' || i),
	       pgphi.encrypt_phi('Patient ' || i, 'name_key', 'MRN-' || i)
	  FROM generate_series(1, 1000) i;
	CREATE ROLE clinician LOGIN;
	CREATE ROLE billing_clerk LOGIN;
	GRANT pgphi_decrypt TO clinician, billing_clerk;
	GRANT SELECT ON patients TO clinician, billing_clerk;
	SELECT pgphi.grant_decrypt('ssn_key', 'clinician'), pgphi.grant_decrypt('name_key', 'clinician');
});

# The same catalog on every node: ids, versions, wrapped DEKs, grants by name.
my $catalog = q{SELECT k.key_id, k.name, v.version, v.state, encode(sha256(v.wrapped_dek), 'hex')
	FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) ORDER BY 1, 3};
my $grants = q{SELECT key_id, privilege, grantee::text FROM pgphi.key_grants ORDER BY 1, 2, 3};
my $expected_catalog = $coordinator->safe_psql('postgres', $catalog);
my $expected_grants = $coordinator->safe_psql('postgres', $grants);
like($expected_grants, qr/clinician/, 'the coordinator holds the grants');
for my $worker (@workers)
{
	is($worker->safe_psql('postgres', $catalog), $expected_catalog, $worker->name . ' has the same keys and versions');
	is($worker->safe_psql('postgres', $grants), $expected_grants, $worker->name . ' has the same grants');
}

# Every value decrypts, on the workers.
my $all = q{SELECT count(*) FROM patients
	WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) = format('%s-45-6789', 100 + id)
	  AND pgphi.decrypt_phi(full_name, 'name_key', mrn) = 'Patient ' || id};
is($coordinator->safe_psql('postgres', "SET ROLE clinician; $all"), '1000', 'the clinician decrypts every value');
my $plan = $coordinator->safe_psql('postgres', "SET ROLE clinician; EXPLAIN (VERBOSE, COSTS OFF) $all");
like($plan, qr/Task Count: 8/, 'the scan runs on the 8 shards');
like($plan, qr/decrypt_phi\(.*patients_\d+/s, '... with decrypt_phi in the shard queries (pushed down)');
my $placements = q{SELECT count(DISTINCT p.groupid) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid)
	WHERE s.logicalrelid = 'patients'::regclass};
is($coordinator->safe_psql('postgres', $placements), '2', 'both workers hold shards of patients');

# An ungranted role: refused on the worker, as itself (Citus connects to the
# workers as the user who issued the query).
my $refused = PgphiTest::psql_error($coordinator, 'postgres',
	q{SET ROLE billing_clerk; SELECT pgphi.decrypt_phi(ssn, 'ssn_key', mrn) FROM patients});
like($refused, qr/42501: permission denied to decrypt with pgphi key "ssn_key"/,
	'the billing clerk is refused: 42501');
like($refused, qr/while executing command on 127\.0\.0\.1:\d+/, '... by a worker');
my $worker_logs = join('', map { slurp_file($_->logfile) } @workers);
like($worker_logs, qr/42501 .*ERROR:  permission denied to decrypt with pgphi key "ssn_key"/,
	'the worker logged the refusal');
is($coordinator->safe_psql('postgres',
		q{SET ROLE billing_clerk; SELECT count(*) FROM patients WHERE ssn IS NOT NULL}), '1000',
	'... while the ciphertext columns it may read still read');

# A rotation reaches every node in one transaction.
$coordinator->safe_psql('postgres', q{
	SELECT pgphi.rotate_key('ssn_key');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi(format('%s-45-6789', 100 + i), 'ssn_key', 'MRN-' || i),
	       pgphi.encrypt_phi('Patient ' || i, 'name_key', 'MRN-' || i)
	  FROM generate_series(1001, 1100) i;
});
$expected_catalog = $coordinator->safe_psql('postgres', $catalog);
like($expected_catalog, qr/ssn_key\|2\|active/, 'version 2 of ssn_key is active on the coordinator');
is($_->safe_psql('postgres', $catalog), $expected_catalog, $_->name . ' follows the rotation') for @workers;
is($coordinator->safe_psql('postgres', "SET ROLE clinician; $all"), '1100',
	'values under both versions decrypt on the workers');
is($coordinator->safe_psql('postgres', q{SELECT string_agg(version || ':' || "values", ',' ORDER BY version)
	FROM (SELECT 1 AS version, u."values" FROM pgphi.key_version_usage('ssn_key', 1) u
	      UNION ALL SELECT 2, u."values" FROM pgphi.key_version_usage('ssn_key', 2) u) s}),
	'1:1000,2:100', 'key_version_usage counts each version across the shards');

# A rotation that fails on the coordinator changes no node.
$coordinator->psql('postgres', q{BEGIN; SELECT pgphi.rotate_key('name_key'); SELECT 1/0; COMMIT;});
is($_->safe_psql('postgres', $catalog), $expected_catalog, $_->name . ': an aborted rotation left nothing behind')
  for @workers;

# A revocation reaches the workers' sessions.
$coordinator->safe_psql('postgres', q{SELECT pgphi.revoke_decrypt('name_key', 'clinician')});
like(PgphiTest::psql_error($coordinator, 'postgres', "SET ROLE clinician; $all"),
	qr/42501: permission denied to decrypt with pgphi key "name_key"/, 'after revoke_decrypt the workers refuse');
$coordinator->safe_psql('postgres', q{SELECT pgphi.grant_decrypt('name_key', 'clinician')});

# Keys are administered on the coordinator only.
like(PgphiTest::psql_error($workers[0], 'postgres', q{SELECT pgphi.create_key('worker_key')}),
	qr/0A000: pgphi keys are administered on the Citus coordinator/, 'create_key on a worker: refused');
like(PgphiTest::psql_error($workers[0], 'postgres', q{SELECT pgphi.revoke_decrypt('ssn_key', 'clinician')}),
	qr/0A000: pgphi keys are administered on the Citus coordinator/, 'revoke_decrypt on a worker: refused');

# A node added later: citus_sync gives it the catalog, then shards move to it.
my $worker3 = CitusTest::add_worker($coordinator, 'worker3');
is($coordinator->safe_psql('postgres', q{SELECT string_agg(success::text, ',') FROM pgphi.citus_sync()}),
	'true,true,true,true', 'citus_sync on every node');
is($worker3->safe_psql('postgres', $catalog), $coordinator->safe_psql('postgres', $catalog),
	'the new worker has the catalog');
is($worker3->safe_psql('postgres', $grants), $coordinator->safe_psql('postgres', $grants),
	'... and the grants');
$coordinator->safe_psql('postgres', q{SELECT rebalance_table_shards('patients', shard_transfer_mode => 'block_writes')});
is($coordinator->safe_psql('postgres', $placements), '3', 'the rebalancer moved shards to the new worker');
is($coordinator->safe_psql('postgres', "SET ROLE clinician; $all"), '1100', 'after the move every value decrypts');
$coordinator->safe_psql('postgres', q{SELECT pgphi.rotate_key('name_key')});
is($worker3->safe_psql('postgres', $catalog), $coordinator->safe_psql('postgres', $catalog),
	'a later rotation reaches the new worker');

# Retirement reaches every node; destruction is refused in a cluster (Citus
# commits the workers with two-phase commit, which cannot carry shredding),
# and the version stays retired everywhere.
$coordinator->safe_psql('postgres', q{
	SELECT pgphi.create_key('old_key'); SELECT pgphi.rotate_key('old_key');
	SELECT pgphi.retire_key_version('old_key', 1);
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_destroy('old_key', 1); RESET SESSION AUTHORIZATION;
});
like(PgphiTest::psql_error($coordinator, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_destroy('old_key', 1); SELECT pgphi.destroy_key('old_key', 1)}),
	qr/0A000: pgphi cannot destroy key versions in a Citus cluster yet/, 'destroy_key in a cluster: refused');
is($_->safe_psql('postgres', q{SELECT v.state FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'old_key' AND v.version = 1}), 'retired', $_->name . ': the version stays retired')
  for ($coordinator, @workers, $worker3);

# Each node keeps its own audit chain; all of them verify.
is($coordinator->safe_psql('postgres', q{SELECT count(*) FROM pgphi.citus_verify_audit_logs() WHERE success
	AND result LIKE '(t,%'}), '4', 'every node\'s audit chain verifies');
like($workers[0]->safe_psql('postgres', q{SELECT string_agg(detail, E'\n') FROM pgphi.audit_log
	WHERE action = 'catalog_insert'}), qr/copied from the Citus coordinator/,
	'a worker\'s trail records the catalog rows it copied from the coordinator');

done_testing();
