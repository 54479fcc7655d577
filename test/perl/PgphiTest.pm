# Helpers shared by pgphi's TAP tests.
package PgphiTest;

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IPC::Run;

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

# Waits until the server, restarted after a crash a test caused, runs its key
# broker again. Cluster::poll_query_until feeds the query on psql's stdin,
# and a psql refused while the server is still restarting exits before
# reading it: the write then fails with EPIPE and IPC::Run dies. The query
# goes in -c here, so a refused connection is just one more attempt.
sub wait_for_restart
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		my ($stdout, $stderr) = ('', '');
		IPC::Run::run([ 'psql', '-XAt', '-d', $node->connstr($db), '-c',
				'SELECT running FROM pgphi.broker_status()' ],
			'<', \undef, '>', \$stdout, '2>', \$stderr);
		return 1 if $stdout eq "t\n";
		select(undef, undef, undef, 0.2);
	}
	return 0;
}

1;
