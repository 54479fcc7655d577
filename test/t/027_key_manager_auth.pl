# How production authenticates to AWS KMS (and Vault), against the emulator
# over TLS on 127.0.0.1: a shared config profile assuming a role through STS
# (role_arn + source_profile), web identity (EKS IRSA), the container
# credentials endpoint (ECS, EKS Pod Identity) with credentials that expire
# and are refreshed by the broker, a token file that rotates, a failed refresh
# that keeps credentials still valid, a failing fetch retried, and refusals
# reported as 42501.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use PgphiTest;
use KeyManagerEmulator;

my $role = 'arn:aws:iam::111122223333:role/pgphi-db';
my $container_ttl = 20;    # seconds; refreshed a quarter of that (5 s) before expiry
my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki, sts_roles => [$role],
	container_token => 'pod-token-1', container_ttl => $container_ttl);
my $url = $emulator->url;
my $kms_key = $emulator->{kms_key};

my $node = PgphiTest::new_node('auth');
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.provider_timeout = 3000
pgphi.provider_max_retries = 2
pgphi.aws_sts_endpoint = '$url'
pgphi.aws_credentials_file = ''
CONF
$node->safe_psql('postgres', 'CREATE EXTENSION pgphi');
PgphiTest::reload_broker($node);

sub fails_with
{
	my ($sql, $pattern, $name) = @_;
	like(PgphiTest::psql_error($node, 'postgres', $sql, flush => 1), $pattern, $name);
}

# Settings for one credential source; every other AWS source is reset.
my @sources = qw(aws_credentials_file aws_config_file aws_profile aws_role_arn aws_web_identity_token_file
  aws_container_credentials_uri aws_container_authorization_token_file aws_role_session_name);
sub use_source
{
	my (%settings) = @_;
	my $sql = join('', map {
		exists $settings{$_}
		  ? "ALTER SYSTEM SET pgphi.$_ = '$settings{$_}';"
		  : "ALTER SYSTEM RESET pgphi.$_;"
	} @sources);
	$node->safe_psql('postgres', $sql);
	PgphiTest::reload_broker($node);
}

# create_key, encrypt and decrypt (after a cache flush, so the broker asks KMS).
sub round_trip
{
	my ($key) = @_;
	$node->safe_psql('postgres', qq{
		SELECT pgphi.create_key('$key', provider => 'aws_kms', kek => '$kms_key');
		CREATE TABLE $key AS SELECT i AS id, pgphi.encrypt_phi('$key-' || i, '$key') AS v FROM generate_series(1, 5) i});
	return decrypts($key);
}

sub decrypts
{
	my ($key) = @_;
	return $node->safe_psql('postgres',
		"SELECT pgphi.flush_cache() >= 0; SELECT count(*) FROM $key WHERE pgphi.decrypt_phi(v) = '$key-' || id");
}

my $base_credentials = $emulator->write_secret('base-credentials',
	"[base]\naws_access_key_id = $emulator->{aws_admin}[0]\naws_secret_access_key = $emulator->{aws_admin}[1]\n");

###########################################################################
# 1. A profile assuming a role (role_arn + source_profile, STS AssumeRole).
###########################################################################
my $config = $emulator->write_secret('aws-config', <<CONF);
[profile pgphi]
role_arn = $role
source_profile = base
role_session_name = pgphi-db

[profile loop-a]
role_arn = $role
source_profile = loop-b

[profile loop-b]
role_arn = $role
source_profile = loop-a

[profile stranger]
role_arn = arn:aws:iam::111122223333:role/not-a-role
source_profile = base
CONF
$emulator->reset_stats;
use_source(aws_config_file => $config, aws_credentials_file => $base_credentials, aws_profile => 'pgphi');
is(round_trip('k_role'), "t\n5", 'a config profile assuming a role through STS: create_key, encrypt, decrypt');
cmp_ok($emulator->stats->{sts}{AssumeRole} // 0, '>=', 1, '... with credentials from STS AssumeRole');
cmp_ok($emulator->stats->{denied_by_policy}, '==', 0, '... which carry the documented IAM policy');

use_source(aws_config_file => $config, aws_credentials_file => $base_credentials, aws_profile => 'loop-a');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM k_role', qr/F0000: AWS profiles form a cycle/,
	'profiles whose source_profile chain loops: F0000 naming the cycle');
use_source(aws_config_file => $config, aws_credentials_file => $base_credentials, aws_profile => 'stranger');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM k_role',
	qr/42501: permission denied by AWS STS AssumeRole failed \(HTTP 403\): AccessDenied/,
	'a role STS refuses: 42501');

###########################################################################
# 2. Web identity (EKS IRSA): a token file and a role, AssumeRoleWithWebIdentity.
###########################################################################
my $token_file = $emulator->write_secret('web-token', $emulator->jwt(audience => 'sts.amazonaws.com'));
$emulator->reset_stats;
use_source(aws_web_identity_token_file => $token_file, aws_role_arn => $role);
is(round_trip('k_web'), "t\n5", 'web identity: create_key, encrypt, decrypt');
cmp_ok($emulator->stats->{sts}{AssumeRoleWithWebIdentity} // 0, '>=', 1, '... through AssumeRoleWithWebIdentity');
is(decrypts('k_role'), "t\n5", '... and the values of the assumed-role key decrypt too');

for my $case ([ 'a tampered token', $emulator->jwt(audience => 'sts.amazonaws.com') . 'x', qr/InvalidIdentityToken/ ],
	[ 'an expired token', $emulator->jwt(audience => 'sts.amazonaws.com', ttl => -60), qr/ExpiredTokenException/ ],
	[ 'a token for another audience', $emulator->jwt(audience => 'vault'), qr/InvalidIdentityToken/ ])
{
	my $bad = $emulator->write_secret('bad-web-token', $case->[1]);
	use_source(aws_web_identity_token_file => $bad, aws_role_arn => $role);
	fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM k_web', qr/42501: permission denied by AWS STS .*$case->[2]/,
		"$case->[0]: 42501, not XX001");
}
use_source(aws_web_identity_token_file => $token_file, aws_role_arn => 'arn:aws:iam::111122223333:role/other');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM k_web', qr/42501: .*AccessDenied/, 'an unknown role: 42501');

###########################################################################
# 3. The container credentials endpoint, with credentials that expire in 20 s.
###########################################################################
my $pod_token = $emulator->write_secret('pod-token', 'pod-token-1');
my %container = (aws_container_credentials_uri => "$url/v2/credentials/pgphi",
	aws_container_authorization_token_file => $pod_token);
$emulator->reset_stats;
use_source(%container);
is(round_trip('k_pod'), "t\n5", 'container credentials: create_key, encrypt, decrypt');
my $fetched = time;
is($emulator->stats->{container}{'GET credentials'}, 1, '... fetched once');
is(decrypts('k_pod'), "t\n5", '... and used again without fetching');
is($emulator->stats->{container}{'GET credentials'}, 1, '... (still one fetch)');

# The agent rotates its token: the file is read again at the next fetch.
$emulator->control('POST', 'container/token', { token => 'pod-token-2' });
$emulator->write_secret('pod-token', 'pod-token-2');
sleep($fetched + $container_ttl - 4 - time);
is(decrypts('k_pod'), "t\n5", 'inside the refresh margin: the broker refreshes the credentials');
$fetched = time;
is($emulator->stats->{container}{'GET credentials'}, 2, '... with a second fetch, using the rotated token file');

# A refresh that fails while the credentials held are valid keeps them.
$emulator->fault(mode => 'internal_error', target => 'container');
sleep($fetched + $container_ttl - 4 - time);
is(decrypts('k_pod'), "t\n5", 'a failed refresh inside the margin keeps the credentials still valid');
cmp_ok($emulator->stats->{errors}{container}{internal_error} // 0, '>=', 1, '... (the refresh was tried and failed)');
sleep($fetched + $container_ttl + 2 - time);
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM k_pod',
	qr/08006: the container credentials endpoint returned HTTP 500/,
	'once they have expired, a failing endpoint is 08006 (after retries)');
$emulator->clear_faults;
is(decrypts('k_pod'), "t\n5", 'the endpoint back: decrypts again');

# A fetch that fails once is retried.
$emulator->fault(mode => 'internal_error', target => 'container', count => 1);
$emulator->reset_stats;
use_source(%container, aws_role_session_name => 'retry');    # a new provider: nothing cached
is(decrypts('k_pod'), "t\n5", 'a failing credential fetch is retried');
is($emulator->stats->{container}{'GET credentials'}, 2, '... (two fetches, the first answered 500)');

# A token the endpoint refuses.
$emulator->write_secret('pod-token', 'pod-token-stale');
use_source(%container, aws_role_session_name => 'stale');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM k_pod',
	qr/42501: permission denied by the container credentials endpoint returned HTTP 401/,
	'a refused container token: 42501');

done_testing();
