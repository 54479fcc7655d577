# Keys whose KEK lives in Vault Transit or AWS KMS (the emulator in
# test/emulator, over TLS on 127.0.0.1): create, encrypt, decrypt, restart,
# and every key-manager failure gives its own error without losing data.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
my $url = $emulator->url;

my $node = PgphiTest::new_node('providers');
my $aws_credentials = "$emulator->{state}/aws-credentials";
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.provider_timeout = 2000
pgphi.provider_max_retries = 2
CONF
$node->safe_psql('postgres', 'CREATE EXTENSION pgphi');
PgphiTest::reload_broker($node);

my $kms_key = $emulator->{kms_key};
my $vault_key = $emulator->{vault_key};
$node->safe_psql('postgres', qq{
	SELECT pgphi.create_key('vault_ssn', provider => 'vault', kek => '$vault_key');
	SELECT pgphi.create_key('kms_ssn', provider => 'aws_kms', kek => '$kms_key');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, v_ssn pgphi.encrypted, k_ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, 'MRN-' || i,
	       pgphi.encrypt_phi('ssn-' || i, 'vault_ssn', 'MRN-' || i),
	       pgphi.encrypt_phi('ssn-' || i, 'kms_ssn', 'MRN-' || i)
	  FROM generate_series(1, 100) i;
});

is($node->safe_psql('postgres', q{SELECT k.name, v.kek_version FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) WHERE k.name = 'vault_ssn'}),
	'vault_ssn|v1', 'the Vault key records the Transit key version that wrapped its DEK');
like($node->safe_psql('postgres', q{SELECT v.kek_version FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) WHERE k.name = 'kms_ssn'}),
	qr/^arn:aws:kms:us-east-1:\d+:key\/\Q$kms_key\E#[0-9a-f]{64}$/, 'the KMS key records the KMS key ARN and its key material id');

my $all_ok = q{SELECT count(*) FROM patients
	WHERE pgphi.decrypt_phi(v_ssn, 'vault_ssn', mrn) = 'ssn-' || id
	  AND pgphi.decrypt_phi(k_ssn, 'kms_ssn', mrn) = 'ssn-' || id};
is($node->safe_psql('postgres', $all_ok), '100', 'both providers decrypt every value');
$node->restart;
is($node->safe_psql('postgres', $all_ok), '100', 'and again after a restart');

# Each failure, seen by a new session (which must ask the key manager).
sub fails_with
{
	my ($sql, $pattern, $name) = @_;
	like(PgphiTest::psql_error($node, 'postgres', $sql, flush => 1), $pattern, $name);
}
my $vault_decrypt = q{SELECT count(pgphi.decrypt_phi(v_ssn, 'vault_ssn', mrn)) FROM patients};
my $kms_decrypt = q{SELECT count(pgphi.decrypt_phi(k_ssn, 'kms_ssn', mrn)) FROM patients};
sub recovers
{
	my ($name) = @_;
	$emulator->clear_faults;
	is($node->safe_psql('postgres', $all_ok), '100', "$name: nothing lost once the fault clears");
}

$emulator->fault(mode => 'deny', target => 'kms');
fails_with($kms_decrypt, qr/42501: permission denied by AWS KMS AccessDeniedException/, 'KMS denial: 42501');
recovers('KMS denial');

$emulator->fault(mode => 'deny', target => 'vault');
fails_with($vault_decrypt, qr/42501: permission denied by Vault/, 'Vault denial: 42501');
recovers('Vault denial');

$emulator->fault(mode => 'disable_key', target => 'kms', key => $kms_key);
fails_with($kms_decrypt, qr/55000: the KMS key is not usable: AWS KMS DisabledException/, 'disabled KMS key: 55000');
recovers('disabled KMS key');

$emulator->fault(mode => 'throttle', target => 'kms');
fails_with($kms_decrypt, qr/08006: AWS KMS ThrottlingException/, 'KMS throttling beyond the retries: 08006');
recovers('throttling');

$emulator->reset_stats;
$emulator->fault(mode => 'throttle', target => 'kms', count => 1);
is($node->safe_psql('postgres', "SELECT pgphi.flush_cache() >= 0; $kms_decrypt"), "t\n100",
	'one throttled call is retried and succeeds');
is($emulator->stats->{kms}{Decrypt}, 2, '... with exactly one retry');
recovers('single throttle');

$emulator->fault(mode => 'internal_error', target => 'vault');
fails_with($vault_decrypt, qr/08006: Vault .* returned HTTP 500/, 'Vault failing with 500s: 08006');
recovers('Vault 500s');

$emulator->fault(mode => 'slow', target => 'all', delay_ms => 4000);
fails_with($kms_decrypt, qr/08006: AWS KMS is unavailable: .*(timed out|Timeout)/i, 'a key manager slower than pgphi.provider_timeout: 08006');
recovers('slow key manager');

$emulator->fault(mode => 'drop', target => 'all');
fails_with($vault_decrypt, qr/08006: Vault is unavailable/, 'dropped connections: 08006');
recovers('dropped connections');

$emulator->fault(mode => 'expire_tokens', target => 'vault', include_root => 1);
fails_with($vault_decrypt, qr/42501: permission denied by Vault/, 'an expired Vault token: 42501');
# The DBA writes a fresh token into the token file; pgphi reads it again on
# the next refusal, without a reload.
$emulator->write_secret('vault-token', $emulator->vault_login);
recovers('expired token replaced in the token file');

# Settings that break TLS or reachability, changed by reload.
sub with_setting
{
	my ($setting, $value, $code) = @_;
	$node->safe_psql('postgres', "ALTER SYSTEM SET $setting = '$value'");
	PgphiTest::reload_broker($node);
	$code->();
	$node->safe_psql('postgres', "ALTER SYSTEM RESET $setting");
	PgphiTest::reload_broker($node);
}
with_setting('pgphi.vault_ca_file', "$pki/other-ca.pem", sub {
	fails_with($vault_decrypt, qr/08006: Vault is unavailable: .*(certificate|SSL)/i, 'a CA that did not sign the server: 08006');
});
with_setting('pgphi.vault_addr', 'https://127.0.0.1:1', sub {
	fails_with($vault_decrypt, qr/08006: Vault is unavailable: .*(connect|refused)/i, 'an unreachable Vault: 08006');
});
with_setting('pgphi.aws_kms_endpoint', "http://127.0.0.1:$emulator->{port}", sub {
	fails_with($kms_decrypt, qr/F0000: AWS KMS address "http:.*" does not use https/, 'plain http is refused: F0000');
});
my $expired = KeyManagerEmulator->new(pki => $pki, name => 'expired', cert => 'expired');
with_setting('pgphi.vault_addr', $expired->url, sub {
	fails_with($vault_decrypt, qr/08006: Vault is unavailable: .*(expired|certificate)/i, 'an expired server certificate: 08006');
});
$expired->stop;
is($node->safe_psql('postgres', $all_ok), '100', 'every value still decrypts with the right settings');

# AppRole: the token is obtained by login, and a new login replaces an expired one.
my $role_id = $emulator->write_secret('role-id', $emulator->{approle}[0]);
my $secret_id = $emulator->write_secret('secret-id', $emulator->{approle}[1]);
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET pgphi.vault_token_file = '';
	ALTER SYSTEM SET pgphi.vault_approle_role_id_file = '$role_id';
	ALTER SYSTEM SET pgphi.vault_approle_secret_id_file = '$secret_id';
});
PgphiTest::reload_broker($node);
$emulator->reset_stats;
is($node->safe_psql('postgres', "SELECT pgphi.flush_cache() >= 0; $vault_decrypt"), "t\n100",
	'AppRole login decrypts');
ok($emulator->stats->{vault}{login} >= 1, 'the emulator saw an AppRole login');
$emulator->fault(mode => 'expire_tokens', target => 'vault');
is($node->safe_psql('postgres', "SELECT pgphi.flush_cache() >= 0; $vault_decrypt"), "t\n100",
	'a refused AppRole token is replaced by a new login');
is($emulator->stats->{vault}{login}, 2, '... exactly one more login');
$emulator->clear_faults;

# AWS credentials from the EC2 instance metadata service (IMDSv2), with no
# credentials file: the role's temporary keys and session token sign KMS calls.
my $ec2 = KeyManagerEmulator->new(pki => $pki, name => 'ec2', imds_role => 'pgphi-db-role',
	kms_key => $kms_key);
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET pgphi.aws_credentials_file = '';
	ALTER SYSTEM SET pgphi.aws_imds_endpoint = 'http://127.0.0.1:$ec2->{imds_port}';
	ALTER SYSTEM SET pgphi.aws_kms_endpoint = '@{[ $ec2->url ]}';
	ALTER SYSTEM SET pgphi.allow_insecure_http_loopback = on;
});
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', qq{SELECT pgphi.create_key('kms_via_role', provider => 'aws_kms', kek => '$kms_key')});
is($node->safe_psql('postgres', q{SELECT pgphi.flush_cache() >= 0;
	SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('via role', 'kms_via_role'))}), "t\nvia role",
	'AWS KMS with role credentials from the instance metadata service');
ok($ec2->stats->{imds}{'PUT token'} >= 1, '... obtained with the IMDSv2 token flow');
$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET pgphi.aws_imds_endpoint;
	ALTER SYSTEM RESET pgphi.allow_insecure_http_loopback;
});
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.aws_credentials_file = '$aws_credentials'");
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.aws_kms_endpoint = '$url'");
PgphiTest::reload_broker($node);
$ec2->stop;

# Mutual TLS: a Vault that requires client certificates.
my $mtls = KeyManagerEmulator->new(pki => $pki, name => 'mtls', client_ca => 'ca');
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET pgphi.vault_addr = '@{[ $mtls->url ]}';
	ALTER SYSTEM SET pgphi.vault_approle_role_id_file = '';
	ALTER SYSTEM SET pgphi.vault_token_file = '@{[ $mtls->write_secret('token', $mtls->{vault_root_token}) ]}';
});
PgphiTest::reload_broker($node);
fails_with(q{SELECT pgphi.create_key('vault_mtls', provider => 'vault', kek => 'pgphi-kek')},
	qr/08006: Vault is unavailable/, 'a Vault requiring mutual TLS refuses pgphi without a client certificate');
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET pgphi.vault_client_cert = '$pki/client.pem';
	ALTER SYSTEM SET pgphi.vault_client_key = '$pki/client.key';
});
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('vault_mtls', provider => 'vault', kek => 'pgphi-kek')});
is($node->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('over mTLS', 'vault_mtls'))}),
	'over mTLS', '... and serves it with one');
$mtls->stop;

# Nothing secret reached the server log.
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$emulator->{vault_root_token}\E/, 'no Vault token in the server log');
unlike($log, qr/\Q$emulator->{aws}[1]\E/, 'no AWS secret key in the server log');
unlike($log, qr/ssn-\d+/, 'no plaintext in the server log');

$node->stop;
$emulator->stop;
done_testing();
