# Logical replication (pgoutput) of encrypted columns to a second cluster that
# shares the key material: the subscriber decrypts what the publisher wrote,
# including after a rotation there.
use strict;
use warnings;

use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $publisher = PgphiTest::new_node('publisher', allows_streaming => 'logical');
$publisher->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i)
	  FROM generate_series(1, 500) i;
	-- The key catalog travels with the data: it holds only wrapped DEKs.
	CREATE PUBLICATION clinic FOR TABLE patients, pgphi.keys, pgphi.key_versions;
});

my $subscriber = PgphiTest::new_node('subscriber');
# Shared key material: with the local provider, the same KEK file (with a key
# manager, the same Vault Transit key or KMS key).
copy($publisher->data_dir . '/pgphi_local.kek', $subscriber->data_dir . '/pgphi_local.kek') or die;
chmod 0600, $subscriber->data_dir . '/pgphi_local.kek';
$subscriber->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted);
});
(my $connstr = $publisher->connstr('postgres')) =~ s/'/''/g;    # as an SQL literal
$subscriber->safe_psql('postgres', "CREATE SUBSCRIPTION clinic CONNECTION '$connstr' PUBLICATION clinic");
$subscriber->wait_for_subscription_sync($publisher, 'clinic');

my $all = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn, 'ssn', mrn) = 'ssn-' || id};
is($subscriber->safe_psql('postgres', $all), '500', 'the subscriber decrypts every replicated value');

# A rotation and new writes on the publisher replicate and decrypt.
$publisher->safe_psql('postgres', q{
	SELECT pgphi.rotate_key('ssn');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i)
	  FROM generate_series(501, 600) i;
});
$publisher->wait_for_catchup('clinic');
is($subscriber->safe_psql('postgres', $all), '600', 'rows written after a rotation decrypt on the subscriber');
is($subscriber->safe_psql('postgres',
	q{SELECT count(*) FROM patients, pgphi.ciphertext_info(ssn) i WHERE i.key_version = 2}), '100',
	'... under the new version');

$subscriber->stop;
$publisher->stop;
done_testing();
