# Faults on one worker of a Citus cluster: its key broker terminated, then
# killed (which restarts that node), and a worker that cannot unwrap (its
# local KEK file gone, as a key manager it cannot reach). Queries through the
# coordinator fail with that worker's error while it cannot serve, never
# with a wrong value, rows on the other worker still decrypt, and everything
# works again once it recovers. Also: a worker created without pgphi gets it
# from Citus when it is added.
use strict;
use warnings;

use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use CitusTest;

# As in production (the test framework turns it off): a killed broker makes
# the postmaster restart every process that shares memory with it.
my ($coordinator, @workers) = CitusTest::new_cluster(conf => "restart_after_crash = on\n");
my ($w1, $w2) = @workers;
$coordinator->safe_psql('postgres', q{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn_key');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted);
	SELECT create_distributed_table('patients', 'id');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn_key', 'MRN-' || i)
	  FROM generate_series(1, 1000) i;
});
my $all = q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) = 'ssn-' || id};
is($coordinator->safe_psql('postgres', $all), '1000', 'every value decrypts');

# Rows by the worker that holds them.
sub rows_on
{
	my ($worker) = @_;
	return $coordinator->safe_psql('postgres', q{SELECT count(*) FROM patients p
		JOIN pg_dist_placement pl ON pl.shardid = get_shard_id_for_distribution_column('patients', p.id)
		JOIN pg_dist_node n USING (groupid)
		WHERE n.nodeport = } . $worker->port);
}
my $on_w2 = rows_on($w2);
ok($on_w2 > 0 && $on_w2 < 1000, "worker2 holds $on_w2 of the rows");
# Those rows, by id: Citus prunes the query to the shards on worker2.
my $w2_ids = $coordinator->safe_psql('postgres', q{SELECT string_agg(p.id::text, ',') FROM patients p
	JOIN pg_dist_placement pl ON pl.shardid = get_shard_id_for_distribution_column('patients', p.id)
	JOIN pg_dist_node n USING (groupid) WHERE n.nodeport = } . $w2->port);
my $only_w2 = qq{SELECT count(*) FROM patients WHERE id = ANY ('{$w2_ids}'::int[])
	AND pgphi.decrypt_phi(ssn, 'ssn_key', mrn) = 'ssn-' || id};

# 1. Worker1's broker terminated: it comes back, and cold decrypts there work.
my $pid = $w1->safe_psql('postgres', q{SELECT pid FROM pgphi.broker_status()});
kill 'TERM', $pid;
$w1->poll_query_until('postgres', "SELECT running AND pid <> $pid FROM pgphi.broker_status()")
  or die 'the broker of worker1 did not come back';
$w1->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
is($coordinator->safe_psql('postgres', $all), '1000', 'worker1\'s broker terminated and back: every value decrypts');

# 2. Killed: worker1 restarts all its processes; meanwhile queries through the
# coordinator fail (and say so), then work again.
$pid = $w1->safe_psql('postgres', q{SELECT pid FROM pgphi.broker_status()});
kill 'KILL', $pid;
ok(PgphiTest::wait_for_restart($w1), 'worker1 restarts with its key broker after the kill');
my $ok = 0;
for (1 .. 50)
{
	my ($ret, $out) = $coordinator->psql('postgres', $all);
	if ($ret == 0) { $ok = $out eq '1000'; last; }
	usleep(200_000);
}
ok($ok, '... and every value decrypts through the coordinator again');

# 3. Worker1 cannot unwrap (its KEK gone, as an unreachable key manager): the
# decrypt fails with worker1's error, rows on worker2 still decrypt.
my $kek = $w1->data_dir . '/pgphi_local.kek';
move($kek, "$kek.away") or die "cannot move $kek: $!";
$w1->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
my $err = PgphiTest::psql_error($coordinator, 'postgres', $all);
like($err, qr/58P01: local KEK file "pgphi_local.kek" does not exist/, 'worker1 cannot unwrap: the query fails with its error');
like($err, qr/while executing command on 127\.0\.0\.1:${\ $w1->port }/, '... raised on worker1');
is($coordinator->safe_psql('postgres', $only_w2), $on_w2, 'the rows on worker2 still decrypt');
move("$kek.away", $kek) or die "cannot move $kek back: $!";
is($coordinator->safe_psql('postgres', $all), '1000', 'worker1 unwraps again: every value decrypts');

# 4. A worker created without pgphi: Citus creates the extension there when
# the node is added; citus_sync gives it the catalog.
my $w3 = CitusTest::new_node('worker3', no_pgphi => 1);
$coordinator->safe_psql('postgres', q{SELECT citus_add_node('127.0.0.1', } . $w3->port . ')');
is($w3->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'pgphi'}),
	$coordinator->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'pgphi'}),
	'Citus created pgphi on the added worker');
$coordinator->safe_psql('postgres', q{SELECT * FROM pgphi.citus_sync()});
is($w3->safe_psql('postgres', q{SELECT string_agg(name, ',') FROM pgphi.keys}), 'ssn_key',
	'... and citus_sync its catalog');

done_testing();
