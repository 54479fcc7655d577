# Helpers shared by pgphi's TAP tests.
package PgphiTest;

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

# A started cluster with pgphi preloaded. Statement logging is off, as in
# production, so tests can check that pgphi itself writes no secret to the log.
sub new_node
{
	my ($name, %params) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%params);
	$node->append_conf('postgresql.conf', <<'CONF');
shared_preload_libraries = 'pgphi'
log_statement = none
CONF
	$node->start;
	return $node;
}

# Runs SQL that is expected to fail; returns its stderr with verbose errors,
# so the SQLSTATE is visible.
sub psql_error
{
	my ($node, $db, $sql) = @_;
	my ($ret, $stdout, $stderr) =
	  $node->psql($db, "\\set VERBOSITY verbose\n$sql", on_error_stop => 1);
	return $ret == 0 ? '' : $stderr;
}

1;
