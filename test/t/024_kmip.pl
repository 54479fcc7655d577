# Keys whose KEK is a key object on a real KMIP server: Debian's
# pykmip-server (PyKMIP, not written here) on 127.0.0.1 with a test PKI made
# now, driven on the administrator's side by PyKMIP's own client
# (test/kmip/kmip_admin.py). Create, encrypt, decrypt, rotate, rewrap onto a
# KEK created by pgphi, destroy; a cold miss costs exactly one Decrypt at
# the server; the server going away and coming back (cache and grace);
# wrong client certificates (42501); KEKs deactivated, compromised,
# pre-active and destroyed on the server (55000); a standby decrypting.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use PgphiTest;
use KeyManagerEmulator;
use KmipServer;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
# A second client of the same CA with another identity (CN): the server
# accepts its certificate but it owns none of pgphi's keys.
{
	my $cnf = "$pki/stranger.cnf";
	open(my $fh, '>', $cnf) or die;
	print $fh "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n[ext]\n"
	  . "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
	  . "extendedKeyUsage = clientAuth\n";
	close $fh;
	system('openssl', 'genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256',
		'-out', "$pki/stranger.key") == 0 or die;
	system('openssl', 'req', '-config', $cnf, '-new', '-key', "$pki/stranger.key", '-subj', '/CN=a stranger',
		'-out', "$pki/stranger.csr") == 0 or die;
	system('openssl', 'x509', '-req', '-in', "$pki/stranger.csr", '-CA', "$pki/ca.pem", '-CAkey', "$pki/ca.key",
		'-CAcreateserial', '-days', '2', '-sha256', '-extfile', $cnf, '-extensions', 'ext',
		'-out', "$pki/stranger.pem") == 0 or die;
	chmod 0600, "$pki/stranger.key";
}

my $kmip = KmipServer->new(pki => $pki, dir => "$PostgreSQL::Test::Utils::tmp_check/kmip");
my $kek1 = $kmip->admin('create', 'pgphi-kek');
ok($kek1 ne '', "the KMIP administrator made an AES-256 KEK named pgphi-kek ($kek1)");

my $ttl = 4;      # seconds
my $grace = 5;    # seconds
my $node = PgphiTest::new_node('kmip', allows_streaming => 1);
$node->append_conf('postgresql.conf', $kmip->postgres_settings . <<CONF);
pgphi.provider_timeout = 3000
pgphi.provider_max_retries = 1
pgphi.cache_ttl = $ttl
pgphi.key_manager_grace = $grace
CONF
$node->restart;

sub fails_with
{
	my ($sql, $pattern, $name) = @_;
	like(PgphiTest::psql_error($node, 'postgres', $sql, flush => 1), $pattern, $name);
}

$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	SELECT pgphi.create_key('ssn', provider => 'kmip', kek => 'pgphi-kek');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i)
	  FROM generate_series(1, 100) i;
});
is($node->safe_psql('postgres', q{SELECT provider FROM pgphi.broker_processes() WHERE provider = 'kmip'}),
	'kmip', 'the KMIP provider has a key broker of its own');
is($node->safe_psql('postgres',
	q{SELECT v.kek_version FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) WHERE k.name = 'ssn'}),
	$kek1, 'the DEK records the unique identifier of the KMIP object that wrapped it');
is($kmip->operations('Get'), 0, 'pgphi never asked the server for key material (no Get)');

my $all_ok = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn, 'ssn', mrn) = 'ssn-' || id};
is($node->safe_psql('postgres', $all_ok), '100', 'every value decrypts');

# A cold miss costs one server call: pgphi.cache_stats and the server's own
# count of Decrypt operations agree.
$node->restart;
my $decrypts_before = $kmip->operations('Decrypt');
is($node->safe_psql('postgres', $all_ok), '100', 'after a restart every value decrypts');
is($node->safe_psql('postgres', 'SELECT key_manager_calls FROM pgphi.cache_stats'), '1',
	'cache_stats: the cold miss cost one key-manager call');
is($kmip->operations('Decrypt') - $decrypts_before, 1, '... and the KMIP server processed exactly one Decrypt');

# A KEK named by its unique identifier.
$node->safe_psql('postgres', qq{SELECT pgphi.create_key('by_uid', provider => 'kmip', kek => '$kek1')});
is($node->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'by_uid'), 'by_uid')}), 'x',
	'a KEK named by its unique identifier works');

# Rotation: a new DEK version, wrapped by the same KEK.
is($node->safe_psql('postgres', q{SELECT pgphi.rotate_key('ssn')}), '2', 'rotate_key makes version 2');
$node->safe_psql('postgres', q{
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i)
	  FROM generate_series(101, 150) i;
});
is($node->safe_psql('postgres', $all_ok), '150', 'values of both versions decrypt');

# A new KEK version created by pgphi on request, and rewrap onto it.
sleep 1.2;    # PyKMIP orders a name's keys by creation time, in seconds
my $kek2 = $node->safe_psql('postgres', q{SET ROLE c1; SELECT pgphi.create_kek('kmip', 'pgphi-kek')});
ok($kek2 ne '' && $kek2 ne $kek1, "pgphi.create_kek made a new KEK of the same name ($kek2)");
is($kmip->admin('state', $kek2), 'ACTIVE', '... active on the server');
is($node->safe_psql('postgres', q{SET ROLE c1; SELECT pgphi.rewrap_keys('ssn')}), '2', 'rewrap_keys rewraps both DEKs');
is($node->safe_psql('postgres',
	q{SELECT string_agg(DISTINCT v.kek_version, ',') FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) WHERE k.name = 'ssn'}),
	$kek2, '... onto the new KEK');
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
is($node->safe_psql('postgres', $all_ok), '150', 'every value decrypts after the rewrap');
like(PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.create_kek('vault', 'x')}),
	qr/0A000|F0000|22023|cannot create KEKs|no address/, 'other providers do not create KEKs');

# The old KEK deactivated on the server: keys rewrapped away from it keep
# working; the key still under it stops with 55000, naming the state.
$kmip->admin('revoke', $kek1);
is($kmip->admin('state', $kek1), 'DEACTIVATED', 'the administrator deactivated the first KEK');
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
is($node->safe_psql('postgres', $all_ok), '150', 'the rewrapped key is unaffected');
fails_with(q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'by_uid'), 'by_uid')},
	qr/55000: the KMIP KEK object "\Q$kek1\E" is deactivated/, 'a key under the deactivated KEK: 55000');
# ... and destroyed on the server.
$kmip->admin('destroy', $kek1);
fails_with(q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'by_uid'), 'by_uid')},
	qr/55000: the KMIP KEK object "\Q$kek1\E" that wrapped this DEK no longer exists/,
	'a key under the destroyed KEK: 55000');
fails_with(q{SELECT pgphi.rotate_key('by_uid')}, qr/42704: the KMIP server has no such key/,
	'a new DEK under a destroyed KEK named by its identifier: 42704');

# A compromised KEK, and a pre-active one.
my $kek3 = $kmip->admin('create', 'compromised-kek');
$node->safe_psql('postgres', q{SELECT pgphi.create_key('comp', provider => 'kmip', kek => 'compromised-kek')});
$kmip->admin('compromise', $kek3);
fails_with(q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'comp'), 'comp')},
	qr/55000: the KMIP KEK object "\Q$kek3\E" is compromised/, 'a compromised KEK: 55000');
$kmip->admin('create-preactive', 'pre-kek');
fails_with(q{SELECT pgphi.create_key('pre', provider => 'kmip', kek => 'pre-kek')},
	qr/55000: no key of the KEK's name is active on the KMIP server: the newest, "\d+", is pre-active/,
	'a pre-active KEK: 55000');
fails_with(q{SELECT pgphi.create_key('nokey', provider => 'kmip', kek => 'no-such-kek')},
	qr/42704: the KMIP server has no such key/, 'an unknown KEK: 42704');

# Wrong client certificates: one of the same CA with another identity, and
# one of a CA the server does not trust. Both are refusals: 42501.
sub use_certificate
{
	my ($cert) = @_;
	$node->append_conf('postgresql.conf', $kmip->postgres_settings(cert => $cert));
	PgphiTest::reload_broker($node);
}
use_certificate('stranger');
fails_with($all_ok, qr/42501: permission denied by the KMIP server/,
	'a client certificate of another identity: 42501');
use_certificate('other-client');
fails_with($all_ok, qr/42501: permission denied by the KMIP server: it refused pgphi's client certificate/,
	'a client certificate of an untrusted CA: 42501');
use_certificate('client');
chmod 0640, "$pki/client.key";
fails_with($all_ok, qr/F0000: KMIP client key file .* is accessible by group or others/,
	'a client key readable by others: F0000');
chmod 0600, "$pki/client.key";
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
is($node->safe_psql('postgres', $all_ok), '150', 'the right certificate again: every value decrypts');

# The server goes away: cached keys work until the grace period past their
# TTL ends, then decrypts fail as unavailable (08006); it comes back, and
# they work again.
my $steady = $node->background_psql('postgres', on_error_stop => 0);
$steady->query_safe($all_ok);
$kmip->stop;
my $outage_at = time;
my ($last_success, $failure) = (0, '');
while (time - $outage_at < $ttl + $grace + 6)
{
	$steady->query("\\set VERBOSITY verbose\n$all_ok");
	if ($steady->{stderr} eq '') { $last_success = time - $outage_at; }
	else { $failure = $steady->{stderr}; last; }
	usleep(250_000);
}
$steady->{stderr} = '';
cmp_ok($last_success, '>', $ttl, 'decrypts continue past the TTL while the KMIP server is down');
like($failure, qr/08006: the KMIP server is unavailable/, 'after the grace period they fail: 08006');
cmp_ok($last_success, '<=', $ttl + $grace + 2, '... no later than TTL plus grace');
$kmip->start;
my $back = 0;
for (1 .. 40)
{
	my $out = $steady->query($all_ok);
	if ($steady->{stderr} eq '' && $out eq '150') { $back = 1; last; }
	$steady->{stderr} = '';
	usleep(250_000);
}
ok($back, 'the KMIP server back: decrypts again, nothing lost');
$steady->quit;

# Destruction of a DEK version (crypto-shredding) works as for any provider.
$node->safe_psql('postgres', q{
	UPDATE patients SET ssn = pgphi.encrypt_phi(pgphi.decrypt_phi(ssn, 'ssn', mrn), 'ssn', mrn);
	SELECT pgphi.retire_key_version('ssn', 1);
	SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_destroy('ssn', 1); RESET SESSION AUTHORIZATION;
	SET SESSION AUTHORIZATION c2; SELECT pgphi.approve_destroy('ssn', 1); SELECT pgphi.destroy_key('ssn', 1);
});
is($node->safe_psql('postgres',
	q{SELECT wrapped_dek IS NULL FROM pgphi.key_versions WHERE key_id = pgphi._key_id('ssn') AND version = 1}),
	't', 'destroy_key removes the wrapped DEK of version 1');
is($node->safe_psql('postgres', $all_ok), '150', 'the values re-encrypted under version 2 decrypt');

# A standby: its own key broker asks the same KMIP server.
$node->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('kmip_standby');
$standby->init_from_backup($node, 'base', has_streaming => 1);
$standby->start;
$node->wait_for_catchup($standby);
my $standby_decrypts = $kmip->operations('Decrypt');
is($standby->safe_psql('postgres', $all_ok), '150', 'the standby decrypts every value');
cmp_ok($kmip->operations('Decrypt') - $standby_decrypts, '>=', 1, '... through the KMIP server');
is($kmip->operations('Get'), 0, 'and at no point did pgphi fetch key material (no Get)');

$standby->stop;
$node->stop;
$kmip->stop;
done_testing();
