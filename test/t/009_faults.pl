# Faults while sessions work: an immediate shutdown during encryption-heavy
# writes, the key broker terminated again and again and then killed, the key
# manager flapping, slow, down and answering nonsense, a shared cache full of
# pending requests, and a re-encryption stopped by a statement timeout and by
# a cancel. After each: every committed value decrypts, nothing is
# half-written, no session hangs, and the server log holds no plaintext and
# no key bytes.
use strict;
use warnings;

use IPC::Run;
use JSON::PP;
use MIME::Base64;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use PgphiTest;
use KeyManagerEmulator;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
my $kms_key = $emulator->{kms_key};

my $node = PgphiTest::new_node('faults');
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.provider_timeout = 3000
pgphi.provider_max_retries = 1
# The smallest shared cache, so that pending requests can fill it.
pgphi.cache_size = 16
# As in production (the test framework turns it off): a killed broker makes
# the postmaster restart every process that shares memory with it.
restart_after_crash = on
CONF
$node->restart;
$node->safe_psql('postgres', qq{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('local_key');
	SELECT pgphi.create_key('kms_key', provider => 'aws_kms', kek => '$kms_key');
});

# Runs a psql script in the background. Each statement that should count as
# acknowledged is followed by \echo acked N: psql prints it only once the
# server has answered, so an "acked" line means committed.
my $script_no = 0;
sub start_script
{
	my ($script, %opts) = @_;
	my $file = "$PostgreSQL::Test::Utils::tmp_check/script" . ++$script_no . '.sql';
	open my $fh, '>', $file or die;
	print $fh "\\set VERBOSITY verbose\n$script";
	close $fh;
	my %io = (out => '', err => '', started => time);
	$io{handle} = IPC::Run::start(
		[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=' . ($opts{stop_on_error} // 1), '-d',
		  $node->connstr('postgres'), '-f', $file ],
		'>', \$io{out}, '2>', \$io{err}, IPC::Run::timeout($opts{timeout} // 120));
	return \%io;
}
sub finish_script
{
	my ($io) = @_;
	eval { $io->{handle}->finish; };
	$io->{timed_out} = $@ ? 1 : 0;
	$io->{seconds} = time - $io->{started};
	return $io;
}
sub acked { my ($io) = @_; return [ $io->{out} =~ /^acked (\d+)$/mg ]; }
sub errors_of { my ($io) = @_; return [ $io->{err} =~ /^(?:psql:\S+ )?ERROR:\s+(.*)$/mg ]; }

# Sessions that are not this test's own and still run a statement: none may
# be left behind by a fault.
sub stuck_sessions
{
	return $node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity
		WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND state <> 'idle'});
}

# Plaintexts are built inside SQL (format()), so no statement text holds
# one: finding "phi-<digits>" in the log means a value leaked.
my $plaintext_pattern = qr/phi-(?:re-)?\d+/;

###########################################################################
# 1. Immediate shutdown during encryption-heavy writes from four sessions,
#    while another session rotates the local key.
###########################################################################
$node->safe_psql('postgres', q{
	CREATE TABLE crash_rows (writer int, batch int, i int, v pgphi.encrypted, j pgphi.encrypted,
	                         PRIMARY KEY (writer, batch, i));
});
my $rows_per_batch = 25;
my @writers;
for my $w (1 .. 4)
{
	my $script = '';
	for my $b (1 .. 2000)
	{
		# One statement, one transaction: all 25 rows or none.
		$script .= qq{INSERT INTO crash_rows SELECT $w, $b, i,
			pgphi.encrypt_phi(format('phi-%s-%s-%s', $w, $b, i), 'local_key'),
			pgphi.encrypt_phi(jsonb_build_object('dx', format('phi-%s-%s-%s', $w, $b, i)), 'kms_key')
			FROM generate_series(1, $rows_per_batch) i;\n\\echo acked $b\n};
	}
	push @writers, start_script($script);
}
my $rotator = start_script("SELECT pgphi.rotate_key('local_key'); SELECT pg_sleep(0.2);\n" x 200);
# Enough rows, and some written after a rotation (on a loaded machine the
# writers can get far before the first rotation commits).
$node->poll_query_until('postgres', q{SELECT count(*) >= 4000 AND EXISTS (SELECT FROM crash_rows r,
	pgphi.ciphertext_info(r.v) i WHERE i.key_version > 1) FROM crash_rows}) or die 'the writers did not write';
$node->stop('immediate');
finish_script($_) for @writers, $rotator;
is(scalar(grep { $_->{err} =~ /terminat|server closed|connection/ } @writers), 4,
	'crash: the four writers were cut off by the immediate shutdown');
ok(!grep({ $_->{timed_out} } @writers, $rotator), 'crash: no session hung');

$node->start;
my $committed_batches = $node->safe_psql('postgres', 'SELECT count(DISTINCT (writer, batch)) FROM crash_rows');
ok($committed_batches >= 2000 / $rows_per_batch, "crash: $committed_batches batches survived the crash");
is($node->safe_psql('postgres', qq{SELECT count(*) FROM (SELECT writer, batch FROM crash_rows
	GROUP BY writer, batch HAVING count(*) <> $rows_per_batch) partial}), '0',
	'crash: no batch is half-written');
my $lost = 0;
for my $w (1 .. 4)
{
	my $acked = acked($writers[ $w - 1 ]);
	next unless @$acked;
	my $present = $node->safe_psql('postgres',
		"SELECT count(DISTINCT batch) FROM crash_rows WHERE writer = $w AND batch <= $acked->[-1]");
	$lost += @$acked - $present;
}
is($lost, 0, 'crash: every acknowledged batch survived');
is($node->safe_psql('postgres', q{SELECT count(*) = sum(CASE WHEN
		pgphi.decrypt_phi(v) = format('phi-%s-%s-%s', writer, batch, i)
		AND pgphi.decrypt_phi_jsonb(j) ->> 'dx' = format('phi-%s-%s-%s', writer, batch, i) THEN 1 END)
	FROM crash_rows}), 't', 'crash: every committed value decrypts to what was written');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'local_key' AND v.state = 'active'}), '1', 'crash: the rotated key has exactly one active version');
ok($node->safe_psql('postgres', q{SELECT count(DISTINCT i.key_version) > 1
	FROM crash_rows, pgphi.ciphertext_info(v) i}) eq 't', '... and the rows span several versions');

###########################################################################
# 2. The key broker terminated five times, then killed, while sessions keep
#    encrypting and decrypting and another keeps emptying the cache.
###########################################################################
$node->safe_psql('postgres', q{
	CREATE TABLE broker_rows (writer int, n int, v pgphi.encrypted, PRIMARY KEY (writer, n));
	INSERT INTO broker_rows SELECT 0, n, pgphi.encrypt_phi(format('phi-0-%s', n), 'kms_key')
	  FROM generate_series(1, 200) n;
});
# Each key-manager call takes a while, so terminations land mid-request;
# the sessions reconnect every few statements and the shared cache is
# emptied all the time, so new sessions keep asking the broker.
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 150);
my @workers;
for my $w (1 .. 3)
{
	my $script = '';
	for my $n (1 .. 3000)
	{
		$script .= qq{INSERT INTO broker_rows VALUES ($w, $n, pgphi.encrypt_phi(format('phi-%s-%s', $w, $n), 'kms_key'));
\\echo acked $n
SELECT count(pgphi.decrypt_phi(v)) FROM broker_rows WHERE writer = 0;\n};
		$script .= "\\connect\n" if $n % 3 == 0;
	}
	push @workers, start_script($script);
}
my $flusher = start_script("SELECT pgphi.flush_cache(); SELECT pg_sleep(0.1);\n" x 3000);
my $calls_before = $emulator->stats->{kms}{Decrypt} // 0;
my ($restarts_before) = $node->safe_psql('postgres', 'SELECT restarts FROM pgphi.broker_status()');
for (1 .. 5)
{
	usleep(800_000);
	my $pid = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
	kill 'TERM', $pid;
	$node->poll_query_until('postgres', "SELECT running AND pid <> $pid FROM pgphi.broker_status()")
	  or die 'the broker did not come back';
}
usleep(800_000);
is($node->safe_psql('postgres', 'SELECT restarts FROM pgphi.broker_status()') - $restarts_before, 5,
	'broker: terminated and restarted five times');
ok(($emulator->stats->{kms}{Decrypt} // 0) - $calls_before >= 10, 'broker: the sessions kept the broker busy');
# Until the kill below, no statement of any session failed (an error would
# have stopped its script and shown on its stderr).
for my $io (@workers, $flusher) { eval { $io->{handle}->pump_nb }; }
is(join('', map { $_->{err} } @workers, $flusher), '', 'broker: every session kept working through the terminations');
my $pid = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
kill 'KILL', $pid;
finish_script($_) for @workers, $flusher;
is(scalar(grep { $_->{err} =~ /terminat|server closed|connection|crash|recovery/ } @workers), 3,
	'broker: the kill restarted the server and cut the sessions off');
is(scalar(map { @{ errors_of($_) } } @workers), 0, '... without a statement failing otherwise');
ok(!grep({ $_->{timed_out} } @workers, $flusher), 'broker: no session hung');
ok(PgphiTest::wait_for_restart($node), '... and the server restarts with its key broker');
$emulator->clear_faults;
my $acked_rows = 0;
$acked_rows += scalar(@{ acked($_) }) for @workers;
ok($acked_rows > 30, "broker: the sessions had $acked_rows writes acknowledged");
$lost = 0;
for my $w (1 .. 3)
{
	my $acked = acked($workers[ $w - 1 ]);
	next unless @$acked;
	$lost += @$acked - $node->safe_psql('postgres',
		"SELECT count(*) FROM broker_rows WHERE writer = $w AND n <= $acked->[-1]");
}
is($lost, 0, 'broker: every acknowledged write survived the restart');
is($node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(v) = format('phi-%s-%s', writer, n)) = count(*)
	FROM broker_rows}), 't', 'broker: every committed value decrypts');
is(stuck_sessions(), '0', 'broker: no backend is left running a statement');

###########################################################################
# 3. The key manager flapping, slow, then down for longer than the cache
#    lasts, while sessions work with a warm cache.
###########################################################################
my ($ttl, $grace) = (2, 3);
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.cache_ttl = $ttl");
$node->safe_psql('postgres', "ALTER SYSTEM SET pgphi.key_manager_grace = $grace");
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', 'CREATE TABLE km_rows (writer int, n int, v pgphi.encrypted, PRIMARY KEY (writer, n))');
my $km_n = 0;
# Sessions that write and read for about `seconds`, going on after errors.
sub start_km_sessions
{
	my ($seconds) = @_;
	my @sessions;
	for my $w (1 .. 3)
	{
		my $script = '';
		for (1 .. $seconds * 10)
		{
			my $n = ++$km_n;
			# Errors do not stop these scripts, so "acked" needs a check.
			$script .= qq{INSERT INTO km_rows VALUES ($w, $n, pgphi.encrypt_phi(format('phi-%s-%s', $w, $n), 'kms_key'));
\\if :ERROR \\else \\echo acked $n \\endif
SELECT count(pgphi.decrypt_phi(v)) FROM broker_rows WHERE writer = 0;
SELECT pg_sleep(0.1);\n};
		}
		$script .= qq{SELECT count(pgphi.decrypt_phi(v)) FROM km_rows;
\\if :ERROR \\echo last statement failed \\else \\echo last statement ok \\endif\n};
		push @sessions, start_script($script, stop_on_error => 0);
	}
	return @sessions;
}
# Cached DEKs keep the TTL they were cached with: start over under the new one.
$node->safe_psql('postgres', q{SELECT pgphi.flush_cache(); SELECT count(pgphi.decrypt_phi(v)) FROM broker_rows});
sub faults_hit { return $emulator->stats->{faults_injected}; }

# Flapping: ten outages shorter than the grace period, with recoveries in between.
my @km = start_km_sessions(8);
my $hits = faults_hit();
for (1 .. 10)
{
	$emulator->fault(mode => 'drop', target => 'kms');
	usleep(400_000);
	$emulator->clear_faults;
	usleep(300_000);
}
finish_script($_) for @km;
cmp_ok(faults_hit() - $hits, '>=', 2, 'flapping key manager: the broker ran into the outages');
is(scalar(map { @{ errors_of($_) } } @km), 0, '... and no session saw an error');
ok(!grep({ $_->{timed_out} } @km), '... and none hung');

# Slow: every call takes 1.5 s, within pgphi.provider_timeout; keys in use
# are refreshed ahead of their TTL, so no statement waits for it.
$hits = faults_hit();
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 1500);
@km = start_km_sessions(5);
finish_script($_) for @km;
$emulator->clear_faults;
cmp_ok(faults_hit() - $hits, '>=', 2, 'slow key manager: the broker waited on it');
is(scalar(map { @{ errors_of($_) } } @km), 0, '... and no session saw an error');
ok(!grep({ $_->{timed_out} } @km), '... and none hung');

# Down for longer than TTL plus grace: sessions get a clear 08006 error (and
# no other kind), none hangs, and they work again once it is back.
@km = start_km_sessions(12);
usleep(500_000);
$emulator->fault(mode => 'drop', target => 'kms');
sleep($ttl + $grace + 3);
$emulator->clear_faults;
finish_script($_) for @km;
my @down_errors = map { @{ errors_of($_) } } @km;
ok(scalar(@down_errors) > 0, 'key manager down past the grace period: sessions got errors (' . scalar(@down_errors) . ')');
is(scalar(grep { !/^08006: (AWS KMS is unavailable|pgphi key broker did not)/ } @down_errors), 0,
	'... each one 08006 (connection failure) naming the cause')
  or diag join("\n", @down_errors);
ok(!grep({ $_->{timed_out} } @km), '... no session hung');
ok(!grep({ $_->{err} !~ /ERROR/ && $_->{err} =~ /\S/ } @km), '... and nothing else went wrong');
is(scalar(grep { $_->{out} =~ /^last statement ok$/m } @km), 3, '... and every session worked again once it was back');
is($node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(v) = format('phi-%s-%s', writer, n)) = count(*)
	FROM km_rows}), 't', 'key manager faults: every committed value decrypts');
$lost = 0;
for my $io (@km)
{
	$lost += scalar(@{ acked($io) }) - $node->safe_psql('postgres',
		'SELECT count(*) FROM km_rows WHERE n IN (' . join(',', @{ acked($io) }, 0) . ')');
}
is($lost, 0, '... and every acknowledged write is there');
is(stuck_sessions(), '0', 'key manager faults: no backend is left running a statement');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET pgphi.cache_ttl');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET pgphi.key_manager_grace');
PgphiTest::reload_broker($node);

# A session that cannot wait as long as the key manager takes gets a clear
# error at pgphi.key_wait_timeout.
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 1500);
my $t0 = time;
like(PgphiTest::psql_error($node, 'postgres',
	q{SET pgphi.key_wait_timeout = 300; SELECT count(pgphi.decrypt_phi(v)) FROM broker_rows}, flush => 1),
	qr/08006: pgphi key broker did not answer within 300 ms/, 'slow key manager: a session stops waiting at pgphi.key_wait_timeout');
cmp_ok(time - $t0, '<', 1.4, '... without waiting for the key manager');
sleep 2;    # the broker finishes the slow call
$emulator->clear_faults;

# More different DEKs requested at once than the shared cache has slots:
# the request that finds every slot pending is refused (53000), the others
# are served, and no session hangs.
$node->safe_psql('postgres', 'CREATE TABLE many_keys (k int, v pgphi.encrypted)');
for my $k (1 .. 18)
{
	$node->safe_psql('postgres', qq{SELECT pgphi.create_key('many_$k', provider => 'aws_kms', kek => '$kms_key');
		INSERT INTO many_keys VALUES ($k, pgphi.encrypt_phi(format('phi-%s-0', $k), 'many_$k'))});
}
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 800);
my @many = map { start_script(qq{SET pgphi.key_wait_timeout = '60s';
	SELECT pgphi.decrypt_phi(v) FROM many_keys WHERE k = $_;
}, stop_on_error => 0) } 1 .. 18;
finish_script($_) for @many;
$emulator->clear_faults;
my @many_errors = map { @{ errors_of($_) } } @many;
ok(scalar(grep { /^53000: pgphi key cache is full of pending requests/ } @many_errors) >= 1,
	'a cache full of pending requests refuses the next one (53000)');
is(scalar(grep { !/^53000: / } @many_errors), 0, '... with no other error') or diag join("\n", @many_errors);
ok(!grep({ $_->{timed_out} } @many), '... and no session hung');
is($node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(v) = format('phi-%s-0', k)) FROM many_keys}),
	'18', '... and afterwards all eighteen keys decrypt');

# A key manager answering nonsense (HTTP 200 with JSON of the wrong shape) is
# a provider error (58000) naming what was wrong, never an internal error.
$node->safe_psql('postgres', qq{SELECT pgphi.create_key('vault_key', provider => 'vault', kek => '$emulator->{vault_key}');
	CREATE TABLE vault_rows AS SELECT pgphi.encrypt_phi(format('phi-%s-%s', 1, 1), 'vault_key') AS v});
$emulator->fault(mode => 'malformed', target => 'kms');
like(PgphiTest::psql_error($node, 'postgres', 'SELECT count(pgphi.decrypt_phi(v)) FROM broker_rows', flush => 1),
	qr/58000: AWS KMS returned a response that is not a JSON object/, 'a malformed KMS answer: 58000');
$emulator->fault(mode => 'malformed', target => 'vault');
like(PgphiTest::psql_error($node, 'postgres', 'SELECT count(pgphi.decrypt_phi(v)) FROM vault_rows', flush => 1),
	qr/58000: Vault decrypt response has no plaintext/, 'a malformed Vault answer: 58000');
# A sealed Vault is unavailable (08006) and said to be sealed, never a
# damaged DEK (XX001). (Transit keys cannot be disabled.)
$emulator->clear_faults;
$emulator->fault(mode => 'sealed', target => 'vault');
like(PgphiTest::psql_error($node, 'postgres', 'SELECT count(pgphi.decrypt_phi(v)) FROM vault_rows', flush => 1),
	qr/08006: Vault .*HTTP 503: Vault is sealed/, 'a sealed Vault: 08006, said to be sealed');
$emulator->clear_faults;
is($node->safe_psql('postgres', q{SELECT pgphi.flush_cache() >= 0;
	SELECT count(*) = count(pgphi.decrypt_phi(v)) FROM broker_rows; SELECT pgphi.decrypt_phi(v) FROM vault_rows}),
	"t\nt\nphi-1-1", '... and both decrypt again once the answers are right');

###########################################################################
# 4. CALL pgphi.reencrypt stopped by statement_timeout, then by
#    pg_cancel_backend, then resumed to completion.
###########################################################################
$node->safe_psql('postgres', q{
	SELECT pgphi.create_key('re_key');
	CREATE TABLE re_rows (id int PRIMARY KEY, v pgphi.encrypted);
	INSERT INTO re_rows SELECT i, pgphi.encrypt_phi(format('phi-re-%s', i), 're_key') FROM generate_series(1, 300000) i;
	VACUUM ANALYZE re_rows;
	SELECT pgphi.rotate_key('re_key');
});
my $progress = q{SELECT coalesce((SELECT next_page FROM pgphi.reencrypt_progress WHERE relation = 're_rows'::regclass), 0)};
my $all_decrypt = q{SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(v, 're_key') = format('phi-re-%s', id)) FROM re_rows};

my ($ret, $out, $err) = $node->psql('postgres',
	q{SET statement_timeout = '300ms'; CALL pgphi.reencrypt('re_rows', 'v', batch_size => 2000)});
like($err, qr/canceling statement due to statement timeout/, 'reencrypt: stopped by statement_timeout');
my $after_timeout = $node->safe_psql('postgres', $progress);
cmp_ok($after_timeout, '>', 0, "reencrypt: batches before the timeout stayed committed (page $after_timeout)");
is($node->safe_psql('postgres', $all_decrypt), '300000', '... and every value decrypts, old version or new');

my $call = start_script(q{CALL pgphi.reencrypt('re_rows', 'v', batch_size => 2000);}, stop_on_error => 1);
$node->poll_query_until('postgres', "$progress > $after_timeout") or die 'the re-encryption did not progress';
is($node->safe_psql('postgres', q{SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity
	WHERE query LIKE 'CALL pgphi.reencrypt%' AND pid <> pg_backend_pid()}), '1', 'reencrypt: cancelled with pg_cancel_backend');
finish_script($call);
like($call->{err}, qr/canceling statement due to user request/, '... which stopped it');
like($call->{err}, qr/resuming re-encryption of public.re_rows.v at page $after_timeout\b/, '... after it had resumed where the timeout left it');
my $after_cancel = $node->safe_psql('postgres', $progress);
cmp_ok($after_cancel, '>', $after_timeout, "reencrypt: it went further before the cancel (page $after_cancel)");
is($node->safe_psql('postgres', $all_decrypt), '300000', '... and every value still decrypts');

($ret, $out, $err) = $node->psql('postgres', q{CALL pgphi.reencrypt('re_rows', 'v', batch_size => 2000)});
is($ret, 0, 'reencrypt: the third CALL finishes');
like($err, qr/resuming re-encryption of public.re_rows.v at page $after_cancel\b/, '... resuming where the cancel left it');
is($node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE i.key_version = 2) FROM re_rows, pgphi.ciphertext_info(v) i}),
	'300000', 'reencrypt: every value is under the new version');
is($node->safe_psql('postgres', $all_decrypt), '300000', '... and decrypts to what was written');
is(stuck_sessions(), '0', 'reencrypt: no backend is left running a statement');

###########################################################################
# The server log: no plaintext, no KEK, no DEK.
###########################################################################
my $log = slurp_file($node->logfile);
unlike($log, $plaintext_pattern, 'the server log holds no plaintext');

# The local KEK, as bytes, hex and base64.
my $data_dir = $node->data_dir;
my $kek = slurp_file("$data_dir/pgphi_local.kek");
is(length($kek), 32, 'the local KEK file holds a 32-byte key');
my @secrets = ([ 'the local KEK', $kek ]);

# The KMS key's DEKs, unwrapped through the emulator's KMS API with the
# test's own credentials, as the broker does.
my @versions = split /\n/, $node->safe_psql('postgres', q{SELECT k.key_id || ' ' || v.version || ' ' || translate(encode(v.wrapped_dek, 'base64'), E'\n', '')
	FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) WHERE k.name = 'kms_key'});
for my $row (@versions)
{
	my ($key_id, $version, $blob) = split / /, $row, 3;
	my $body = encode_json({ CiphertextBlob => $blob, EncryptionContext =>
		{ 'pgphi:key' => 'kms_key', 'pgphi:key_id' => "$key_id", 'pgphi:key_version' => "$version" } });
	my ($answer, $curl_err);
	IPC::Run::run([ 'curl', '-sS', '--max-time', '10', '--cacert', "$pki/ca.pem",
		'--aws-sigv4', 'aws:amz:us-east-1:kms', '--user', join(':', @{ $emulator->{aws} }),
		'-H', 'Content-Type: application/x-amz-json-1.1', '-H', 'X-Amz-Target: TrentService.Decrypt',
		'-d', $body, $emulator->url . '/' ], '>', \$answer, '2>', \$curl_err) or die $curl_err;
	my $dek = decode_base64(decode_json($answer)->{Plaintext} // '');
	die "could not unwrap the DEK of kms_key version $version: $answer" unless length($dek) == 32;
	push @secrets, [ "the DEK of kms_key version $version", $dek ];
}
is(scalar(@secrets), 1 + scalar(@versions), 'the DEKs of the KMS key were recovered for the check');
for my $secret (@secrets)
{
	my ($name, $bytes) = @$secret;
	my $hex = unpack('H*', $bytes);
	my $b64 = encode_base64($bytes, '');
	ok(index($log, $bytes) < 0 && index(lc($log), $hex) < 0 && index($log, $b64) < 0,
		"the server log holds neither $name nor its hex or base64");
}

$node->stop;
$emulator->stop;
done_testing();
