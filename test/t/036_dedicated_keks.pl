# True crypto-shredding (issue 16): create_key(..., dedicated_kek => true)
# makes a KEK for that key alone in Vault, AWS KMS (at the emulator), a KMIP
# server (Debian's pykmip-server) and a PKCS#11 token (SoftHSM2); the key
# reaches its end with deactivate_key, retire_key_version and dual-control
# destroy_key, and destroying its last version deletes the KEK in the key
# manager (KMS: schedules the deletion). A backup taken before, restored into
# a new cluster, then cannot decrypt a single value: that is what deleting
# the KEK buys over destroying the wrapped DEKs alone.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;
use KmipServer;
use SoftHsmToken;

plan skip_all => 'softhsm2 and opensc are not installed (scripts/install-deps.sh)' unless SoftHsmToken::available();

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
my $kmip = KmipServer->new(pki => $pki, dir => "$PostgreSQL::Test::Utils::tmp_check/kmip");

my $token = SoftHsmToken->new(dir => "$PostgreSQL::Test::Utils::tmp_check/pkcs11", label => 'pgphi-dedicated');
my $pin = $token->{pin};
my $pin_file = $emulator->write_secret('pkcs11-pin', "$pin\n");

my $node = PgphiTest::new_node('primary', allows_streaming => 1);
$node->append_conf('postgresql.conf', $emulator->postgres_settings . $kmip->postgres_settings . <<CONF);
pgphi.pkcs11_module = '$SoftHsmToken::MODULE'
pgphi.pkcs11_token_label = 'pgphi-dedicated'
pgphi.pkcs11_pin_file = '$pin_file'
pgphi.aws_kms_deletion_window = 7
pgphi.provider_timeout = 5000
CONF
$node->restart;
$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
});

sub fails_with
{
	my ($sql, $pattern, $name) = @_;
	like(PgphiTest::psql_error($node, 'postgres', $sql), $pattern, $name);
}

###########################################################################
# 1. What cannot have a KEK of its own is refused before anything is made.
###########################################################################
fails_with(q{SELECT pgphi.create_key('d_local', dedicated_kek => true)},
	qr/0A000: the local provider cannot make a KEK for one key/, 'the local provider: 0A000');
fails_with(q{SELECT pgphi.create_key('d_named', provider => 'aws_kms', kek => 'alias/mine', dedicated_kek => true)},
	qr/22023: pgphi names a dedicated KEK itself/, 'a KEK name of the caller\'s choosing: 22023');
fails_with(qq{SELECT pgphi.create_key('d_taken', provider => 'vault', kek => '$emulator->{vault_key}', dedicated_kek => true)},
	qr/22023: pgphi names a dedicated KEK itself/, '... so an existing Transit key is never adopted');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.keys}), '0', '... and no key was created');

###########################################################################
# 2. A dedicated KEK in each key manager, two versions of values under it.
###########################################################################
my @providers = qw(vault aws_kms kmip pkcs11);
my %kek;
for my $p (@providers)
{
	$node->safe_psql('postgres', qq{
		SELECT pgphi.create_key('d_$p', provider => '$p', dedicated_kek => true);
		CREATE TABLE t_$p (id int, v pgphi.encrypted);
		INSERT INTO t_$p SELECT i, pgphi.encrypt_phi('$p-' || i, 'd_$p') FROM generate_series(1, 20) i;
		SELECT pgphi.rotate_key('d_$p');
		INSERT INTO t_$p SELECT i, pgphi.encrypt_phi('$p-' || i, 'd_$p') FROM generate_series(21, 40) i;
	});
	$kek{$p} = $node->safe_psql('postgres', qq{SELECT kek_ref FROM pgphi.keys WHERE name = 'd_$p' AND kek_dedicated});
}
like($kek{vault}, qr/^pgphi-dedicated-d_vault-[0-9a-f]{12}$/, "Vault: a new Transit key, $kek{vault}");
is($emulator->vault_api("transit/keys/$kek{vault}", undef, 'GET')->{data}{type}, 'aes256-gcm96', '... which exists in Vault');
like($kek{aws_kms}, qr{^arn:aws:kms:us-east-1:\d+:key/}, "KMS: a new key, $kek{aws_kms}");
is($emulator->aws_cli('describe-key', '--key-id', $kek{aws_kms}, '--query', 'KeyMetadata.[KeyState,Description]'),
	"Enabled\tpgphi: the dedicated KEK of pgphi key d_aws_kms\n", '... enabled, and described as the key\'s own');
like($kek{kmip}, qr/^\S+$/, "KMIP: a new object, unique identifier $kek{kmip}");
is($kmip->admin('state', $kek{kmip}), 'ACTIVE', '... active on the KMIP server');
like($kek{pkcs11}, qr/^label:pgphi-dedicated-d_pkcs11-[0-9a-f]{12}$/, "PKCS#11: a new token key, $kek{pkcs11}");
is($token->secret_key_labels(), substr($kek{pkcs11}, 6), '... on the token');
my $all = join ' + ', map { "(SELECT count(*) FROM t_$_ WHERE pgphi.decrypt_phi(v) = '$_-' || id)" } @providers;
is($node->safe_psql('postgres', "SELECT pgphi.flush_cache() >= 0; SELECT $all"), "t\n160",
	'every value decrypts through its own KEK');
like($node->safe_psql('postgres', q{SELECT string_agg(detail, '|') FROM pgphi.audit_log
	WHERE action = 'create' AND key_name = 'd_vault'}), qr/\(dedicated to this key\)/, 'the creation is audited as dedicated');
fails_with(q{CALL pgphi.rekey('d_vault', 'local', 'default')},
	qr/0A000: pgphi key "d_vault" has a KEK of its own, which does not move/, 'a key with a KEK of its own does not rekey');
fails_with(qq{SELECT pgphi._delete_dedicated_kek('vault', '$kek{vault}', (SELECT key_id FROM pgphi.keys WHERE name = 'd_vault'), 'd_vault')},
	qr/55000: pgphi will not delete that KEK/, 'a dedicated KEK that still wraps DEKs is not deleted, even when asked directly');

# The backup a hospital keeps: taken before the keys reach their end.
$node->backup('before_destruction');

###########################################################################
# 3. End of life: deactivate (open sessions stop encrypting), retire,
#    destroy with two custodians; the last version takes the KEK with it.
###########################################################################
my $open = $node->background_psql('postgres', on_error_stop => 0);
is($open->query_safe(q{SELECT count(*) FROM t_vault WHERE pgphi.decrypt_phi(v) LIKE 'vault-%'}), '40',
	'an open session decrypts');
is($node->safe_psql('postgres', q{SELECT pgphi.deactivate_key('d_vault')}), '2', 'deactivate_key deactivates version 2');
my $refused = $open->query(q{SELECT pgphi.encrypt_phi('x', 'd_vault')});
like($open->{stderr}, qr/has no active version/, '... the open session\'s next encrypt is refused');
$open->{stderr} = '';
is($open->query_safe(q{SELECT count(*) FROM t_vault WHERE pgphi.decrypt_phi(v) LIKE 'vault-%'}), '40',
	'... while every value still decrypts');
$open->quit;
is($node->safe_psql('postgres', q{SELECT pgphi.deactivate_key('d_vault') IS NULL}), 't',
	'deactivating a key without an active version changes nothing');

for my $p (@providers)
{
	$node->safe_psql('postgres', qq{
		DELETE FROM t_$p;
		SELECT pgphi.deactivate_key('d_$p');
		SELECT pgphi.retire_key_version('d_$p', 1), pgphi.retire_key_version('d_$p', 2);
		SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_destroy('d_$p', 1), pgphi.approve_destroy('d_$p', 2);
		RESET SESSION AUTHORIZATION; SET SESSION AUTHORIZATION c2;
		SELECT pgphi.approve_destroy('d_$p', 1), pgphi.approve_destroy('d_$p', 2);
		SELECT pgphi.destroy_key('d_$p', 1);
	});
	is($node->safe_psql('postgres', qq{SELECT kek_deleted_at IS NULL FROM pgphi.keys WHERE name = 'd_$p'}), 't',
		"$p: destroying version 1 leaves the KEK, which still wraps version 2");
	fails_with(qq{BEGIN; SET SESSION AUTHORIZATION c2; SELECT pgphi.destroy_key('d_$p', 2); COMMIT;},
		qr/25001: destroying the last version of a key with a KEK of its own cannot run inside a transaction block/,
		"$p: the destruction that deletes the KEK refuses a transaction block (a ROLLBACK could not undo it)")
	  if $p eq 'vault';
	$node->safe_psql('postgres', qq{SET SESSION AUTHORIZATION c2; SELECT pgphi.destroy_key('d_$p', 2)});
}
my %deletion = map { $_ => $node->safe_psql('postgres',
	"SELECT kek_deletion FROM pgphi.keys WHERE name = 'd_$_' AND kek_deleted_at IS NOT NULL") } @providers;
is($deletion{vault}, 'the Vault Transit key was deleted', 'Vault: the last destruction deleted the Transit key');
is_deeply($emulator->vault_api("transit/keys/$kek{vault}", undef, 'GET'), { errors => [] }, '... which Vault no longer has');
like($deletion{aws_kms}, qr/^AWS KMS deletes the key on \d{4}-\d\d-\d\dT[\d:]+Z \(after a waiting period of 7 days\)$/,
	"KMS: $deletion{aws_kms}");
is($emulator->aws_cli('describe-key', '--key-id', $kek{aws_kms}, '--query', 'KeyMetadata.KeyState'),
	"PendingDeletion\n", '... and KMS has the key pending deletion');
is($deletion{kmip}, 'the KMIP object was revoked and destroyed', 'KMIP: the object was revoked and destroyed');
ok(!eval { $kmip->admin('state', $kek{kmip}); 1 }, '... and the KMIP server no longer has it');
like($deletion{pkcs11}, qr/^the PKCS#11 key was destroyed on the token \(1 version\)$/, 'PKCS#11: the token key was destroyed');
is($token->secret_key_labels(), '', '... and the token holds no key');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log WHERE action = 'delete_kek'
	AND detail LIKE 'dedicated KEK % of provider %: %'}), '4', 'each deletion is audited (delete_kek)');
fails_with(q{SELECT pgphi.rotate_key('d_vault')}, qr/55000: the dedicated KEK of pgphi key "d_vault" has been deleted/,
	'a key whose KEK is deleted does not rotate: 55000');
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'the audit chain verifies');

###########################################################################
# 4. The backup from before: restored into a new cluster, with the same
#    key managers, not one value decrypts.
###########################################################################
my $restored = PostgreSQL::Test::Cluster->new('restored');
$restored->init_from_backup($node, 'before_destruction');
chmod 0600, $restored->data_dir . '/pgphi_local.kek' if -e $restored->data_dir . '/pgphi_local.kek';
$restored->start;
my %expected = (
	vault   => qr/42704: Vault transit\/decrypt\/pgphi-dedicated-\S+ returned HTTP 400: encryption key not found/,
	aws_kms => qr/55000: the KMS key is not usable: AWS KMS KMSInvalidStateException: .* is pending deletion/,
	kmip    => qr/55000: the KMIP KEK object "\S+" that wrapped this DEK no longer exists/,
	pkcs11  => qr/55000: the PKCS#11 KEK is not usable: version 1 of the KEK is not on the token/);
for my $p (@providers)
{
	my $error = PgphiTest::psql_error($restored, 'postgres', "SELECT count(pgphi.decrypt_phi(v)) FROM t_$p");
	like($error, $expected{$p}, "$p: the backup's wrapped DEKs no longer unwrap");
}
$restored->stop;

done_testing();
