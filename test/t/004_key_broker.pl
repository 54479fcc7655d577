# The key broker and the shared DEK cache, against the AWS KMS emulator:
# single flight, refresh-ahead, revocation within the TTL, riding out an
# outage for the grace period, a broker killed mid-request, and cancel.
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
my $url = $emulator->url;

my $ttl = 4;      # seconds
my $grace = 5;    # seconds
my $node = PgphiTest::new_node('broker');
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.provider_timeout = 3000
pgphi.provider_max_retries = 0
pgphi.cache_ttl = $ttl
pgphi.key_manager_grace = $grace
# As in production (the test framework turns it off): a killed broker makes
# the postmaster restart every process that shares memory with it.
restart_after_crash = on
CONF
$node->restart;
$node->safe_psql('postgres', qq{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn', provider => 'aws_kms', kek => '$emulator->{kms_key}');
	CREATE TABLE patients (id int, ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'ssn') FROM generate_series(1, 100) i;
});
my $decrypt = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn) = 'ssn-' || id};
my $kms_key = $emulator->{kms_key};

sub kms_decrypts { return $emulator->stats->{kms}{Decrypt} // 0; }
sub start_session
{
	my ($sql) = @_;
	my %io = (out => '', err => '');
	my $handle = IPC::Run::start([ 'psql', '-XAt', '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \$io{out}, '2>', \$io{err}, IPC::Run::timeout(60));
	return ($handle, \%io);
}

# Cold start: sixteen sessions miss on the same DEK at once; the key manager
# is called once.
$node->restart;
$emulator->reset_stats;
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 1500);
my @sessions = map { [ start_session($decrypt) ] } 1 .. 16;
$_->[0]->finish for @sessions;
is(scalar(grep { $_->[1]{out} =~ /^100$/m } @sessions), 16, 'sixteen concurrent cold sessions all decrypt');
is(kms_decrypts(), 1, '... with exactly one KMS Decrypt (single flight)');
my $stats = $node->safe_psql('postgres', 'SELECT misses, key_manager_calls, entries FROM pgphi.cache_stats');
is($stats, '16|1|1', 'cache_stats: 16 misses served by 1 key-manager call, 1 entry');
$emulator->clear_faults;

# Refresh-ahead: a key in steady use is re-validated before its TTL ends, so
# queries never wait on the key manager.
$emulator->reset_stats;
my $steady = $node->background_psql('postgres', on_error_stop => 0);
my $slowest = 0;
for (1 .. int(2.5 * $ttl / 0.25))
{
	my $t0 = time;
	$steady->query_safe($decrypt);
	$slowest = time - $t0 if time - $t0 > $slowest;
	usleep(250_000);
}
ok(kms_decrypts() >= 2, 'a key in use is re-validated with KMS as its TTL runs out');
ok($node->safe_psql('postgres', 'SELECT refreshes FROM pgphi.cache_stats') >= 2, '... as refreshes');
cmp_ok($slowest, '<', 1.0, '... without a query waiting for it');

# Revocation: a key disabled in KMS stops decrypts within the TTL, in a
# session that holds the key already.
$emulator->fault(mode => 'disable_key', target => 'kms', key => $kms_key);
my $disabled_at = time;
my $refused = 0;
while (time - $disabled_at < $ttl + 3)
{
	my ($out, $err) = $steady->query($decrypt);
	if ($steady->{stderr} =~ /the KMS key is not usable/) { $refused = 1; last; }
	usleep(200_000);
}
$steady->{stderr} = '';
ok($refused, 'a disabled KMS key stops decrypts in a warm session');
cmp_ok(time - $disabled_at, '<=', $ttl + 1.5, '... within the TTL');
$emulator->clear_faults;
is($steady->query_safe("SELECT pgphi.flush_cache() >= 0; $decrypt"), "t\n100", 're-enabled: decrypts again');

# Outage: KMS unreachable. Cached keys keep working until the grace period
# past their TTL ends, then decrypts fail cleanly.
$emulator->fault(mode => 'drop', target => 'kms');
my $outage_at = time;
my $last_success = 0;
my $failure = '';
while (time - $outage_at < $ttl + $grace + 4)
{
	$steady->query($decrypt);
	if ($steady->{stderr} eq '') { $last_success = time - $outage_at; }
	else { $failure = $steady->{stderr}; last; }
	usleep(250_000);
}
$steady->{stderr} = '';
cmp_ok($last_success, '>', $ttl, 'decrypts continue past the TTL while KMS is unreachable');
like($failure, qr/AWS KMS is unavailable/, 'after the grace period they fail, naming the reason');
cmp_ok($last_success, '<=', $ttl + $grace + 1.5, '... no later than TTL plus grace');
$emulator->clear_faults;
is($steady->query_safe($decrypt), '100', 'KMS back: decrypts again, nothing lost');
$steady->quit;

# Cancel while waiting on the broker.
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 2500);
my ($ret, $out, $err) = $node->psql('postgres', "SET statement_timeout = '500ms'; $decrypt");
like($err, qr/canceling statement due to statement timeout/, 'a session waiting for the broker can be cancelled');
$emulator->clear_faults;
sleep 3;    # the broker finishes the slow call

# The broker terminated (SIGTERM) mid-request: it abandons the slow call at
# once, is restarted, and its successor answers the waiting session. (KMS
# keys have a broker process of their own.)
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
$emulator->reset_stats;
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 2500, count => 1);
my $kms_broker = q{SELECT restarts, pid FROM pgphi.broker_processes() WHERE provider = 'aws_kms'};
my ($restarts, $broker_pid) = split /\|/, $node->safe_psql('postgres', $kms_broker);
my ($waiting, $waiting_io) = start_session($decrypt);
usleep(700_000);
kill 'TERM', $broker_pid;
$waiting->finish;
is($waiting_io->{out}, "100\n", 'a session waiting when the broker was terminated is answered by its successor');
is((split /\|/, $node->safe_psql('postgres', $kms_broker))[0], $restarts + 1, 'the broker was restarted once');
is(kms_decrypts(), 2, '... and its successor repeated the abandoned call');
$emulator->clear_faults;

# The broker killed with SIGKILL mid-request: PostgreSQL restarts every
# process that shares memory with it. No session hangs; afterwards all
# committed values decrypt.
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 2000, count => 1);
my $pid = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
my ($victim, $victim_io) = start_session($decrypt);
usleep(500_000);
kill 'KILL', $pid;
my $t0 = time;
$victim->finish;
cmp_ok(time - $t0, '<', 20, 'the waiting session ends instead of hanging');
like($victim_io->{err}, qr/terminat|server closed the connection/, '... told that the server restarted');
ok(PgphiTest::wait_for_restart($node), '... and the server restarts with its key broker');
$emulator->clear_faults;
is($node->safe_psql('postgres', $decrypt), '100', 'after the restart every value decrypts');
ok($node->log_contains('pgphi key broker.*was terminated by signal 9'), 'the server log records the kill');

# A session waiting for the broker says so in pg_stat_activity: a wait
# event of pgphi's own on PostgreSQL 17 and later, the generic one before.
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
$emulator->fault(mode => 'slow', target => 'kms', delay_ms => 2000, count => 1);
my ($waiter) = start_session("SET application_name = 'waiting_for_broker'; $decrypt");
my $expected_event = $node->pg_version >= 17 ? 'Extension|PgphiKeyBroker' : 'Extension|Extension';
ok( $node->poll_query_until(
		'postgres', q{SELECT wait_event_type || '|' || wait_event FROM pg_stat_activity
		               WHERE application_name = 'waiting_for_broker'},
		$expected_event),
	"a session waiting for the broker shows the wait event $expected_event");
$waiter->finish;
$emulator->clear_faults;

$node->stop;
$emulator->stop;
done_testing();
