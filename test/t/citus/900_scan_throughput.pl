# On request only (PGPHI_CITUS_BENCH=1; the numbers are for the README, not
# a pass or fail): the throughput of a decrypting scan of a distributed table
# (8 shards on two workers) against the same scan of an ordinary table on
# one node, the coordinator. Every node runs on this one machine, so the
# workers share its cores with each other and with the coordinator.
#   PGPHI_CITUS_BENCH=1 CITUS_TESTS=test/t/citus/900_scan_throughput.pl scripts/test.sh citus
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use PgphiTest;
use CitusTest;

plan skip_all => 'a benchmark: set PGPHI_CITUS_BENCH=1 to run it' unless $ENV{PGPHI_CITUS_BENCH};
my $rows = $ENV{PGPHI_CITUS_BENCH_ROWS} // 200_000;
my $runs = 5;

my ($coordinator, @workers) = CitusTest::new_cluster();
$coordinator->safe_psql('postgres', qq{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn_key');
	CREATE TABLE local_patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted);
	INSERT INTO local_patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi(format('%s-45-6789', 100 + i % 900), 'ssn_key', 'MRN-' || i)
	  FROM generate_series(1, $rows) i;
	CREATE TABLE patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted);
	SELECT create_distributed_table('patients', 'id');
	INSERT INTO patients SELECT * FROM local_patients;
	VACUUM ANALYZE local_patients;
	VACUUM ANALYZE patients;
});

sub median_seconds
{
	my ($sql) = @_;
	$coordinator->safe_psql('postgres', $sql);    # warm: pages, DEK caches, connections
	my @t;
	for (1 .. $runs)
	{
		my $start = time;
		$coordinator->safe_psql('postgres', $sql);
		push @t, time - $start;
	}
	@t = sort { $a <=> $b } @t;
	return $t[ int(@t / 2) ];
}

my %scan;
for my $table (qw(local_patients patients))
{
	$scan{$table}{decrypt} = median_seconds(
		"SELECT count(*) FROM $table WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) LIKE '%-45-6789'");
	$scan{$table}{plain} = median_seconds("SELECT count(*) FROM $table WHERE length(ssn::bytea) > 0");
}
my $cores = `nproc`;
chomp $cores;
diag sprintf("decrypting scan of %d rows, median of %d runs, %s cores shared by all three nodes:", $rows, $runs, $cores);
for my $table (qw(local_patients patients))
{
	diag sprintf("  %-32s %7.3f s  %9.0f values/s   (same scan without decrypt_phi: %.3f s)",
		$table eq 'patients' ? 'distributed (8 shards, 2 workers)' : 'one node (ordinary table)',
		$scan{$table}{decrypt}, $rows / $scan{$table}{decrypt}, $scan{$table}{plain});
}
my $local_plan = $coordinator->safe_psql('postgres',
	"EXPLAIN (COSTS OFF) SELECT count(*) FROM local_patients WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) LIKE '%-45-6789'");
diag('  the one-node scan ' . ($local_plan =~ /Workers Planned: (\d+)/ ? "runs in parallel ($1 workers planned)" : 'runs in one process'));
diag sprintf("  distributed / one node: %.2fx the throughput",
	$scan{local_patients}{decrypt} / $scan{patients}{decrypt});
ok(1, 'measured');
done_testing();
