# A streaming-replication standby decrypts everything the primary wrote,
# follows rotations, retirements and destructions there, and refuses to create keys or
# encrypt randomized values (the primary counts what each DEK seals). It does
# compute deterministic values and blind indexes, which use no nonce, so that
# lookups run on standbys too.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $primary = PgphiTest::new_node('primary', allows_streaming => 1);
$primary->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn');
	SELECT pgphi.create_blind_index_key('ssn_index');
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted, ssn_det pgphi.encrypted, ssn_bidx bytea);
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'ssn'),
	       pgphi.encrypt_phi('ssn-' || i, 'ssn', deterministic => true), pgphi.blind_index('ssn-' || i, 'ssn_index')
	  FROM generate_series(1, 1000) i;
	CREATE INDEX ON patients (ssn_det);
	CREATE INDEX ON patients (ssn_bidx);
});
# The local KEK file lives in the data directory, so the base backup carries
# it to the standby (a key manager would serve both instead).
$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
# The test framework copies the backup without file modes (pg_basebackup
# keeps 0600); pgphi refuses a KEK file others can read, so restore the mode.
chmod 0600, $standby->data_dir . '/pgphi_local.kek';
$standby->start;
$primary->wait_for_catchup($standby);

my $all = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn, 'ssn') = 'ssn-' || id};
is($standby->safe_psql('postgres', $all), '1000', 'the standby decrypts every value');
is($standby->safe_psql('postgres', 'SELECT running FROM pgphi.broker_status()'), 't',
	'the key broker runs on the standby');

like(PgphiTest::psql_error($standby, 'postgres', q{SELECT pgphi.create_key('other')}),
	qr/25006: cannot execute INSERT in a read-only transaction/, 'creating a key on the standby fails: read-only');
like(PgphiTest::psql_error($standby, 'postgres', q{SELECT pgphi.encrypt_phi('x', 'ssn')}),
	qr/25006: cannot encrypt with pgphi on a standby/, 'encrypting on the standby fails: read-only');

# Lookups by deterministic value and by blind index, through the indexes.
my $by_det = q{SELECT id FROM patients
	WHERE ssn_det OPERATOR(pgphi.=) pgphi.encrypt_phi('ssn-42', 'ssn', deterministic => true)};
is($standby->safe_psql('postgres', $by_det), '42', 'the standby finds a row by its deterministic value');
like($standby->safe_psql('postgres', "EXPLAIN (COSTS OFF) $by_det"), qr/Index Scan (using|on) patients_ssn_det_idx/,
	'... through the index');
is($standby->safe_psql('postgres', q{SELECT id FROM patients
	WHERE ssn_bidx = pgphi.blind_index('ssn-43', 'ssn_index')}), '43', 'the standby finds a row by its blind index');

# A rotation on the primary reaches a standby session that holds the old key.
my $reader = $standby->background_psql('postgres', on_error_stop => 0);
is($reader->query_safe($all), '1000', 'a standby session with warm caches');
$primary->safe_psql('postgres', q{
	SELECT pgphi.rotate_key('ssn');
	INSERT INTO patients VALUES (1001, pgphi.encrypt_phi('ssn-1001', 'ssn'));
});
$primary->wait_for_catchup($standby);
is($reader->query_safe(q{SELECT (pgphi.ciphertext_info(ssn)).key_version || ':' || pgphi.decrypt_phi(ssn)
	FROM patients WHERE id = 1001}), '2:ssn-1001', 'the standby decrypts values written after a rotation');

# A retirement, then a destruction, on the primary reach it too. A copy of a
# version-1 value is kept outside the tables (as in a backup): the warm
# session has version 1 in its cache.
my $old_value = $primary->safe_psql('postgres', 'SELECT ssn FROM patients WHERE id = 1');
my $old = "SELECT pgphi.decrypt_phi('$old_value'::pgphi.encrypted)";
is($reader->query_safe($old), 'ssn-1', 'the warm standby session decrypts version 1');
$primary->safe_psql('postgres', q{
	CALL pgphi.reencrypt('patients', 'ssn');
	CALL pgphi.reencrypt('patients', 'ssn_det');
	SELECT pgphi.retire_key_version('ssn', 1);
});
$primary->wait_for_catchup($standby);
$reader->query($old);
like($reader->{stderr}, qr/pgphi key "ssn" version 1 is retired/,
	'a key version retired on the primary is refused in a warm standby session');
$primary->safe_psql('postgres', q{
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_destroy('ssn', 1); RESET SESSION AUTHORIZATION;
	SET SESSION AUTHORIZATION c2; SELECT pgphi.approve_destroy('ssn', 1); SELECT pgphi.destroy_key('ssn', 1);
});
$primary->wait_for_catchup($standby);
$reader->{stderr} = '';
$reader->query($old);
like($reader->{stderr}, qr/pgphi key "ssn" version 1 has been destroyed/,
	'a key version destroyed on the primary is refused in a warm standby session');
$reader->{stderr} = '';
is($reader->query_safe($all), '1001', 'the values re-encrypted on the primary decrypt on the standby');
$reader->quit;

$standby->stop;
$primary->stop;
done_testing();
