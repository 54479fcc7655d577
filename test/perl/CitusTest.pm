# A Citus cluster for pgphi's Citus tests (test/t/citus, scripts/test.sh
# citus): a coordinator and workers, each a PostgreSQL::Test::Cluster node.
# The test driver reaches every node on its Unix socket, as the other TAP
# tests do; the nodes reach each other over TCP on 127.0.0.1, where Citus
# registers them (citus_add_node), and Citus encrypts those connections with
# TLS (CREATE EXTENSION citus makes each node a self-signed certificate).
package CitusTest;

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

# The local provider's KEK, the same on every node (see docs/citus.md: the
# operator copies the file to each server; a key manager serves them all
# instead). 32 random bytes, as create_key would make them.
my $kek;
sub cluster_kek
{
	unless (defined $kek)
	{
		open(my $rnd, '<:raw', '/dev/urandom') or die "cannot read /dev/urandom: $!";
		read($rnd, $kek, 32) == 32 or die "short read from /dev/urandom";
		close $rnd;
	}
	return $kek;
}

sub write_kek
{
	my ($node) = @_;
	my $path = $node->data_dir . '/pgphi_local.kek';
	open(my $out, '>:raw', $path) or die "cannot write $path: $!";
	print $out cluster_kek();
	close $out;
	chmod 0600, $path;
}

# A started node with Citus and pgphi preloaded (Citus must come first in
# shared_preload_libraries), the cluster's local KEK, and CREATE EXTENSION
# citus and pgphi in database "postgres". CONF: more postgresql.conf lines.
sub new_node
{
	my ($name, %params) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', PgphiTest::log_settings() . <<"CONF");
shared_preload_libraries = 'citus, pgphi'
log_statement = none
listen_addresses = '127.0.0.1'
max_connections = 100
max_prepared_transactions = 100
citus.shard_replication_factor = 1
citus.shard_count = 8
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
CONF
	$node->append_conf('postgresql.conf', $params{conf}) if $params{conf};
	write_kek($node);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION citus');
	$node->safe_psql('postgres', 'CREATE EXTENSION pgphi') unless $params{no_pgphi};
	return $node;
}

# A coordinator and N workers (default 2), registered on 127.0.0.1.
sub new_cluster
{
	my (%params) = @_;
	my $coordinator = new_node('coordinator', %params);
	$coordinator->safe_psql('postgres',
		q{SELECT citus_set_coordinator_host('127.0.0.1', } . $coordinator->port . ')');
	my @workers = map { add_worker($coordinator, "worker$_", %params) } 1 .. ($params{workers} // 2);
	return ($coordinator, @workers);
}

# A new worker, started and added to the cluster.
sub add_worker
{
	my ($coordinator, $name, %params) = @_;
	my $node = new_node($name, %params);
	$coordinator->safe_psql('postgres', q{SELECT citus_add_node('127.0.0.1', } . $node->port . ')');
	return $node;
}

1;
