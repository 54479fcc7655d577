# Usage-based rotation: a DEK version is rotated by pgphi itself once it has
# encrypted pgphi.dek_rotation_threshold values; the counts survive restarts;
# encryption stops at four times the threshold however it is reached.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('usage');
$node->append_conf('postgresql.conf', "pgphi.dek_rotation_threshold = 1000\n");
$node->restart;
$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('busy');
	CREATE TABLE notes (id int, note pgphi.encrypted);
	INSERT INTO notes SELECT i, pgphi.encrypt_phi('note ' || i, 'busy') FROM generate_series(1, 1500) i;
});
ok($node->poll_query_until('postgres',
	q{SELECT version = 2 FROM pgphi.key_versions WHERE state = 'active'}),
	'after 1500 values, version 1 of the key is rotated without anyone asking');
ok($node->log_contains('pgphi rotated key id 1 to version 2: version 1 had encrypted \d+ values'),
	'the server log says why');
sleep 3;    # the broker checks every second: it must not rotate again
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.key_versions WHERE key_id = 1}), '2',
	'exactly one automatic rotation');
is($node->safe_psql('postgres', q{SELECT encryptions FROM pgphi.key_usage() WHERE version = 1}), '1500',
	'pgphi.key_usage counts every value encrypted under version 1');
is($node->safe_psql('postgres', q{SELECT key_version FROM pgphi.ciphertext_info(pgphi.encrypt_phi('new', 'busy'))}),
	'2', 'new values use version 2');

$node->restart;
is($node->safe_psql('postgres', q{SELECT encryptions FROM pgphi.key_usage() WHERE version = 1}), '1500',
	'the counts survive a restart');
is($node->safe_psql('postgres', q{SELECT count(*) FROM notes WHERE pgphi.decrypt_phi(note) = 'note ' || id}), '1500',
	'every value still decrypts');

# One statement that outruns the rotation: encryption under the old version
# stops at four times the threshold.
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.dek_rotation_threshold = 100});
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('capped')});
my $err = PgphiTest::psql_error($node, 'postgres',
	q{SELECT count(pgphi.encrypt_phi('x' || i, 'capped')) FROM generate_series(1, 5000) i});
like($err, qr/55000: pgphi key "capped" version 1 has encrypted as many values as is safe/,
	'encryption stops at the hard limit');

$node->stop;
done_testing();
