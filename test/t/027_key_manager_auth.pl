# How production authenticates to AWS KMS and Vault, against the emulator
# over TLS on 127.0.0.1. AWS: a shared config profile assuming a role through
# STS (role_arn + source_profile), web identity (EKS IRSA), the container
# credentials endpoint (ECS, EKS Pod Identity) with credentials that expire
# and are refreshed by the broker, a token file that rotates, a failed refresh
# that keeps credentials still valid, a failing fetch retried. Vault:
# Kubernetes auth with a rotated service account token, JWT auth, TLS
# certificate auth, and an AppRole secret id unwrapped once from a wrapping
# token. Refusals are 42501.
use strict;
use warnings;

use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use PgphiTest;
use KeyManagerEmulator;

my $role = 'arn:aws:iam::111122223333:role/pgphi-db';
my $container_ttl = 20;    # seconds; refreshed a quarter of that (5 s) before expiry
my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $service_account = 'system:serviceaccount:db:pgphi';
my $emulator = KeyManagerEmulator->new(pki => $pki, sts_roles => [$role],
	container_token => 'pod-token-1', container_ttl => $container_ttl,
	extra => [ '--vault-kubernetes-role', "pgphi=$service_account", '--vault-jwt-role', 'pgphi=pgphi-db@vault',
		'--vault-cert-role', 'pgphi=pgphi test client', '--vault-cert-ca', "$pki/ca.pem" ]);
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

###########################################################################
# 4. Vault: Kubernetes, JWT and certificate auth, a response-wrapped secret id.
###########################################################################
my @vault_sources = qw(vault_token_file vault_auth_method vault_auth_role vault_jwt_file vault_client_cert
  vault_client_key vault_approle_role_id_file vault_approle_secret_id_file vault_approle_wrapped_secret_id_file);
sub use_vault
{
	my (%settings) = @_;
	my $sql = join('', map {
		exists $settings{$_}
		  ? "ALTER SYSTEM SET pgphi.$_ = '$settings{$_}';"
		  : "ALTER SYSTEM SET pgphi.$_ = '';"
	} @vault_sources);
	$node->safe_psql('postgres', $sql);
	PgphiTest::reload_broker($node);
}

sub vault_round_trip
{
	my ($key) = @_;
	$node->safe_psql('postgres', qq{
		SELECT pgphi.create_key('$key', provider => 'vault', kek => '$emulator->{vault_key}');
		CREATE TABLE $key AS SELECT i AS id, pgphi.encrypt_phi('$key-' || i, '$key') AS v FROM generate_series(1, 5) i});
	return decrypts($key);
}

sub logins { return $emulator->stats->{vault_logins}; }

# Kubernetes: the service account token file, read at each login.
my $sa_token = $emulator->write_secret('sa-token', $emulator->jwt(subject => $service_account, audience => 'vault',
	ttl => 8));
my $logins = logins();
use_vault(vault_auth_method => 'kubernetes', vault_auth_role => 'pgphi', vault_jwt_file => $sa_token);
is(vault_round_trip('v_k8s'), "t\n5", 'Vault Kubernetes auth: create_key, encrypt, decrypt');
is(logins() - $logins, 1, '... after one login');
# The kubelet rotates the token; the old one expires. A new login reads the new file.
sleep(9);
$emulator->write_secret('sa-token', $emulator->jwt(subject => $service_account, audience => 'vault'));
$emulator->fault(mode => 'expire_tokens', target => 'vault');
is(decrypts('v_k8s'), "t\n5", 'the Vault token expired and the service account token rotated: logged in again');
is(logins() - $logins, 2, '... with the rotated token (the old one has expired)');
$emulator->write_secret('sa-token', $emulator->jwt(subject => 'system:serviceaccount:db:intruder', audience => 'vault'));
$emulator->fault(mode => 'expire_tokens', target => 'vault');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM v_k8s',
	qr/42501: Vault Kubernetes login failed \(HTTP 403\): service account name not authorized/,
	'a service account the role does not bind: 42501');

# JWT/OIDC.
my $jwt = $emulator->write_secret('oidc-jwt', $emulator->jwt(subject => 'pgphi-db', audience => 'vault'));
use_vault(vault_auth_method => 'jwt', vault_auth_role => 'pgphi', vault_jwt_file => $jwt);
is(vault_round_trip('v_jwt'), "t\n5", 'Vault JWT auth: create_key, encrypt, decrypt');
$emulator->write_secret('oidc-jwt', $emulator->jwt(subject => 'pgphi-db', audience => 'vault', ttl => -30));
$emulator->fault(mode => 'expire_tokens', target => 'vault');    # so pgphi logs in again
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM v_jwt', qr/42501: Vault JWT login failed \(HTTP 400\): .*expired/,
	'an expired JWT: 42501');

# TLS certificate auth, with the client certificate pgphi presents.
my %cert = (vault_auth_method => 'cert', vault_client_cert => "$pki/client.pem", vault_client_key => "$pki/client.key");
use_vault(%cert, vault_auth_role => 'pgphi');
is(vault_round_trip('v_cert'), "t\n5", 'Vault TLS certificate auth: create_key, encrypt, decrypt');
use_vault(%cert, vault_auth_role => 'someone-else');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM v_cert', qr/42501: Vault TLS certificate login failed \(HTTP 400\)/,
	'a certificate role that does not match: 42501');
use_vault(vault_auth_method => 'cert', vault_auth_role => 'pgphi');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM v_cert', qr/F0000: Vault TLS certificate auth needs a client certificate/,
	'certificate auth without a client certificate: F0000');

# AppRole with a response-wrapped secret id: unwrapped once, kept in memory.
sub wrap_secret_id
{
	my ($out, $err);
	IPC::Run::run([ 'curl', '-sS', '--max-time', '10', '--cacert', "$pki/ca.pem", '-X', 'POST',
		'-H', 'X-Vault-Request: true', '-H', "X-Vault-Token: $emulator->{vault_root_token}",
		'-H', 'X-Vault-Wrap-TTL: 300s', '-d', qq({"secret_id": "$emulator->{approle}[1]"}),
		"$url/v1/sys/wrapping/wrap" ], '>', \$out, '2>', \$err) or die "wrap failed: $err";
	return JSON::PP::decode_json($out)->{wrap_info}{token};
}
my $role_id = $emulator->write_secret('role-id', $emulator->{approle}[0]);
my $wrapped = $emulator->write_secret('wrapped-secret-id', wrap_secret_id());
my $unwraps = $emulator->stats->{vault_unwraps};
use_vault(vault_approle_role_id_file => $role_id, vault_approle_wrapped_secret_id_file => $wrapped);
is(vault_round_trip('v_wrapped'), "t\n5", 'AppRole with a response-wrapped secret id: create_key, encrypt, decrypt');
is($emulator->stats->{vault_unwraps} - $unwraps, 1, '... after one unwrap');
$logins = logins();
$emulator->fault(mode => 'expire_tokens', target => 'vault');
is(decrypts('v_wrapped'), "t\n5", 'the token expired: logged in again with the secret id held in memory');
is($emulator->stats->{vault_unwraps} - $unwraps, 1, '... without a second unwrap');
cmp_ok(logins() - $logins, '>=', 1, '... (a new AppRole login)');
unlike(slurp_file($node->logfile), qr/\Q$emulator->{approle}[1]\E/, 'the secret id is in no server log line');
# A new broker process (settings changed) cannot reuse the spent wrapping token.
use_vault(vault_approle_role_id_file => $role_id, vault_approle_wrapped_secret_id_file => $wrapped,
	vault_auth_method => 'approle');
fails_with('SELECT count(pgphi.decrypt_phi(v)) FROM v_wrapped',
	qr/42501: permission denied: Vault refused to unwrap the AppRole secret id \(HTTP 400\): wrapping token is not valid/,
	'a spent wrapping token: 42501, asking for a new one');
$emulator->write_secret('wrapped-secret-id', wrap_secret_id());
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
is(decrypts('v_wrapped'), "t\n5", 'a new wrapping token in the file: works again');

done_testing();
