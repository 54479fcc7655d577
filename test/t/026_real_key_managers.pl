# Vault and AWS KMS as the real services behave (at the emulator, which
# enforces the IAM and Vault policies docs/providers-vault-and-kms.md prints):
# the documented policies suffice and a wrong one fails, alias retargeting,
# keys pending deletion, endpoints with a port, slash or path, and a Vault
# cluster's HA and degraded answers; Vault DEKs bound to their key.
use strict;
use warnings;

use IPC::Run;
use MIME::Base64 ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
my $url = $emulator->url;

my $node = PgphiTest::new_node('real');
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.provider_timeout = 3000
pgphi.provider_max_retries = 2
CONF
$node->safe_psql('postgres', 'CREATE EXTENSION pgphi');
PgphiTest::reload_broker($node);

sub fails_with
{
	my ($sql, $pattern, $name) = @_;
	like(PgphiTest::psql_error($node, 'postgres', $sql, flush => 1), $pattern, $name);
}

# The AWS CLI as the tests' administrator (no policy at the emulator).
sub aws { return $emulator->aws_cli(@_); }

###########################################################################
# 1. The documented policies are enough for everything pgphi does.
###########################################################################
my $kms_key = $emulator->{kms_key};
$node->safe_psql('postgres', qq{
	SELECT pgphi.create_key('v_key', provider => 'vault', kek => '$emulator->{vault_key}');
	SELECT pgphi.create_key('k_key', provider => 'aws_kms', kek => '$kms_key');
	CREATE TABLE t (id int, v pgphi.encrypted, k pgphi.encrypted);
	INSERT INTO t SELECT i, pgphi.encrypt_phi('v-' || i, 'v_key'), pgphi.encrypt_phi('k-' || i, 'k_key')
	  FROM generate_series(1, 20) i;
	SELECT pgphi.rotate_key('v_key'); SELECT pgphi.rotate_key('k_key');
	INSERT INTO t SELECT i, pgphi.encrypt_phi('v-' || i, 'v_key'), pgphi.encrypt_phi('k-' || i, 'k_key')
	  FROM generate_series(21, 30) i;
	SELECT pgphi.rewrap_keys();
});
my $all = q{SELECT pgphi.flush_cache() >= 0;
	SELECT count(*) FROM t WHERE pgphi.decrypt_phi(v) = 'v-' || id AND pgphi.decrypt_phi(k) = 'k-' || id};
is($node->safe_psql('postgres', $all), "t\n30",
	'with exactly the documented IAM and Vault policies: create, rotate, rewrap and decrypt');
cmp_ok($emulator->stats->{denied_by_policy}, '==', 0, '... and nothing pgphi asked for was denied');

# A policy with kms:GenerateDataKey instead of kms:GenerateDataKeyWithoutPlaintext fails.
my $wrong = "$emulator->{state}/wrong-policy.json";
open my $fh, '>', $wrong or die;
print $fh '{"Statement": [{"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt", "kms:Encrypt", '
  . '"kms:ReEncrypt*", "kms:DescribeKey"], "Resource": "*"}]}';
close $fh;
my $strict = KeyManagerEmulator->new(pki => $pki, name => 'strict', kms_policy => $wrong);
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.aws_kms_endpoint = '@{[ $strict->url ]}';
	ALTER SYSTEM SET pgphi.aws_credentials_file = '$strict->{state}/aws-credentials'");
$strict->postgres_settings;    # writes its credentials file
PgphiTest::reload_broker($node);
fails_with(qq{SELECT pgphi.create_key('k_denied', provider => 'aws_kms', kek => '$kms_key')},
	qr/42501: permission denied by AWS KMS AccessDeniedException: .*kms:GenerateDataKeyWithoutPlaintext/,
	'a policy granting kms:GenerateDataKey but not ...WithoutPlaintext: create_key is denied (42501)');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET pgphi.aws_kms_endpoint; ALTER SYSTEM RESET pgphi.aws_credentials_file');
PgphiTest::reload_broker($node);
$strict->stop;

###########################################################################
# 2. An alias retargeted with UpdateAlias: old DEKs still decrypt (Decrypt
#    names the ARN that wrapped them), rewrap_keys moves them to the new key.
###########################################################################
my $first = $emulator->control('POST', 'kms/keys', {})->{arn};
my $second = $emulator->control('POST', 'kms/keys', {})->{arn};
$first //= ''; $second //= '';
like($first, qr/^arn:aws:kms:/, 'two new KMS keys') or diag explain $emulator->control('POST', 'kms/keys', {});
aws('create-alias', '--alias-name', 'alias/pgphi-moving', '--target-key-id', $first);
$node->safe_psql('postgres', q{
	SELECT pgphi.create_key('alias_key', provider => 'aws_kms', kek => 'alias/pgphi-moving');
	CREATE TABLE a AS SELECT i AS id, pgphi.encrypt_phi('a-' || i, 'alias_key') AS v FROM generate_series(1, 10) i});
my $kek_version = q{SELECT string_agg(kv.kek_version, ',' ORDER BY kv.version) FROM pgphi.key_versions kv
	JOIN pgphi.keys k USING (key_id) WHERE k.name = 'alias_key'};
like($node->safe_psql('postgres', $kek_version), qr/^\Q$first\E#[0-9a-f]{64}$/,
	'the DEK records the key ARN the alias named, and its key material id');
aws('update-alias', '--alias-name', 'alias/pgphi-moving', '--target-key-id', $second);
my $alias_ok = q{SELECT pgphi.flush_cache() >= 0; SELECT count(*) FROM a WHERE pgphi.decrypt_phi(v) = 'a-' || id};
is($node->safe_psql('postgres', $alias_ok), "t\n10", 'after UpdateAlias, old values still decrypt');
is($node->safe_psql('postgres', q{SELECT pgphi.rewrap_keys('alias_key')}), '1', 'rewrap_keys rewraps the DEK');
like($node->safe_psql('postgres', $kek_version), qr/^\Q$second\E#[0-9a-f]{64}$/, '... to the key the alias names now');
is($node->safe_psql('postgres', $alias_ok), "t\n10", '... and every value decrypts');
aws('disable-key', '--key-id', $first);
is($node->safe_psql('postgres', $alias_ok), "t\n10", '... without the old key');

# A rotation of the KMS key (new key material, as automatic rotation makes)
# shows in key_versions once rewrap_keys has moved the DEK onto it.
my $material_before = $node->safe_psql('postgres', $kek_version);
$emulator->control('POST', 'kms/rotate', { key => $second });
is($node->safe_psql('postgres', $kek_version), $material_before, 'after a KMS key rotation the DEK still names the old material');
is($node->safe_psql('postgres', $alias_ok), "t\n10", '... which KMS still decrypts');
is($node->safe_psql('postgres', q{SELECT pgphi.rewrap_keys('alias_key')}), '1', 'rewrap_keys after the rotation');
my $material_after = $node->safe_psql('postgres', $kek_version);
like($material_after, qr/^\Q$second\E#[0-9a-f]{64}$/, '... records the same key ARN');
isnt($material_after, $material_before, '... with the new key material id: the rotation shows in key_versions');
is($node->safe_psql('postgres', $alias_ok), "t\n10", '... and every value decrypts');

###########################################################################
# 3. A KMS key pending deletion: 55000 with the reason.
###########################################################################
aws('schedule-key-deletion', '--key-id', $second, '--pending-window-in-days', '7');
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM a}, qr/55000: the KMS key is not usable: .*pending deletion/,
	'a KMS key pending deletion: 55000, saying so');
like(slurp_file($node->logfile), qr/AWS request id [0-9a-f-]{36}/, 'the server log has the AWS request id of the failure');
aws('cancel-key-deletion', '--key-id', $second);
aws('enable-key', '--key-id', $second);

###########################################################################
# 4. Endpoints with the default port, a trailing slash or a path still sign.
###########################################################################
for my $endpoint ("$url/", "$url//kms/") {
	$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.aws_kms_endpoint = '$endpoint'");
	PgphiTest::reload_broker($node);
	is($node->safe_psql('postgres', $all), "t\n30", "pgphi.aws_kms_endpoint = '$endpoint' works");
}
$node->safe_psql('postgres', "ALTER SYSTEM RESET pgphi.aws_kms_endpoint");
PgphiTest::reload_broker($node);

###########################################################################
# 5. Vault: HA redirects, 412 and 429 retried, 423 and sealed 503 said to be
#    what they are (08006, never XX001); a policy denial is no reason to log
#    in again.
###########################################################################
my $vault_all = q{SELECT pgphi.flush_cache() >= 0; SELECT count(*) FROM t WHERE pgphi.decrypt_phi(v) = 'v-' || id};
for my $fault ([ 'standby_redirect', 'a standby\'s 307, followed once' ],
	[ 'missing_state', '412 from a performance standby, retried' ],
	[ 'throttle', '429 with Retry-After, retried after it' ])
{
	$emulator->fault(mode => $fault->[0], target => 'vault', count => 1);
	is($node->safe_psql('postgres', $vault_all), "t\n30", $fault->[1]);
}
$emulator->fault(mode => 'standby_redirect', target => 'vault');
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t}, qr/08006: Vault redirected again/, 'redirected in a loop: 08006');
$emulator->fault(mode => 'namespace_locked', target => 'vault');
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t}, qr/08006: Vault .*HTTP 423/, 'a locked namespace (423): 08006');
$emulator->fault(mode => 'sealed', target => 'vault');
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t}, qr/08006: Vault .*HTTP 503: Vault is sealed/, 'a sealed Vault: 08006');
$emulator->clear_faults;

# AppRole login, then a Transit key the policy does not cover.
my $role_id = $emulator->write_secret('role-id', $emulator->{approle}[0]);
my $secret_id = $emulator->write_secret('secret-id', $emulator->{approle}[1]);
$node->safe_psql('postgres', qq{ALTER SYSTEM SET pgphi.vault_token_file = '';
	ALTER SYSTEM SET pgphi.vault_approle_role_id_file = '$role_id';
	ALTER SYSTEM SET pgphi.vault_approle_secret_id_file = '$secret_id'});
PgphiTest::reload_broker($node);
$emulator->control('POST', 'vault/keys', { name => 'not-in-the-policy' });
is($node->safe_psql('postgres', $vault_all), "t\n30", 'AppRole with the documented policy decrypts');
my $logins = $emulator->stats->{vault_logins};
for (1 .. 3)
{
	fails_with(q{SELECT pgphi.create_key('outside', provider => 'vault', kek => 'not-in-the-policy')},
		qr/42501: permission denied by Vault/, "a key outside the policy: 42501 (attempt $_)");
}
is($emulator->stats->{vault_logins}, $logins, '... without spending a secret_id use on a new login each time');

###########################################################################
# 6. An explicit outbound proxy: both providers go through it with CONNECT
#    (TLS stays end to end); environment proxies are never used.
###########################################################################
my $proxy_state = "$PostgreSQL::Test::Utils::tmp_check/proxy";
mkdir $proxy_state;
my $proxy = IPC::Run::start([ '/usr/bin/python3', "$ENV{PGPHI_TEST_DIR}/emulator/connect_proxy.py", $proxy_state ]);
for (1 .. 100) { last if -s "$proxy_state/proxy_port"; select(undef, undef, undef, 0.1); }
my $proxy_port = slurp_file("$proxy_state/proxy_port");
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.provider_proxy = 'http://127.0.0.1:$proxy_port'");
PgphiTest::reload_broker($node);
is($node->safe_psql('postgres', $all), "t\n30", 'through an explicit CONNECT proxy, both providers work');
my $tunnels = -e "$proxy_state/proxy.log" ? slurp_file("$proxy_state/proxy.log") : '';
like($tunnels, qr/^CONNECT 127\.0\.0\.1:$emulator->{port}$/m, '... and the proxy tunnelled them');
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.provider_proxy = 'socks5://127.0.0.1:$proxy_port'");
PgphiTest::reload_broker($node);
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t}, qr/F0000: the outbound proxy for Vault is not an http/,
	'a proxy that is not http(s): F0000');
$node->safe_psql('postgres', "ALTER SYSTEM RESET pgphi.provider_proxy");
PgphiTest::reload_broker($node);
$proxy->kill_kill;

###########################################################################
# 7. A token read from a file is looked up, and renewed before it expires
#    (a token with a 6-second TTL stays usable for 12 seconds).
###########################################################################
my $short = KeyManagerEmulator->new(name => 'short_ttl', pki => $pki, approle_ttl => 6);
my $short_token = $short->write_secret('vault-token-file', $short->vault_login);
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.vault_addr = '@{[ $short->url ]}';
	ALTER SYSTEM SET pgphi.vault_token_file = '$short_token'");
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('renewing', provider => 'vault', kek => 'pgphi-kek');
	CREATE TABLE r AS SELECT i AS id, pgphi.encrypt_phi('r-' || i, 'renewing') AS v FROM generate_series(1, 5) i});
my $renewed_ok = 1;
for (1 .. 6)
{
	sleep 2;
	$renewed_ok &&= $node->safe_psql('postgres', q{SELECT pgphi.flush_cache() >= 0;
		SELECT count(*) FROM r WHERE pgphi.decrypt_phi(v) = 'r-' || id}) eq "t\n5";
}
ok($renewed_ok, 'a 6-second token from the token file works for 12 seconds of cold decrypts');
my $short_stats = $short->stats->{vault};
cmp_ok($short_stats->{lookup_self} // 0, '>=', 1, '... pgphi looked the token up');
cmp_ok($short_stats->{renew_self} // 0, '>=', 1, '... and renewed it before it expired');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET pgphi.vault_addr; ALTER SYSTEM RESET pgphi.vault_token_file');
$short->stop;

###########################################################################
# 8. Each Vault DEK is bound to its pgphi key and version (Transit
#    associated_data): a wrapped DEK moved in the catalog does not unwrap.
#    A DEK of pgphi 0.2.0, bound to nothing, still unwraps; rewrap_keys
#    binds it; with pgphi.vault_accept_unbound_deks off it is refused.
###########################################################################
PgphiTest::reload_broker($node);
my $v_key_id = $node->safe_psql('postgres', q{SELECT key_id FROM pgphi.keys WHERE name = 'v_key'});
sub stored_dek
{
	my ($key_id, $version) = @_;
	return $node->safe_psql('postgres', "SELECT convert_from(wrapped_dek, 'UTF8') FROM pgphi.key_versions
		WHERE key_id = $key_id AND version = $version");
}
sub store_dek
{
	my ($key_id, $version, $text) = @_;
	$node->safe_psql('postgres', "UPDATE pgphi.key_versions SET wrapped_dek = convert_to('$text', 'UTF8')
		WHERE key_id = $key_id AND version = $version");
}
my ($bound_v1, $bound_v2) = (stored_dek($v_key_id, 1), stored_dek($v_key_id, 2));
like($bound_v1, qr/^pgphi-ad1:vault:v\d+:/, 'a Vault DEK is stored with the mark of its binding');
$node->safe_psql('postgres', qq{SELECT pgphi.create_key('v_other', provider => 'vault', kek => '$emulator->{vault_key}')});
my $other_id = $node->safe_psql('postgres', q{SELECT key_id FROM pgphi.keys WHERE name = 'v_other'});
store_dek($v_key_id, 1, stored_dek($other_id, 1));
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t}, qr/XX001: Vault could not unwrap the DEK/,
	"another key's wrapped DEK, copied into this key's version: XX001");
store_dek($v_key_id, 1, $bound_v2);
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t}, qr/XX001: Vault could not unwrap the DEK/,
	"the same key's version 2 DEK, copied into version 1: XX001");
store_dek($v_key_id, 1, $bound_v1);
is($node->safe_psql('postgres', $vault_all), "t\n30", '... and with its own DEK back, every value decrypts');

# The 0.2.0 form of the same DEK: Transit ciphertext without associated data.
(my $transit_ciphertext = $bound_v1) =~ s/^pgphi-ad1://;
my $binding = MIME::Base64::encode_base64("pgphi DEK key_id=$v_key_id version=1", '');
my $dek = $emulator->vault_api("transit/decrypt/$emulator->{vault_key}",
	{ ciphertext => $transit_ciphertext, associated_data => $binding })->{data}{plaintext};
my $unbound = $emulator->vault_api("transit/encrypt/$emulator->{vault_key}", { plaintext => $dek })->{data}{ciphertext};
store_dek($v_key_id, 1, $unbound);
is($node->safe_psql('postgres', $vault_all), "t\n30", 'a DEK of pgphi 0.2.0, bound to nothing, still unwraps');
is($node->safe_psql('postgres', q{SELECT pgphi.rewrap_keys('v_key')}), '2', 'rewrap_keys rewraps both versions');
like(stored_dek($v_key_id, 1), qr/^pgphi-ad1:vault:v\d+:/, '... and binds the unbound one');
is($node->safe_psql('postgres', $vault_all), "t\n30", '... after which every value decrypts');
store_dek($v_key_id, 1, $unbound);
$node->safe_psql('postgres', 'ALTER SYSTEM SET pgphi.vault_accept_unbound_deks = off');
PgphiTest::reload_broker($node);
fails_with(q{SELECT count(pgphi.decrypt_phi(v)) FROM t},
	qr/XX001: wrapped DEK is not bound to its pgphi key, and pgphi.vault_accept_unbound_deks is off/,
	'with pgphi.vault_accept_unbound_deks off, an unbound DEK is refused: XX001');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET pgphi.vault_accept_unbound_deks');
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.rewrap_keys('v_key')});
is($node->safe_psql('postgres', $vault_all), "t\n30", '... and, accepted again and rewrapped, it decrypts');

done_testing();
