# pgphi.rekey: moving a key's DEKs to another key manager without touching
# table data. Every direction a deployment takes: local -> Vault -> AWS KMS ->
# another KMS key (ReEncrypt inside KMS) -> local (issue 14), and local ->
# KMIP -> PKCS#11 -> local (issue 15), against the emulator over TLS, Debian's
# pykmip-server and a SoftHSM2 token. After each step every value decrypts on
# the primary and on a standby with an empty cache (so through the new key
# manager), the catalog names the new KEK, and the audit trail has the move.
# The second custodian's approval is required; a rekey cancelled between
# versions keeps what it moved, leaves every value readable, and a second
# CALL finishes it without a new approval.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use IPC::Run;
use PgphiTest;
use KeyManagerEmulator;
use KmipServer;
use SoftHsmToken;

plan skip_all => 'softhsm2 and opensc are not installed (scripts/install-deps.sh)' unless SoftHsmToken::available();
my $softhsm = $SoftHsmToken::MODULE;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $second_kms_key = '0987dcba-09fe-87dc-65ba-ab0987654321';
my $emulator = KeyManagerEmulator->new(pki => $pki, extra => [ '--kms-key', $second_kms_key ]);
my $kmip = KmipServer->new(pki => $pki, dir => "$PostgreSQL::Test::Utils::tmp_check/kmip");
my $kmip_kek = $kmip->admin('create', 'pgphi-kek');

# A SoftHSM2 token with a non-extractable AES-256 KEK.
my $token = SoftHsmToken->new(dir => "$PostgreSQL::Test::Utils::tmp_check/pkcs11", label => 'pgphi-rekey');
my $pin = $token->{pin};
$token->tool('--keygen --key-type AES:32 --sensitive --label pgphi-kek --id 01') == 0 or die 'pkcs11-tool --keygen failed';
my $pin_file = $emulator->write_secret('pkcs11-pin', "$pin\n");

my $node = PgphiTest::new_node('primary', allows_streaming => 1);
$node->append_conf('postgresql.conf', $emulator->postgres_settings . $kmip->postgres_settings . <<CONF);
pgphi.pkcs11_module = '$softhsm'
pgphi.pkcs11_token_label = 'pgphi-rekey'
pgphi.pkcs11_pin_file = '$pin_file'
pgphi.provider_timeout = 5000
pgphi.key_wait_timeout = 30s
CONF
$node->restart;
$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE alice LOGIN IN ROLE pgphi_key_custodian;
	CREATE ROLE bob LOGIN IN ROLE pgphi_key_custodian;
	CREATE ROLE mallory LOGIN;
	-- Three versions each (one retired), values under all of them.
	SELECT pgphi.create_key('mrn_key');
	SELECT pgphi.create_key('lab_key');
	CREATE TABLE patients (id int PRIMARY KEY, mrn pgphi.encrypted, lab pgphi.encrypted);
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('mrn-' || i, 'mrn_key', i::text),
	       pgphi.encrypt_phi('lab-' || i, 'lab_key', i::text) FROM generate_series(1, 40) i;
	SELECT pgphi.rotate_key('mrn_key'), pgphi.rotate_key('lab_key');
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('mrn-' || i, 'mrn_key', i::text),
	       pgphi.encrypt_phi('lab-' || i, 'lab_key', i::text) FROM generate_series(41, 80) i;
	SELECT pgphi.rotate_key('mrn_key'), pgphi.rotate_key('lab_key');
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('mrn-' || i, 'mrn_key', i::text),
	       pgphi.encrypt_phi('lab-' || i, 'lab_key', i::text) FROM generate_series(81, 120) i;
});

$node->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'base', has_streaming => 1);
chmod 0600, $standby->data_dir . '/pgphi_local.kek'; # (the backup copy is group-readable)
$standby->start;

my $table_before = $node->safe_psql('postgres', q{SELECT md5(string_agg(mrn::text || lab::text, ',' ORDER BY id)) FROM patients});
my $all_decrypt = q{DO $$BEGIN PERFORM pgphi.flush_cache(); END$$;
	SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(mrn, 'mrn_key', id::text) = 'mrn-' || id
	   AND pgphi.decrypt_phi(lab, 'lab_key', id::text) = 'lab-' || id};

sub wrappers
{
	my ($key) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT string_agg(provider || ':' || kek_ref || (CASE WHEN rekey_pending THEN ' pending' ELSE '' END), ',' ORDER BY version)
		  FROM pgphi.key_inventory WHERE key_name = '$key'});
}

sub as_role
{
	my ($role, $sql) = @_;
	my ($ret, $stdout, $stderr) = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		extra_params => [ '-U', $role ], on_error_stop => 1);
	return $ret == 0 ? "ok: $stderr" : $stderr;
}

# One move, approved by bob and run by alice, checked end to end.
sub rekey_step
{
	my ($key, $provider, $kek, $expected_wrapper) = @_;
	my $name = "$key to $provider";
	$emulator->reset_stats;
	like(as_role('bob', qq{CALL pgphi.approve_rekey('$key', '$provider', '$kek')}), qr/^ok/, "$name: bob approves");
	like(as_role('alice', qq{CALL pgphi.rekey('$key', '$provider', '$kek')}),
		qr/^ok: (?:.*version \d moved from provider \w+ to provider $provider\n){3}.*every DEK version is under provider $provider/s,
		"$name: alice moves all three versions");
	is(wrappers($key), join(',', ($expected_wrapper) x 3), "$name: key_inventory names the new KEK for every version");
	is($node->safe_psql('postgres', $all_decrypt), '120', "$name: every value decrypts through the new key manager");
	$node->wait_for_catchup($standby);
	is($standby->safe_psql('postgres', $all_decrypt), '120', "$name: and on the standby");
	is($node->safe_psql('postgres', qq{SELECT count(*) FROM pgphi.audit_log
		WHERE key_name = '$key' AND action = 'rekey' AND key_version IS NOT NULL
		  AND detail LIKE '%to provider $provider, KEK $kek,%'}), '3', "$name: the audit trail has one rekey record per version");
}

# The rules first.
like(as_role('alice', q{CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek')}),
	qr/42501: moving pgphi key "mrn_key" to provider vault needs the approval of a second key custodian/,
	'one custodian alone cannot move a key (42501)');
like(as_role('alice', q{CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek');
	CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek')}),
	qr/42501: .*needs the approval of a second key custodian/s, 'nor by approving it herself');
like(as_role('mallory', q{CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek')}),
	qr/42501: permission denied for procedure rekey/, 'a role that is no custodian cannot call it');
like(as_role('mallory', q{CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek')}),
	qr/42501: permission denied for procedure approve_rekey/, '... nor approve');
like(as_role('bob', q{CALL pgphi.approve_rekey('mrn_key', 'nowhere', 'x')}),
	qr/22023: unknown pgphi key provider/, 'an unknown provider is refused (22023)');
like(as_role('bob', q{CALL pgphi.approve_rekey('mrn_key', 'vault')}),
	qr/22023: provider vault needs the KEK to use/, 'a remote provider needs its KEK (22023)');
like(as_role('bob', q{CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek');
	BEGIN; CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek'); COMMIT;}),
	qr/2D000: invalid transaction termination/, 'rekey commits per version, so it refuses to run inside a transaction block');
like(as_role('bob', qq{CALL pgphi.approve_rekey('mrn_key', 'vault', E'pgphi-kek\\n2026-12-01 LOG:  forged')}),
	qr/22023: invalid KEK reference for provider vault/, 'a KEK reference with a control character is refused (22023)');
like(as_role('bob', "CALL pgphi.approve_rekey('mrn_key', 'vault', '" . ('k' x 300) . "')"),
	qr/22023: invalid KEK reference/, '... and one too long for the key broker');

# A custodian cannot make its own second custodian.
$node->safe_psql('postgres', q{
	CREATE ROLE carol LOGIN CREATEROLE;
	GRANT pgphi_key_custodian TO carol WITH ADMIN OPTION;
	CREATE ROLE dave LOGIN;
	GRANT pgphi_key_custodian TO dave WITH ADMIN OPTION;
	CREATE ROLE erin LOGIN;
	CREATE SCHEMA carol AUTHORIZATION carol;
	GRANT USAGE ON SCHEMA carol TO bob;
});
like(as_role('carol', q{CREATE ROLE sock LOGIN; GRANT pgphi_key_custodian TO sock;
	CREATE ROLE sock2 LOGIN; GRANT pgphi_key_custodian TO sock2}), qr/^ok/,
	'carol (CREATEROLE) makes two roles of her own key custodians');
like(as_role('sock', q{CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek')}), qr/^ok/, '... which approves');
like(as_role('carol', q{CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek')}),
	qr/42501: moving pgphi key "mrn_key" to provider vault needs the approval of a second key custodian.*roles it controls/s,
	'an approval by a role the requester made a custodian does not count (CREATEROLE)');
like(as_role('sock2', q{CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek')}), qr/42501: .*needs the approval of a second key custodian/s,
	'nor does one by a second role of hers, for the first: one role made both custodians');
like(as_role('dave', q{GRANT pgphi_key_custodian TO erin}), qr/^ok/, 'dave (ADMIN OPTION, no CREATEROLE) makes erin a custodian');
like(as_role('erin', q{CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek')}), qr/^ok/, '... erin approves');
like(as_role('dave', q{CALL pgphi.rekey('mrn_key', 'vault', 'pgphi-kek')}), qr/42501: .*needs the approval of a second key custodian/s,
	'an approval by a role whose custodian membership the requester granted does not count');
is($node->safe_psql('postgres', q{SELECT pgphi._approval_dependence('dave', 'erin') IS NOT NULL,
	pgphi._approval_dependence('sock', 'sock2') IS NOT NULL, pgphi._approval_dependence('alice', 'bob')}),
	't|t|role carol can act for both, or make either a key custodian',
	'dave controls erin, carol both socks; while carol and dave administer pgphi_key_custodian, they control alice and bob too');
# Custodian memberships administered by a superuser only, as the docs say:
# then alice and bob are two people.
# (CASCADE: on 16 and later the memberships carol and dave granted go too.)
$node->safe_psql('postgres', q{ALTER ROLE carol NOCREATEROLE;
	REVOKE ADMIN OPTION FOR pgphi_key_custodian FROM carol, dave CASCADE});
is($node->safe_psql('postgres', q{SELECT pgphi._approval_dependence('alice', 'bob') IS NULL}), 't',
	'once they do not, alice and bob are independent again');

# An approval cannot be planted in another custodian's session.
$node->safe_psql('postgres', q{DELETE FROM pgphi.rekey_approvals WHERE approved_by = 'bob'});
like(as_role('carol', q{
	CREATE TABLE carol.handoff (note text);
	GRANT INSERT ON carol.handoff TO bob;
	CREATE FUNCTION carol.handoff_approves() RETURNS trigger LANGUAGE plpgsql AS
	  $t$BEGIN CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek'); RETURN NEW; END$t$;
	CREATE TRIGGER approve AFTER INSERT ON carol.handoff FOR EACH ROW EXECUTE FUNCTION carol.handoff_approves();
	CREATE FUNCTION carol.shift_report() RETURNS int LANGUAGE plpgsql AS
	  $f$BEGIN CALL pgphi.approve_rekey('mrn_key', 'vault', 'pgphi-kek'); RETURN 1; END$f$;
	GRANT EXECUTE ON FUNCTION carol.shift_report() TO bob;
}), qr/^ok/, 'carol writes a trigger and a function that approve');
like(as_role('bob', q{INSERT INTO carol.handoff VALUES ('shift handoff')}),
	qr/42501: pgphi.approve_rekey must be called by the approving custodian itself/, 'bob\'s insert does not approve for him');
like(as_role('bob', q{SELECT carol.shift_report()}),
	qr/42501: pgphi.approve_rekey must be called by the approving custodian itself/, '... nor the function he calls');
is($node->safe_psql('postgres', q{SELECT string_agg(approved_by, ',' ORDER BY approved_by) FROM pgphi.rekey_approvals}),
	'alice,erin,sock', 'no approval by bob was recorded');

# A destination that does not work changes nothing, and leaves the approval unused.
like(as_role('bob', q{CALL pgphi.approve_rekey('mrn_key', 'vault', 'no-such-kek')}), qr/^ok/, 'bob approves a KEK pgphi may not use');
like(as_role('alice', q{CALL pgphi.rekey('mrn_key', 'vault', 'no-such-kek')}), qr/42501: permission denied by Vault/,
	'the move fails at its first version (42501)');
is(wrappers('mrn_key'), 'local:default,local:default,local:default', 'nothing moved: the key still goes to the local KEK');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.rekey_approvals WHERE kek_ref = 'no-such-kek'}), '1',
	'the approval was not used up');
$node->safe_psql('postgres', q{DELETE FROM pgphi.rekey_approvals WHERE approved_by <> 'bob'});

# Issue 14's path: local -> Vault -> AWS KMS -> a second KMS key -> local.
rekey_step('mrn_key', 'vault', 'pgphi-kek', 'vault:pgphi-kek');
is($node->safe_psql('postgres', q{SELECT string_agg(kek_version, ',' ORDER BY version) FROM pgphi.key_inventory WHERE key_name = 'mrn_key'}),
	'v1,v1,v1', 'the Transit key version that wraps each DEK is recorded');
is($emulator->stats->{vault}{encrypt}, 3, 'Vault wrapped the three DEKs (Transit encrypt)');

# Vault -> KMS, cancelled after the first version: the move is kept, the
# rest stays readable under Vault, and a second CALL finishes.
like(as_role('bob', q{CALL pgphi.approve_rekey('mrn_key', 'aws_kms', '1234abcd-12ab-34cd-56ef-1234567890ab')}), qr/^ok/,
	'bob approves the move to KMS');
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 1500);
my ($out, $err) = ('', '');
my $call = IPC::Run::start([ 'psql', '-X', '-U', 'alice', '-d', $node->connstr('postgres'),
	'-c', q{CALL pgphi.rekey('mrn_key', 'aws_kms', '1234abcd-12ab-34cd-56ef-1234567890ab')} ],
	'>', \$out, '2>', \$err);
$node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pgphi.key_inventory
	WHERE key_name = 'mrn_key' AND provider = 'aws_kms'}) or die 'the first version did not move';
$node->safe_psql('postgres', q{SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'CALL pgphi.rekey%'});
$call->finish;
like($err, qr/canceling statement due to user request/, 'the rekey was cancelled in the middle');
$emulator->clear_faults;
is(wrappers('mrn_key'), 'aws_kms:1234abcd-12ab-34cd-56ef-1234567890ab,vault:pgphi-kek pending,vault:pgphi-kek pending',
	'version 1 moved and committed; versions 2 and 3 still wait under Vault');
is($node->safe_psql('postgres', $all_decrypt), '120', 'every value decrypts in the middle of the rekey');
is($node->safe_psql('postgres', q{SELECT pgphi.rotate_key('mrn_key');
	SELECT provider FROM pgphi.key_inventory WHERE key_name = 'mrn_key' AND state = 'active'}),
	"4\naws_kms", 'a rotation meanwhile puts the new version 4 under the destination');
$node->safe_psql('postgres', q{INSERT INTO patients SELECT i, pgphi.encrypt_phi('mrn-' || i, 'mrn_key', i::text),
	pgphi.encrypt_phi('lab-' || i, 'lab_key', i::text) FROM generate_series(121, 130) i});
like(as_role('alice', q{BEGIN; SELECT pgphi._rekey_start('mrn_key', 'vault', 'pgphi-kek') > 0;
	SELECT string_agg(provider, ',' ORDER BY version) FROM pgphi.key_inventory WHERE key_name = 'mrn_key'; ROLLBACK;}),
	qr/^ok: /, 'going back to the KEK that still wraps pending versions needs no approval (tried, rolled back)');
like(as_role('alice', q{CALL pgphi.rekey('mrn_key', 'aws_kms', '1234abcd-12ab-34cd-56ef-1234567890ab')}),
	qr/^ok: .*version 2 moved from provider vault to provider aws_kms\n.*version 3 moved from provider vault to provider aws_kms\n.*every DEK version is under provider aws_kms/s,
	'calling it again moves the rest, without a new approval');
is($node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE provider = 'aws_kms' AND NOT rekey_pending)
	|| '/' || count(*) FROM pgphi.key_inventory WHERE key_name = 'mrn_key'}), '4/4', 'all four versions are under KMS');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.key_inventory WHERE key_name = 'mrn_key'
	AND kek_version ~ '^arn:aws:kms:us-east-1:\d+:key/1234abcd-12ab-34cd-56ef-1234567890ab(#[0-9a-f]{64})?$'}), '4',
	'each records the KMS key ARN that wrapped it (with the key material id where KMS names it)');
is($node->safe_psql('postgres', $all_decrypt), '130', 'the 130 values decrypt');
$node->safe_psql('postgres', q{DELETE FROM patients WHERE id > 120});
$table_before = $node->safe_psql('postgres', q{SELECT md5(string_agg(mrn::text || lab::text, ',' ORDER BY id)) FROM patients});

# KMS -> another KMS key: ReEncrypt, the DEK never leaves KMS.
$emulator->reset_stats;
like(as_role('bob', qq{CALL pgphi.approve_rekey('mrn_key', 'aws_kms', '$second_kms_key')}), qr/^ok/, 'bob approves a second KMS key');
like(as_role('alice', qq{CALL pgphi.rekey('mrn_key', 'aws_kms', '$second_kms_key')}), qr/(?:moved from provider aws_kms to provider aws_kms\n.*){4}/s,
	'alice moves the four versions to it');
my $kms_ops = $emulator->stats->{kms};
is(($kms_ops->{ReEncrypt} // 0) . '/' . ($kms_ops->{Decrypt} // 0), '4/0',
	'inside KMS: four ReEncrypt calls and no Decrypt');
is($node->safe_psql('postgres', $all_decrypt), '120', 'every value decrypts under the second KMS key');
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres', $all_decrypt), '120', 'and on the standby');

like(as_role('bob', q{CALL pgphi.approve_rekey('mrn_key', 'local')}), qr/^ok/, 'bob approves going back to local');
like(as_role('alice', q{CALL pgphi.rekey('mrn_key', 'local')}), qr/(?:moved from provider aws_kms to provider local\n.*){4}/s, 'KMS to local');
is($node->safe_psql('postgres', $all_decrypt), '120', 'every value decrypts under the local KEK again');

# Issue 15's path: local -> KMIP -> PKCS#11 -> local.
rekey_step('lab_key', 'kmip', $kmip_kek, "kmip:$kmip_kek");
rekey_step('lab_key', 'pkcs11', 'label:pgphi-kek', 'pkcs11:label:pgphi-kek');
rekey_step('lab_key', 'local', 'default', 'local:default');

is($node->safe_psql('postgres', q{SELECT md5(string_agg(mrn::text || lab::text, ',' ORDER BY id)) FROM patients}),
	$table_before, 'no table data was touched: every ciphertext is as it was');
like(as_role('alice', q{CALL pgphi.rekey('lab_key', 'local', 'default')}), qr/^ok: (?!.*moved from).*every DEK version is under provider local, KEK default/s,
	'a rekey to where the key already is moves nothing and needs no approval');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.rekey_approvals}), '0', 'every approval was used up');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log WHERE action = 'approve_rekey'}), '12',
	'each approval is audited (12, including those that did not count)');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log WHERE action = 'rekey' AND key_version IS NULL}), '7',
	'each move of a key to a new destination is audited (7)');
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'the audit chain verifies');
unlike(slurp_file($node->logfile), qr/-----BEGIN|dek_in_transit/, 'no key material in the server log');

done_testing();
