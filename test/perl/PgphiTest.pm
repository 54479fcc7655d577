# Helpers shared by pgphi's TAP tests.
package PgphiTest;

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

# Logs the SQLSTATE of every error (%e), where the bad-input catalogue check
# (test/catalogue) finds what the tests produced. Every test node uses it.
sub log_settings
{
	return "log_line_prefix = '%m [%p] %e %q%a '\n";
}

# A started cluster with pgphi preloaded. Statement logging is off, as in
# production, so tests can check that pgphi itself writes no secret to the log.
sub new_node
{
	my ($name, %params) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%params);
	$node->append_conf('postgresql.conf', log_settings() . <<'CONF');
shared_preload_libraries = 'pgphi'
log_statement = none
CONF
	$node->start;
	return $node;
}

# Reloads the configuration and waits until the key broker has applied it
# (pg_reload_conf only signals; the broker rereads on its own time).
sub reload_broker
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	my $before = $node->safe_psql($db, 'SELECT config_reloads FROM pgphi.broker_status()');
	$node->safe_psql($db, 'SELECT pg_reload_conf()');
	$node->poll_query_until($db, "SELECT config_reloads > $before FROM pgphi.broker_status()")
	  or die "the key broker did not reload its configuration";
}

# Runs SQL that is expected to fail; returns its stderr with verbose errors,
# so the SQLSTATE is visible.
sub psql_error
{
	my ($node, $db, $sql, %opts) = @_;
	# The shared cache would answer without the key manager: empty it first
	# when the test is about what the key manager (or the KEK file) says.
	$sql = "SELECT pgphi.flush_cache();\n$sql" if $opts{flush};
	my ($ret, $stdout, $stderr) =
	  $node->psql($db, "\\set VERBOSITY verbose\n$sql", on_error_stop => 1);
	return $ret == 0 ? '' : $stderr;
}

1;
