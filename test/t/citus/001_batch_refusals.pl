# Batch procedures on Citus tables: refused (feature_not_supported, naming the
# table) where they would only see the coordinator's empty shell, and counts
# of a key version's values taken on every shard (key_version_usage, so
# retire_key_version). Before, reencrypt found "no encrypted values" in the
# shell and reported success.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use CitusTest;

my ($coordinator, @workers) = CitusTest::new_cluster();
$coordinator->safe_psql('postgres', q{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn');
	SELECT pgphi.create_blind_index_key('ssn_index');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted, ssn_plain text, ssn_bidx bytea);
	SELECT create_distributed_table('patients', 'id');
	CREATE TABLE clinics (id int PRIMARY KEY, phone bytea);
	SELECT create_reference_table('clinics');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i), 'ssn-' || i
	  FROM generate_series(1, 200) i;
	INSERT INTO clinics SELECT i, pgphi.encrypt_phi('555-' || i, 'ssn') FROM generate_series(1, 5) i;
});
is($coordinator->safe_psql('postgres', q{SELECT pg_relation_size('patients')}), '0',
	'the coordinator holds no rows of the distributed table: they are in its shards');

my %calls = (
	'pgphi.reencrypt' => q{CALL pgphi.reencrypt('patients', 'ssn', context_column => 'mrn')},
	'pgphi.protect_column' => q{CALL pgphi.protect_column('patients', 'ssn_plain', 'ssn')},
	'pgphi.rebuild_blind_index' => q{CALL pgphi.rebuild_blind_index('patients', 'ssn_bidx', 'ssn_plain', 'ssn_index')},
);
for my $procedure (sort keys %calls)
{
	like(PgphiTest::psql_error($coordinator, 'postgres', $calls{$procedure}),
		qr/0A000: \Q$procedure\E does not support Citus distributed table public.patients/,
		"$procedure on a distributed table: refused with 0A000, naming the table");
}
like(PgphiTest::psql_error($coordinator, 'postgres', q{CALL pgphi.reencrypt('clinics', 'phone')}),
	qr/0A000: pgphi.reencrypt does not support Citus reference table public.clinics/,
	'reencrypt on a reference table: refused');
is($coordinator->safe_psql('postgres', q{SELECT count(*) FROM pg_attribute
	WHERE attrelid = 'patients'::regclass AND attname LIKE '%pgphi%' AND NOT attisdropped}), '0',
	'the refused protect_column added no shadow column');
is($coordinator->safe_psql('postgres', q{SELECT count(*) FROM patients WHERE ssn_bidx IS NOT NULL}), '0',
	'... and no blind index was written');

# Counts on every shard: 200 in the distributed table, 5 in the reference
# table (once, not once per copy).
$coordinator->safe_psql('postgres', q{SELECT pgphi.rotate_key('ssn')});
is($coordinator->safe_psql('postgres', q{SELECT relation, column_name, "values", not_scanned
	FROM pgphi.key_version_usage('ssn', 1) ORDER BY relation::text}),
	"clinics|phone|5|\npatients|ssn|200|", 'key_version_usage counts the values in every shard');
like(PgphiTest::psql_error($coordinator, 'postgres', q{SELECT pgphi.retire_key_version('ssn', 1)}),
	qr/55006: pgphi key "ssn" version 1 is still used by 205 values/,
	'retire_key_version refuses while shards hold values under the version');
# On a worker, which holds shards of its own: the shards are counted through
# their table, not twice.
is($workers[0]->safe_psql('postgres', q{SELECT string_agg(relation::text || '=' || "values", ',' ORDER BY relation::text)
	FROM pgphi.key_version_usage('ssn', 1)}),
	'clinics=5,patients=200', 'on a worker too: each table counted once, its shards skipped');

done_testing();
