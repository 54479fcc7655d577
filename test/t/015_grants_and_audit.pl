# Per-key grants as an open session sees them, plaintext only over TLS (also
# in parallel workers), and key-manager failures in the audit log.
use strict;
use warnings;

use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);

my $node = PgphiTest::new_node('access');
my $data = $node->data_dir;
copy("$pki/server.pem", "$data/server.crt") or die "copy: $!";
copy("$pki/server.key", "$data/server.key") or die "copy: $!";
chmod 0600, "$data/server.key";
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
listen_addresses = '127.0.0.1'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
CONF
$node->append_conf('pg_hba.conf', "host all all 127.0.0.1/32 trust\n");
$node->restart;

my $kms_key = $emulator->{kms_key};
$node->safe_psql('postgres', qq{
	CREATE EXTENSION pgphi;
	CREATE ROLE reader LOGIN;
	CREATE ROLE ward_staff;
	GRANT pgphi_decrypt TO reader;
	SELECT pgphi.create_key('ssn');
	SELECT pgphi.create_key('kms_ssn', provider => 'aws_kms', kek => '$kms_key');
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted, k_ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'ssn'), pgphi.encrypt_phi('kssn-' || i, 'kms_ssn')
	  FROM generate_series(1, 2000) i;
	GRANT SELECT ON patients TO reader;
});

# --- Grants reach a session that stays open -------------------------------

my $session = $node->background_psql('postgres', on_error_stop => 0, extra_params => ['-U', 'reader']);
my $decrypt_one = q{SELECT pgphi.decrypt_phi(ssn) FROM patients WHERE id = 7;};
sub reader_sees
{
	$session->{stderr} = '';
	my $out = $session->query($decrypt_one);
	return $session->{stderr} =~ /permission denied to decrypt/ ? 'refused' : $out;
}

is(reader_sees(), 'refused', 'an open session without a grant is refused');
$node->safe_psql('postgres', q{SELECT pgphi.grant_decrypt('ssn', 'reader')});
is(reader_sees(), 'ssn-7', 'a grant committed elsewhere applies at its next statement');
$node->safe_psql('postgres', q{SELECT pgphi.revoke_decrypt('ssn', 'reader')});
is(reader_sees(), 'refused', 'and so does a revocation');
$node->safe_psql('postgres', q{SELECT pgphi.grant_decrypt('ssn', 'ward_staff')});
is(reader_sees(), 'refused', 'a grant to a group the reader is not in does not help');
$node->safe_psql('postgres', q{GRANT ward_staff TO reader});
is(reader_sees(), 'refused', 'joining the group after the grant does not bring the key (test/t/033)');
$node->safe_psql('postgres', q{SELECT pgphi.approve_grant_member('ssn', 'decrypt', 'ward_staff', 'reader')});
is(reader_sees(), 'ssn-7', 'a custodian\'s approval applies at the next statement');
$node->safe_psql('postgres', q{REVOKE ward_staff FROM reader});
is(reader_sees(), 'refused', 'leaving the group takes the key away');
$session->quit;

# --- Plaintext only over TLS --------------------------------------------------

$node->safe_psql('postgres', q{
	SELECT pgphi.grant_decrypt('ssn', 'reader');
	ALTER SYSTEM SET pgphi.plaintext_transport = 'tls';
	SELECT pg_reload_conf();
});
my $port = $node->port;
sub over
{
	my ($conninfo, $sql) = @_;
	my ($stdout, $stderr);
	IPC::Run::run([ 'psql', '-XAtq', '-v', 'VERBOSITY=verbose', '-d', "$conninfo port=$port dbname=postgres user=reader",
			'-c', $sql ], '>', \$stdout, '2>', \$stderr);
	return $stderr =~ /(\d{5}): pgphi does not return plaintext/ ? "refused $1" : $stdout =~ s/\n$//r;
}
is(over('host=127.0.0.1 sslmode=disable', $decrypt_one), 'refused 28000', 'TCP without TLS: refused (28000)');
is(over('host=127.0.0.1 sslmode=require', $decrypt_one), 'ssn-7', 'TCP with TLS: plaintext');
is(over("host=$node->{_host}", $decrypt_one), 'refused 28000', 'Unix socket under "tls": refused');
my $parallel = q{SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
	SET max_parallel_workers_per_gather = 2; SET parallel_leader_participation = off;
	SELECT count(pgphi.decrypt_phi(ssn)) FROM patients;};
like(over('host=127.0.0.1 sslmode=disable', $parallel =~ s/SELECT count/EXPLAIN (COSTS OFF) SELECT count/r),
	qr/Gather.*Workers Planned: 2.*Parallel Seq Scan/s, 'the next query runs in parallel workers');
is(over('host=127.0.0.1 sslmode=disable', $parallel), 'refused 28000',
	'parallel workers refuse too, for their leader\'s connection');
is(over('host=127.0.0.1 sslmode=require', $parallel), '2000', 'and decrypt for a TLS connection');
is(over('host=127.0.0.1 sslmode=disable options=-cpgphi.client_transport=tls', $decrypt_one), 'refused 28000',
	'a client cannot claim TLS through a startup option');
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.plaintext_transport = 'tls_or_local'; SELECT pg_reload_conf();});
is(over("host=$node->{_host}", $decrypt_one), 'ssn-7', 'Unix socket under "tls_or_local": plaintext');
is(over('host=127.0.0.1 sslmode=disable', $decrypt_one), 'refused 28000', 'TCP without TLS still refused');
$node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE acting_role = 'reader' AND detail = 'client connection without TLS')})
  or die 'the transport refusal was not audited';
pass('transport refusals are in the audit log');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET pgphi.plaintext_transport; SELECT pg_reload_conf();});

# --- Key-manager failures are audited -----------------------------------------

$emulator->fault(mode => 'deny', target => 'kms');
like(PgphiTest::psql_error($node, 'postgres', q{SELECT count(pgphi.decrypt_phi(k_ssn)) FROM patients}, flush => 1),
	qr/42501: permission denied by AWS KMS/, 'a KMS refusal fails the query');
$emulator->clear_faults;
ok($node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE action = 'unwrap' AND outcome = 'failed' AND key_name = 'kms_ssn' AND detail LIKE '%AccessDenied%')}),
	'and is in the audit log as a failed unwrap');
is($node->safe_psql('postgres', q{SELECT count(pgphi.decrypt_phi(k_ssn)) FROM patients}), '2000',
	'nothing lost once the key manager answers again');
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'the chain is intact');

my $log = slurp_file($node->logfile);
unlike($log, qr/ssn-7|kssn-/, 'no plaintext in the server log');

done_testing();
