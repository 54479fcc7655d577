# The batch procedures on Citus tables, shard by shard (docs/citus.md):
# reencrypt, rebuild_blind_index and protect_column on a distributed and on a
# reference table run their batches on each shard, on the node that holds it,
# as the caller; the coordinator's progress counts shards, and a run stopped
# by a node that went away resumes where it stopped. What pgphi cannot do is
# refused (the distribution column), and an ungranted caller is refused by
# the worker with the worker's SQLSTATE. Counts of a key version's values are
# taken on every shard (key_version_usage, so retire_key_version).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use PgphiTest;
use CitusTest;

my ($coordinator, @workers) = CitusTest::new_cluster();
$coordinator->safe_psql('postgres', q{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn');
	SELECT pgphi.create_blind_index_key('ssn_index');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted, full_name text, ssn_bidx bytea);
	SELECT create_distributed_table('patients', 'id');
	CREATE TABLE clinics (id int PRIMARY KEY, phone bytea, name text);
	SELECT create_reference_table('clinics');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i), 'Patient ' || i
	  FROM generate_series(1, 2000) i;
	INSERT INTO clinics SELECT i, pgphi.encrypt_phi('555-' || i, 'ssn'), 'Clinic ' || i FROM generate_series(1, 5) i;
	CREATE ROLE app LOGIN;
	GRANT pgphi_encrypt, pgphi_decrypt TO app;
	ALTER TABLE patients OWNER TO app;   -- protect_column alters the table
	ALTER TABLE clinics OWNER TO app;
	SELECT pgphi.grant_encrypt('ssn', 'app'), pgphi.grant_decrypt('ssn', 'app');
	SELECT pgphi.grant_encrypt('ssn_index', 'app');
	CREATE ROLE clerk LOGIN;
	GRANT pgphi_encrypt, pgphi_decrypt TO clerk;
	GRANT SELECT, UPDATE ON patients TO clerk;
});
is($coordinator->safe_psql('postgres', q{SELECT pg_relation_size('patients')}), '0',
	'the coordinator holds no rows of the distributed table: they are in its shards');
my $all = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn, 'ssn', mrn) = 'ssn-' || id};

# Usage counts on every shard: 2000 in the distributed table, 5 in the
# reference table (once, not once per copy).
$coordinator->safe_psql('postgres', q{SELECT pgphi.rotate_key('ssn')});
my $usage = q{SELECT string_agg(relation::text || '.' || column_name || '=' || "values", ',' ORDER BY relation::text)
	FROM pgphi.key_version_usage('ssn', 1)};
is($coordinator->safe_psql('postgres', $usage), 'clinics.phone=5,patients.ssn=2000',
	'key_version_usage counts the values in every shard');
like(PgphiTest::psql_error($coordinator, 'postgres', q{SELECT pgphi.retire_key_version('ssn', 1)}),
	qr/55006: pgphi key "ssn" version 1 is still used by 2005 values/,
	'retire_key_version refuses while shards hold values under the version');
is($workers[0]->safe_psql('postgres', $usage), 'clinics.phone=5,patients.ssn=2000',
	'on a worker too: each table counted once, its shards skipped');

# reencrypt, stopped by a worker that goes away: the shards before it are
# done and kept; called again, it resumes at the shard that failed. (The key
# is named: otherwise the run starts by reading a value through Citus, which
# fails at once with Citus's own connection error.)
$workers[1]->stop('immediate');
my $stopped = PgphiTest::psql_error($coordinator, 'postgres',
	q{SET SESSION AUTHORIZATION app; CALL pgphi.reencrypt('patients', 'ssn', 100, 'mrn', 'ssn')});
like($stopped, qr/08000: pgphi could not run a batch on Citus node 127\.0\.0\.1:\d+/,
	'a worker down: the run stops with 08000, naming the node');
my $progress = q{SELECT next_page || '/' || total_pages || ' ' || (finished_at IS NOT NULL)
	FROM pgphi.reencrypt_progress WHERE relation = 'patients'::regclass AND column_name = 'ssn'};
like($coordinator->safe_psql('postgres', $progress), qr{^[1-7]/8 false$},
	'the coordinator\'s progress counts the shards done');
$workers[1]->start;
my ($out, $err) = ('', '');
$coordinator->psql('postgres', q{SET SESSION AUTHORIZATION app; CALL pgphi.reencrypt('patients', 'ssn', 100, 'mrn')},
	stdout => \$out, stderr => \$err, on_error_stop => 1);
like($err, qr/resuming re-encryption of public\.patients\.ssn at shard [1-7] of 8/, 'called again, it resumes');
like($err, qr/shard 8 of 8 \(public\.patients_\d+ on 127\.0\.0\.1:\d+\) done, \d+ values changed/,
	'... reporting each shard');
is($coordinator->safe_psql('postgres', $progress), '8/8 true', 'every shard done');
is($coordinator->safe_psql('postgres', q{SELECT rows_reencrypted FROM pgphi.reencrypt_progress
	WHERE relation = 'patients'::regclass}), '2000', 'the coordinator counts the values of every shard');

# The reference table: every node's copy.
$coordinator->psql('postgres', q{SET SESSION AUTHORIZATION app; CALL pgphi.reencrypt('clinics', 'phone', 2)},
	stderr => \$err, on_error_stop => 1);
is(scalar(() = $err =~ /shard 1 of 1 \(public\.clinics_\d+ on 127\.0\.0\.1:\d+\) done, 5 values changed/g), 3,
	'the reference table: each of its three copies re-encrypted');
is($coordinator->safe_psql('postgres', $usage), '', 'no value is left under version 1');
is($coordinator->safe_psql('postgres', q{SELECT pgphi.retire_key_version('ssn', 1)}), '', 'so it retires');
is($coordinator->safe_psql('postgres', "SET SESSION AUTHORIZATION app; $all"), '2000', 'every value decrypts');
for my $node ($coordinator, @workers)
{
	is($node->safe_psql('postgres', q{SET citus.enable_manual_changes_to_shards = off;
		SELECT count(*) FROM clinics WHERE pgphi.decrypt_phi(phone) = '555-' || id}), '5',
		'the reference table decrypts from ' . $node->name);
}

# rebuild_blind_index: the index is filled on the shards, lookups route.
$coordinator->safe_psql('postgres', q{SET SESSION AUTHORIZATION app;
	CALL pgphi.rebuild_blind_index('patients', 'ssn_bidx', 'ssn', 'ssn_index', 100, 'mrn')});
is($coordinator->safe_psql('postgres', q{SELECT count(*) FROM patients WHERE ssn_bidx IS NULL}), '0',
	'rebuild_blind_index filled every row');
is($coordinator->safe_psql('postgres', q{SELECT id FROM patients WHERE ssn_bidx = pgphi.blind_index('ssn-1234', 'ssn_index')}),
	'1234', 'a blind-index lookup finds its row');

# protect_column of a plaintext column, with inserts through the coordinator
# meanwhile: the trigger on every shard encrypts them (on the workers).
like(PgphiTest::psql_error($coordinator, 'postgres', q{CALL pgphi.protect_column('patients', 'id', 'ssn')}),
	qr/0A000: pgphi.protect_column cannot encrypt column "id", the distribution column of Citus table public.patients/,
	'the distribution column: refused');
my $writer = IPC::Run::start([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $coordinator->connstr('postgres'),
	'-c', q{DO $$ BEGIN FOR i IN 2001..2300 LOOP
		INSERT INTO patients (id, mrn, ssn, full_name) VALUES (i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i), 'Patient ' || i);
		PERFORM pg_sleep(0.01); END LOOP; END $$} ], '>', \my $w_out, '2>', \my $w_err, IPC::Run::timeout(180));
$coordinator->psql('postgres',
	q{SET SESSION AUTHORIZATION app; CALL pgphi.protect_column('patients', 'full_name', 'ssn', 200, 'mrn')},
	stderr => \$err, on_error_stop => 1);
like($err, qr/column "full_name" of public\.patients is now encrypted with pgphi key "ssn"/, 'protect_column finished');
$writer->finish;
is($w_err, '', 'the concurrent inserts all succeeded');
is($coordinator->safe_psql('postgres', q{SELECT format_type(atttypid, NULL) FROM pg_attribute
	WHERE attrelid = 'patients'::regclass AND attname = 'full_name'}), 'pgphi.encrypted', 'the column is encrypted');
is($coordinator->safe_psql('postgres', q{SET SESSION AUTHORIZATION app;
	SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(full_name, 'ssn', mrn) = 'Patient ' || id), count(*) FROM patients}),
	'2300|2300', 'every row, old and inserted meanwhile, decrypts to its name');
# The workers sealed under their own reservations, which their brokers raised.
for my $worker (@workers)
{
	ok($worker->safe_psql('postgres', q{SELECT max(reserved) FROM pgphi.seal_reservations
		WHERE database_oid = (SELECT oid FROM pg_database WHERE datname = current_database())}) > 0,
		$worker->name . ' encrypted under a seal reservation of its own');
}
$coordinator->safe_psql('postgres', q{SET SESSION AUTHORIZATION app;
	CALL pgphi.protect_column('clinics', 'name', 'ssn', 2)});
is($coordinator->safe_psql('postgres', q{SELECT count(*) FROM clinics WHERE pgphi.decrypt_phi(name) = 'Clinic ' || id}),
	'5', 'protect_column of a reference table');

# A caller without a key grant: each worker refuses it, and the coordinator
# raises the worker's SQLSTATE, naming the node and the shard (last: the
# refused run stays the clerk's, for the clerk to resume).
$coordinator->safe_psql('postgres', q{SELECT pgphi.rotate_key('ssn')});
my $refused = PgphiTest::psql_error($coordinator, 'postgres',
	q{SET SESSION AUTHORIZATION clerk; CALL pgphi.reencrypt('patients', 'ssn', 100, 'mrn')});
like($refused, qr/42501: permission denied to (?:en|de)crypt with pgphi key "ssn"/, 'an ungranted caller: 42501');
like($refused, qr/Raised on Citus node 127\.0\.0\.1:\d+, in shard public\.patients_\d+/, '... raised on a worker');
like(slurp_file($workers[0]->logfile) . slurp_file($workers[1]->logfile),
	qr/permission denied to (?:en|de)crypt with pgphi key "ssn"/, '... which logged it');

done_testing();
