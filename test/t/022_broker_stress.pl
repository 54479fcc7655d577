# The key broker and its workers under stress (issue 20): faults injected into
# the broker itself with the test-only setting pgphi.test_fault, and the key
# managers' emulator hanging or failing while sessions work.
#  - a C++ exception where the broker used to hash a request (finding 3): the
#    broker survives, no crash restart, sessions are served;
#  - an ERROR while the broker holds its lock (finding 4): it recovers in
#    place and serves sessions, instead of deadlocking on its own lock;
#  - a statement longer than the TTL, then a key-manager outage (finding 5):
#    the statement completes, its key ridden through the outage;
#  - a destroy_key in a transaction that is then prepared (finding 7): refused;
#  - planning a randomized encrypt_phi (finding 8): EXPLAIN seals nothing,
#    while the deterministic form stays an index condition;
#  - a key version whose seals cannot be counted (finding 2, in part):
#    randomized encryption under it is refused, not left uncounted; entries of
#    versions that can no longer encrypt are reclaimed when the table is full;
#  - Vault hanging (finding 6): KMS-backed keys are still served within their
#    normal latency, by a broker process of their own.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use PgphiTest;
use KeyManagerEmulator;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);

my $ttl = 2;      # seconds
my $grace = 60;   # seconds
my $node = PgphiTest::new_node('broker_stress');
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.provider_timeout = 3000
pgphi.provider_max_retries = 0
pgphi.cache_ttl = $ttl
pgphi.key_manager_grace = $grace
pgphi.key_wait_timeout = 8000
max_prepared_transactions = 2
# As in production: a broker that aborts makes the postmaster restart every
# process, which is what the first test must not see.
restart_after_crash = on
CONF
$node->restart;
$node->safe_psql('postgres', qq{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn', provider => 'aws_kms', kek => '$emulator->{kms_key}');
	SELECT pgphi.create_key('victim');
	SELECT pgphi.create_key('vault_ssn', provider => 'vault', kek => '$emulator->{vault_key}');
	CREATE TABLE patients (id int, ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'ssn') FROM generate_series(1, 40) i;
	CREATE TABLE vault_patients (id int, ssn pgphi.encrypted);
	INSERT INTO vault_patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'vault_ssn') FROM generate_series(1, 5) i;
});
my $decrypt = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn) = 'ssn-' || id};

sub broker_pid { return $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()'); }

sub set_fault
{
	my ($fault) = @_;
	$node->append_conf('postgresql.conf', "pgphi.test_fault = '$fault'\n");
	PgphiTest::reload_broker($node);
}

# A session that misses the shared cache, timed.
sub cold_decrypt
{
	my $t0 = time;
	my ($ret, $out, $err) = $node->psql('postgres', "SELECT pgphi.flush_cache();\n$decrypt",
		timeout => 60);
	return ($ret, $out, $err, time - $t0);
}

# Finding 3: a C++ exception in the broker where it used to compute a digest
# with the lock held. The fault makes the broker's next SHA-256 of a request
# throw std::bad_alloc (as EVP_MD_CTX_new failing would); outside run_core
# that reached std::terminate, the broker aborted and the postmaster
# restarted every backend.
my $pid = broker_pid();
my $log_offset = -s $node->logfile;
set_fault('broker_digest');
my ($ret, $out, $err, $took) = cold_decrypt();
is($ret, 0, 'digest fault: a session missing the cache is served') or diag($err);
like($out, qr/^40$/m, '... and decrypts every value');
is(broker_pid(), $pid, '... by the same broker process');
my $log = slurp_file($node->logfile, $log_offset);
unlike($log, qr/terminated by signal|terminating any other active server processes/,
	'... and no process aborted or was restarted');

# Finding 4: an ERROR while the broker holds its lock. Without an error
# handler of its own the broker exits (the bgworker default); on PostgreSQL
# minor releases whose shmem_exit does not release LWLocks before the exit
# callbacks, the callback that clears the broker's latch then waits forever for
# the lock the broker itself holds, and every session times out in get_dek.
# (15.20, on this machine, releases them first: the broker just dies and is
# restarted a second later.) The broker must recover in place.
$log_offset = -s $node->logfile;
set_fault('error_under_lock');
($ret, $out, $err, $took) = cold_decrypt();
is($ret, 0, 'error under the lock: a session missing the cache is served') or diag($err);
like($out, qr/^40$/m, '... and decrypts every value');
cmp_ok($took, '<', 6, "... within the broker's one-second pause, not the 8 s wait timeout");
$log = slurp_file($node->logfile, $log_offset);
like($log, qr/pgphi test fault: an error in the key broker while it holds its lock/,
	'... after the injected error was logged');
is(broker_pid(), $pid, '... and the broker recovered in place');
($ret, $out, $err) = cold_decrypt();
is($ret, 0, '... and keeps serving afterwards');
set_fault('');

# Finding 5: a statement longer than the TTL, with the key manager failing
# from the middle of it. The statement's key used to be reported in use only
# by the statement's start time, so it looked idle, the broker wiped it at
# its TTL and bumped the global generation, the session dropped its copy and
# asked again, and the key manager's failure failed the statement inside the
# grace period.
$node->safe_psql('postgres', $decrypt);    # the key is in the shared cache
$log_offset = -s $node->logfile;
my %io = (out => '', err => '');
my $long = q{SELECT count(*) FROM (SELECT pgphi.decrypt_phi(ssn) = 'ssn-' || id AS ok, pg_sleep(0.2)
	FROM patients) s WHERE ok};
my $t0 = time;
my $handle = IPC::Run::start([ 'psql', '-XAt', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
		'-c', $long ], '>', \$io{out}, '2>', \$io{err}, IPC::Run::timeout(90));
usleep(1_000_000);
$emulator->fault(mode => 'internal_error', target => 'kms');
$handle->finish;
my $long_took = time - $t0;
$emulator->clear_faults;
is($io{out}, "40\n", 'a statement of 8 s under a 2 s TTL, the key manager failing from its second 1, completes')
  or diag($io{err});
cmp_ok($long_took, '>', 3 * $ttl, '... and it did run longer than the TTL');
$log = slurp_file($node->logfile, $log_offset);
like($log, qr/re-validation of key "ssn" version 1 through provider aws_kms failed/,
	'... while the broker\'s re-validations failed (the key was ridden through the outage)');

# Finding 7: a transaction that destroyed a key version cannot be prepared:
# COMMIT PREPARED would never flush the caches, and the flag left behind
# would flush an unrelated later commit.
$node->safe_psql('postgres', q{
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	SELECT pgphi.rotate_key('victim');
	-- (Only a retired version can be destroyed; victim holds no values.)
	SELECT pgphi.retire_key_version('victim', 1);
	SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_destroy('victim', 1); RESET SESSION AUTHORIZATION;
	SET SESSION AUTHORIZATION c2; SELECT pgphi.approve_destroy('victim', 1); RESET SESSION AUTHORIZATION;
});
$node->safe_psql('postgres', $decrypt);
my $prepare_error = PgphiTest::psql_error($node, 'postgres', q{
	BEGIN;
	SELECT pgphi.destroy_key('victim', 1);
	PREPARE TRANSACTION 'destroys';
});
like($prepare_error, qr/0A000: cannot PREPARE a transaction that destroys a pgphi key version/,
	'PREPARE TRANSACTION after destroy_key is refused (0A000)');
my $prepared = $node->safe_psql('postgres', 'SELECT count(*) FROM pg_prepared_xacts');
is($prepared, '0', '... nothing was prepared');
$node->safe_psql('postgres', "ROLLBACK PREPARED 'destroys'") if $prepared ne '0';
is($node->safe_psql('postgres', q{SELECT wrapped_dek IS NOT NULL FROM pgphi.key_versions v JOIN pgphi.keys k
	USING (key_id) WHERE k.name = 'victim' AND v.version = 1}), 't', '... and the version was not destroyed');
$node->safe_psql('postgres', q{SELECT pgphi.destroy_key('victim', 1)});
is($node->safe_psql('postgres', q{SELECT state FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'victim' AND v.version = 1}), 'destroyed', 'destroy_key still works in a plain commit');

# Finding 8: planning estimates a STABLE function's value by running it, so
# with encrypt_phi(..., deterministic => false) STABLE a plain EXPLAIN sealed
# values, counting against the key's nonce budget.
sub seals
{
	return $node->safe_psql('postgres', q{
		SELECT coalesce(sum(u.encryptions), 0) FROM pgphi._usage_counts() u
		  JOIN pgphi.keys k ON k.key_id = u.key_id WHERE k.name = 'ssn'});
}
my $before = seals();
# The flush makes the session hand its unreported seals to the shared count.
$node->safe_psql('postgres', q{
	EXPLAIN SELECT * FROM patients WHERE ssn OPERATOR(pgphi.=) pgphi.encrypt_phi('x', 'ssn', deterministic => false);
	EXPLAIN SELECT * FROM patients WHERE ssn OPERATOR(pgphi.=) pgphi.encrypt_phi('x'::bytea, 'ssn', false);
	EXPLAIN SELECT * FROM patients WHERE ssn OPERATOR(pgphi.=) pgphi.encrypt_phi('{}'::jsonb, 'ssn', false);
	SELECT pgphi.flush_cache();
	SELECT pgphi.decrypt_phi(ssn) FROM patients WHERE id = 1;
});
is(seals(), $before, 'EXPLAIN of a randomized encrypt_phi seals nothing');
is($node->safe_psql('postgres', q{
	SELECT string_agg(DISTINCT provolatile::text, ',') FROM pg_proc p
	 WHERE p.pronamespace = 'pgphi'::regnamespace AND p.proname = 'encrypt_phi'}), 'v',
	'every encrypt_phi overload is VOLATILE');
# (That the deterministic form stays an index condition is checked by sql/searchable.sql.)

# Finding 2 (in part): when the shared table of seal counts is full (the
# fault makes every version not yet counted find it so), randomized
# encryption is refused instead of going uncounted past the nonce limit.
$node->safe_psql('postgres', q{SELECT pgphi.create_key('uncounted')});
set_fault('usage_full');
like(PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.encrypt_phi('x', 'uncounted')}),
	qr/53000: pgphi cannot count the values key "uncounted" version 1 encrypts/,
	'seal counts full: randomized encryption under an uncounted version is refused (53000)');
like($node->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'uncounted', deterministic => true))}),
	qr/^x$/, '... deterministic encryption still works');
is($node->safe_psql('postgres', q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn) = 'ssn-' || id}), '40',
	'... and decryption');
set_fault('');
like($node->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'uncounted'))}), qr/^x$/,
	'... and once it can be counted, randomized encryption works again');

# Finding 6: one hung key manager must not stall the others. Vault answers
# nothing for 20 s (each call times out after pgphi.provider_timeout, 3 s)
# while sessions that miss the cache on KMS-backed keys keep coming; they are
# served as fast as without the fault. With one serial broker they waited
# behind the Vault call.
my @normal = map { (cold_decrypt())[3] } 1 .. 3;
my $normal = (sort { $b <=> $a } @normal)[0];
$emulator->fault(mode => 'slow', target => 'vault', delay_ms => 20_000);
my %vault_io = (out => '', err => '');
my $vault_session = IPC::Run::start([ 'psql', '-XAt', '-d', $node->connstr('postgres'), '-c',
		'SELECT pgphi.flush_cache(); SELECT count(pgphi.decrypt_phi(ssn)) FROM vault_patients' ],
	'>', \$vault_io{out}, '2>', \$vault_io{err}, IPC::Run::timeout(60));
usleep(300_000);
my ($slowest, $served) = (0, 0);
for (1 .. 5)
{
	my ($r, $o, $e, $t) = cold_decrypt();
	$served++ if $r == 0 && $o =~ /^40$/m;
	$slowest = $t if $t > $slowest;
}
my $status = $node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.cache_stats});
$vault_session->finish;
$emulator->clear_faults;
is($served, 5, 'Vault hanging: five sessions missing the cache on a KMS key are all served');
cmp_ok($slowest, '<', $normal + 0.5, "... each as fast as without the fault (slowest ${slowest}s, normal ${normal}s)");
like($vault_io{err}, qr/Vault is unavailable|did not answer/, '... while the session on the Vault key fails');
is($node->safe_psql('postgres', q{SELECT string_agg(provider, ',' ORDER BY provider) FROM pgphi.broker_processes()
	WHERE pid IS NOT NULL}), 'aws_kms,local,vault', 'one broker process per provider runs');

# Finding 2 (in part): the table of seal counts holds 1024 key versions over
# the cluster's life. More versions than that, one after another: when it is
# full, the entries of versions that can no longer encrypt are reclaimed, and
# the active version is still counted (it used to go uncounted, with only a
# WARNING, from then on).
$node->safe_psql('postgres', q{SELECT pgphi.create_key('many')});
my $t_many = time;
my ($many_ret, $many_out, $many_err) = $node->psql('postgres', q{
	DO $$ BEGIN
		FOR i IN 1 .. 1040 LOOP
			PERFORM pgphi.rotate_key('many');
			COMMIT;
			PERFORM pgphi.encrypt_phi('x', 'many');
			COMMIT;
		END LOOP;
	END $$;}, timeout => 600);
is($many_ret, 0, sprintf('1040 versions of one key, each encrypting (%.0f s)', time - $t_many)) or diag($many_err);
unlike($many_err, qr/cannot count/, '... every one of them counted');
my $active_counted = q{SELECT count(*) FROM pgphi._usage_counts() u
	JOIN pgphi.key_versions v ON v.key_id = u.key_id AND v.version = u.version
	JOIN pgphi.keys k ON k.key_id = v.key_id WHERE k.name = 'many' AND v.state = 'active' AND u.encryptions > 0};
ok($node->poll_query_until('postgres', $active_counted, '1'), '... the active version has its count');
cmp_ok($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi._usage_counts()}), '<=', 1024,
	'... in a table of at most 1024 entries');

$node->stop;
done_testing();
