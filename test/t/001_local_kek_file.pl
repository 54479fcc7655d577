# The local provider's KEK file: created safely, and every way it can be
# missing or wrong gives a clear error without losing data.
use strict;
use warnings;

use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

# pgphi refuses to work unless preloaded.
my $plain = PostgreSQL::Test::Cluster->new('not_preloaded');
$plain->init;
$plain->append_conf('postgresql.conf', PgphiTest::log_settings());
$plain->start;
my $err = PgphiTest::psql_error($plain, 'postgres', 'CREATE EXTENSION pgphi');
like($err, qr/55000: pgphi must be loaded via shared_preload_libraries/,
	'CREATE EXTENSION without preload fails with 55000');
like($err, qr/HINT:  Add pgphi to shared_preload_libraries/, '... and says how to fix it');
$plain->stop;

my $node = PgphiTest::new_node('kek_file');

# A schema "pgphi" created beforehand by an ordinary user is not adopted.
$node->safe_psql('postgres', q{
	CREATE ROLE schema_squatter LOGIN;
	CREATE DATABASE squatted;
	GRANT CREATE ON DATABASE squatted TO schema_squatter;
});
$node->safe_psql('squatted', 'SET ROLE schema_squatter; CREATE SCHEMA pgphi;');
like(PgphiTest::psql_error($node, 'squatted', 'CREATE EXTENSION pgphi'),
	qr/42501: schema pgphi exists and is not owned by a superuser/,
	'CREATE EXTENSION refuses a pgphi schema owned by an ordinary user');

# Nor is a role of pgphi's that someone made able to log in.
$node->safe_psql('postgres', 'CREATE ROLE pgphi_decrypt LOGIN; CREATE DATABASE role_squatted');
like(PgphiTest::psql_error($node, 'role_squatted', 'CREATE EXTENSION pgphi'),
	qr/42710: role pgphi_decrypt exists and can log in/,
	'CREATE EXTENSION refuses a pgphi role that can log in');
$node->safe_psql('postgres', 'DROP ROLE pgphi_decrypt; DROP DATABASE role_squatted');

$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn_key');
	CREATE TABLE patients (id int, ssn pgphi.encrypted);
	INSERT INTO patients SELECT 1, pgphi.encrypt_phi('123-45-6789', 'ssn_key');
});

my $kek = $node->data_dir . '/pgphi_local.kek';
ok(-f $kek, 'first key created the KEK file in the data directory');
is((stat $kek)[2] & 07777, 0600, 'KEK file has mode 0600');
is(-s $kek, 32, 'KEK file holds 32 bytes');
ok($node->log_contains('pgphi: the local key provider keeps its KEK in a file'),
	'server log warns that the local provider is for development');

my $decrypt = 'SELECT pgphi.decrypt_phi(ssn) FROM patients';
is($node->safe_psql('postgres', $decrypt), '123-45-6789', 'value decrypts');

# Missing: the error names the file, and decrypting never invents a new KEK.
move($kek, "$kek.moved") or die;
$err = PgphiTest::psql_error($node, 'postgres', $decrypt, flush => 1);
like($err, qr/58P01: local KEK file "pgphi_local.kek" does not exist/, 'missing KEK file: 58P01');
ok(!-e $kek, 'a failed unwrap does not create a new KEK file');
move("$kek.moved", $kek) or die;
is($node->safe_psql('postgres', $decrypt), '123-45-6789', 'restored KEK file decrypts again');

# Point pgphi.local_kek_file at bad files, reloading the configuration each time.
my $bad = $node->data_dir . '/bad.kek';
sub use_kek_file
{
	my ($path) = @_;
	$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.local_kek_file = '$path'");
	PgphiTest::reload_broker($node);
}
sub write_file_mode
{
	my ($content, $mode) = @_;
	unlink $bad;
	open my $fh, '>', $bad or die;
	binmode $fh;
	print $fh $content;
	close $fh;
	chmod $mode, $bad;
}
use_kek_file('bad.kek');

write_file_mode('k' x 31, 0600);
$err = PgphiTest::psql_error($node, 'postgres', $decrypt, flush => 1);
like($err, qr/F0000: local KEK file "bad.kek" has the wrong size/, 'short KEK file: F0000');
like($err, qr/It has 31 bytes; a KEK is exactly 32/, '... with the sizes');

write_file_mode('k' x 32, 0644);
$err = PgphiTest::psql_error($node, 'postgres', $decrypt, flush => 1);
like($err, qr/F0000: local KEK file "bad.kek" is accessible by group or others/,
	'KEK file readable by others: F0000');

write_file_mode('k' x 32, 0000);
$err = PgphiTest::psql_error($node, 'postgres', $decrypt, flush => 1);
like($err, qr/F0000: could not open local KEK file "bad.kek": Permission denied/,
	'unreadable KEK file: F0000');

write_file_mode('k' x 32, 0600);
$err = PgphiTest::psql_error($node, 'postgres', $decrypt, flush => 1);
like($err, qr/F0000: the DEK of key "ssn_key" version 1 was wrapped by a different local KEK/,
	'another KEK: F0000');
like($err, qr/needs the KEK with fingerprint [0-9a-f]{16}; pgphi.local_kek_file holds the KEK with fingerprint [0-9a-f]{16}/,
	'... naming both fingerprints');

unlink $bad;
mkdir $bad or die;
$err = PgphiTest::psql_error($node, 'postgres', $decrypt, flush => 1);
like($err, qr/F0000: local KEK file "bad.kek" is not a regular file/, 'a directory: F0000');
rmdir $bad;

# With local keys in the catalog, a missing KEK file is an error for
# create_key too: a new KEK would silently split the keys between two KEKs.
unlink $bad;
$err = PgphiTest::psql_error($node, 'postgres', "SELECT pgphi.create_key('second_key')");
like($err, qr/58P01: local KEK file "bad.kek" does not exist/, 'create_key does not replace a lost KEK');
ok(!-e $bad, '... and creates no KEK file');

# A KEK file that cannot be created (its directory is missing): the first
# local key of a database fails with 58030 and nothing is half-created.
$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION pgphi');
use_kek_file('no_such_dir/new.kek');
$err = PgphiTest::psql_error($node, 'fresh', "SELECT pgphi.create_key('first_key')");
like($err, qr/58030: could not create local KEK file "no_such_dir\/new.kek[^"]*": No such file or directory/,
	'a KEK file that cannot be created: 58030');
is($node->safe_psql('fresh', 'SELECT count(*) FROM pgphi.keys'), '0', '... and no key is half-created');

# Back to the real KEK: nothing was lost, also across a restart.
$node->safe_psql('postgres', 'ALTER SYSTEM RESET pgphi.local_kek_file');
PgphiTest::reload_broker($node);
is($node->safe_psql('postgres', $decrypt), '123-45-6789', 'original KEK decrypts again');
$node->restart;
is($node->safe_psql('postgres', $decrypt), '123-45-6789', 'value decrypts after a restart');

# Failing statements that carry PHI literals are logged without their text.
PgphiTest::psql_error($node, 'postgres', "SELECT pgphi.encrypt_phi('123-45-6789', 'no_such_key')");
PgphiTest::psql_error($node, 'postgres',
	"SELECT pgphi.decrypt_phi_jsonb(pgphi.encrypt_phi('123-45-6789', 'ssn_key'))");
PgphiTest::psql_error($node, 'postgres',
	"SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('123-45-6789', 'ssn_key', 'a'), 'ssn_key', 'b')");

# Nothing secret reached the server log: no plaintext, no KEK bytes.
open my $fh, '<', $kek or die;
binmode $fh;
read($fh, my $kek_bytes, 32);
close $fh;
my $log = slurp_file($node->logfile);
like($log, qr/pgphi key does not exist/, 'the failures above were logged');
unlike($log, qr/123-45-6789/, 'server log holds no plaintext');
ok(index($log, $kek_bytes) < 0, 'server log holds no raw KEK bytes');
ok(index(lc $log, unpack('H*', $kek_bytes)) < 0, 'server log holds no hex KEK');

$node->stop;
done_testing();
