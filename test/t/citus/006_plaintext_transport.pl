# pgphi.plaintext_transport on Citus (src/pg/policy/citus_transport.cpp):
# the workers decrypt for the coordinator's internal connection, which is
# TLS, so the coordinator refuses, when it plans a statement from a client
# the setting does not allow, whatever could make another node return
# plaintext to that client. The cases are enumerated from the code and the
# catalog: every pgphi function that reaches check_plaintext_transport, every
# Citus function in the source's list of those that run SQL on other nodes
# (and every Citus function that takes SQL text is classified), a
# user-defined function on a Citus table, a delegated distributed function
# and a decrypting view. Each is refused over TCP without TLS (28000,
# audited) and the same statements run over TLS.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use PgphiTest;
use CitusTest;

my $src = '.';   # scripts/test.sh copies the sources beside the tests
sub slurp { my ($path) = @_; open(my $in, '<', $path) or die "cannot read $path: $!"; local $/; return <$in>; }

# --- what the code says ------------------------------------------------------

# C entry points (PGPHI_FUNCTION) whose bodies reach check_plaintext_transport,
# directly or through a helper in the same folder that calls it.
my $functions_code = join("\n", map { slurp($_) } glob("$src/src/pg/functions/*.cpp"));
my %reaches = (check_plaintext_transport => 1);
while ($functions_code =~ /^(?:[\w:*&<> ]+?)\b(\w+)\(FunctionCallInfo[^)]*\)\n\{\n(.*?)^\}/msg)
{
	my ($helper, $body) = ($1, $2);
	$reaches{$helper} = 1 if $body =~ /\bcheck_plaintext_transport\(/;
}
my @decrypting_symbols;
while ($functions_code =~ /^PGPHI_FUNCTION\((\w+)\)\n\{\n(.*?)^\}/msg)
{
	my ($symbol, $body) = ($1, $2);
	push @decrypting_symbols, $symbol if grep { $body =~ /\b\Q$_\E\(/ } keys %reaches;
}
cmp_ok(scalar(@decrypting_symbols), '>=', 3, "decrypting entry points found in the code: @decrypting_symbols");
my $guard_code = slurp("$src/src/pg/policy/citus_transport.cpp");
my ($listed_symbols) = $guard_code =~ /kDecryptingSymbols\[\] = \{([^}]*)\}/;
my ($listed_commands) = $guard_code =~ /kNodeCommandFunctions\[\] = \{([^}]*)\}/;
my @guarded = sort($listed_symbols =~ /"(\w+)"/g);
is_deeply(\@guarded, [ sort @decrypting_symbols ], 'the guard lists every decrypting entry point');
my @node_commands = sort($listed_commands =~ /"(\w+)"/g);
cmp_ok(scalar(@node_commands), '>=', 5, "node-command functions listed: @node_commands");

# --- the cluster ----------------------------------------------------------------

my ($coordinator, @workers) = CitusTest::new_cluster();
# A schema of citus_setup()'s name made by another role is not used: its
# owner could replace the catalog copy (and the node would count as one of a
# cluster).
$coordinator->safe_psql('postgres', q{CREATE ROLE squatter; CREATE SCHEMA pgphi_citus AUTHORIZATION squatter});
like(PgphiTest::psql_error($coordinator, 'postgres', 'SELECT pgphi.citus_setup()'),
	qr/42501: schema pgphi_citus exists and is not owned by a superuser/, 'citus_setup refuses a squatted schema');
$coordinator->safe_psql('postgres', q{DROP SCHEMA pgphi_citus; DROP ROLE squatter});
$coordinator->safe_psql('postgres', q{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted);
	SELECT create_distributed_table('patients', 'id');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i)
	  FROM generate_series(1, 100) i;
	CREATE ROLE reader LOGIN;
	GRANT pgphi_decrypt, pgphi_encrypt TO reader;
	GRANT SELECT, INSERT ON patients TO reader;
	SELECT pgphi.grant_decrypt('ssn', 'reader'), pgphi.grant_encrypt('ssn', 'reader');
	CREATE FUNCTION unwrap(value pgphi.encrypted, context text) RETURNS text
	    LANGUAGE sql STABLE AS $$ SELECT pgphi.decrypt_phi(value, 'ssn', context) $$;
	CREATE FUNCTION ssn_of(patient int) RETURNS text
	    LANGUAGE sql STABLE AS $$ SELECT pgphi.decrypt_phi(ssn, 'ssn', mrn) FROM public.patients WHERE id = patient $$;
	SELECT create_distributed_function('ssn_of(int)', '$1', colocate_with := 'patients');
	SELECT pgphi.create_decrypted_view('patients', 'patients_clear', 'reader', key_name => 'ssn', context_column => 'mrn');
	-- Run on a worker without a user function in the statement: a function
	-- colocated with a reference table, a distributed procedure, a domain's
	-- CHECK, a table's CHECK and a trigger.
	CREATE TABLE anchor (k int);
	SELECT create_reference_table('anchor');
	CREATE FUNCTION peek(patient int) RETURNS text
	    LANGUAGE sql STABLE AS $$ SELECT pgphi.decrypt_phi(ssn, 'ssn', mrn) FROM public.patients WHERE id = patient $$;
	SELECT create_distributed_function('peek(int)', colocate_with := 'anchor');
	CREATE PROCEDURE fetch_ssn(patient int, INOUT ssn_out text DEFAULT NULL) LANGUAGE plpgsql
	    AS $$ BEGIN SELECT pgphi.decrypt_phi(ssn, 'ssn', mrn) INTO ssn_out FROM public.patients WHERE id = patient; END $$;
	SELECT create_distributed_function('fetch_ssn(int,text)', '$1', colocate_with := 'patients');
	CREATE TYPE pair AS (e pgphi.encrypted, c text);
	CREATE DOMAIN checked_pair AS pair CHECK (pgphi.decrypt_phi((VALUE).e, 'ssn', (VALUE).c) IS NOT NULL);
	CREATE TABLE checked_copy (id int, mrn text, ssn pgphi.encrypted, CHECK (pgphi.decrypt_phi(ssn, 'ssn', mrn) IS NOT NULL));
	SELECT create_distributed_table('checked_copy', 'id', colocate_with => 'patients');
	CREATE FUNCTION pass_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
	CREATE TABLE triggered (id int, ssn pgphi.encrypted);
	SELECT create_distributed_table('triggered', 'id', colocate_with => 'patients');
	SET citus.enable_unsafe_triggers = on;
	CREATE TRIGGER pass BEFORE INSERT ON triggered FOR EACH ROW EXECUTE FUNCTION pass_row();
	GRANT INSERT, SELECT ON checked_copy, triggered TO reader;
});
for my $node ($coordinator, @workers)
{
	$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.plaintext_transport = 'tls'; SELECT pg_reload_conf();});
}

# One statement as "reader" over a new connection: "refused SQLSTATE" for the
# transport refusal, "error SQLSTATE" for any other error, else the output.
sub over
{
	my ($node, $conninfo, $sql) = @_;
	my ($stdout, $stderr);
	IPC::Run::run([ 'psql', '-XAtq', '-v', 'VERBOSITY=verbose', '-v', 'ON_ERROR_STOP=1',
			'-d', "$conninfo port=" . $node->port . ' dbname=postgres user=reader', '-c', $sql ],
		'<', \'', '>', \$stdout, '2>', \$stderr);
	return "refused $1" if $stderr =~ /(\d{5}): pgphi does not return plaintext/;
	return "error $1: $stderr" if $stderr =~ /ERROR:\s+(\w{5}):/;
	return $stdout =~ s/\n$//r;
}
my $tcp = 'host=127.0.0.1 sslmode=disable';
my $tls = 'host=127.0.0.1 sslmode=require';

# --- every decrypting function: refused without TLS -------------------------------

my $in_list = join(', ', map { "'$_'" } @decrypting_symbols);
my @signatures = split /\n/, $coordinator->safe_psql('postgres', qq{
	SELECT p.oid::regprocedure || '|' || array_to_string(ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t), ',')
	  FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pgphi'
	 WHERE p.prosrc IN ($in_list) ORDER BY 1});
cmp_ok(scalar(@signatures), '>=', 10, scalar(@signatures) . ' SQL functions call the decrypting entry points');
for my $line (@signatures)
{
	my ($signature, $types) = split /\|/, $line;
	my ($name) = $signature =~ /^([\w.]+)\(/;
	my $args = join(', ', map { $_ eq 'pgphi.encrypted' ? 'ssn' : $_ eq 'bytea' ? 'ssn::bytea' : 'mrn' }
		split /,/, $types);
	my $sql = "SELECT count($name($args)) FROM patients";
	is(over($coordinator, $tcp, $sql), 'refused 28000', "$signature on a distributed table, TCP: refused");
}
is(over($coordinator, $tcp, q{SELECT pgphi.decrypt_phi(NULL::pgphi.encrypted)}), 'refused 28000',
	'... and with no table at all');
is(over($coordinator, $tls, q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn, 'ssn', mrn) = 'ssn-' || id}),
	'100', 'over TLS every value decrypts (on the workers)');

# --- Citus's functions that run SQL on other nodes --------------------------------

# Every Citus function taking SQL text (an argument named like a command or
# query) is either in the guard's list, or runs its SQL in this backend, where
# the statement is planned, and so checked, here.
my %runs_here = map { $_ => 1 } qw(citus_run_local_command worker_apply_sequence_command worker_execute_sql_task
	create_intermediate_result broadcast_intermediate_result worker_save_query_explain_analyze
	citus_dist_stat_activity citus_worker_stat_activity database_command worker_apply_shard_ddl_command
	worker_apply_inter_shard_ddl_command worker_create_or_replace_object worker_record_sequence_dependency
	citus_internal_database_command worker_partition_query_result);
my @text_takers = split /\n/, $coordinator->safe_psql('postgres', q{
	SELECT DISTINCT p.proname FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
	  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'citus'
	 WHERE EXISTS (SELECT FROM unnest(p.proargnames, p.proargtypes::oid[]) a(n, t)
	                WHERE a.n ~ '^(command|commands|query|queries|sql)' AND a.t IN ('text'::regtype, 'text[]'::regtype))
	 ORDER BY 1});
my %listed = map { $_ => 1 } @node_commands;
my @unclassified = grep { !$listed{$_} && !$runs_here{$_} } @text_takers;
is_deeply(\@unclassified, [], 'every Citus function that takes SQL text is classified') or diag("@unclassified");
for my $function (@node_commands)
{
	my @overloads = split /\n/, $coordinator->safe_psql('postgres', qq{
		SELECT string_agg(format('NULL::%s', format_type(t, NULL)), ', ' ORDER BY o)
		  FROM pg_proc p, unnest(p.proargtypes::oid[]) WITH ORDINALITY a(t, o)
		 WHERE p.proname = '$function' AND p.pronamespace = 'pg_catalog'::regnamespace GROUP BY p.oid});
	ok(@overloads, "$function exists in this Citus");
	is(over($coordinator, $tcp, "SELECT * FROM pg_catalog.$function($_)"), 'refused 28000',
		"$function($_), TCP: refused") for @overloads;
}

# --- user functions that Citus runs on a worker, and views ------------------------

is(over($coordinator, $tcp, q{SELECT count(unwrap(ssn, mrn)) FROM patients}), 'refused 28000',
	'a user function on a distributed table, TCP: refused');
is(over($coordinator, $tls, q{SELECT unwrap(ssn, mrn) FROM patients WHERE id = 3}), 'ssn-3', '... over TLS: decrypts');
is(over($coordinator, $tcp, q{SELECT ssn_of(5)}), 'refused 28000', 'a delegated distributed function, TCP: refused');
is(over($coordinator, $tls, q{SELECT ssn_of(5)}), 'ssn-5', '... over TLS: decrypts');
is(over($coordinator, $tcp, q{SELECT count(*) FROM patients_clear}), 'refused 28000', 'a decrypting view, TCP: refused');
is(over($coordinator, $tls, q{SELECT ssn FROM patients_clear WHERE id = 9}), 'ssn-9', '... over TLS: decrypts');

is(over($coordinator, $tcp, q{SELECT peek(5)}), 'refused 28000', 'a function colocated with a reference table, TCP: refused');
is(over($coordinator, $tcp, q{CALL fetch_ssn(5)}), 'refused 28000', 'CALL of a distributed procedure, TCP: refused');
is(over($coordinator, $tls, q{CALL fetch_ssn(5)}), 'ssn-5', '... over TLS: decrypts');
is(over($coordinator, $tcp, q{SELECT count(ROW(ssn, mrn)::pair::checked_pair) FROM patients}), 'refused 28000',
	'a domain whose CHECK decrypts, TCP: refused');
is(over($coordinator, $tls, q{SELECT count(ROW(ssn, mrn)::pair::checked_pair) FROM patients}), '100', '... over TLS: checked');
is(over($coordinator, $tcp, q{INSERT INTO checked_copy SELECT id, mrn, ssn FROM patients}), 'refused 28000',
	'a write into a table whose CHECK decrypts, TCP: refused');
is(over($coordinator, $tcp, q{COPY checked_copy FROM STDIN}), 'refused 28000', '... and COPY into it');
is(over($coordinator, $tls, q{INSERT INTO checked_copy SELECT id, mrn, ssn FROM patients}), '', '... over TLS: written');
is(over($coordinator, $tcp, q{INSERT INTO triggered VALUES (1, NULL)}), 'refused 28000',
	'a write into a table with a user trigger, TCP: refused');
is(over($coordinator, $tls, q{INSERT INTO triggered VALUES (1, NULL)}), '', '... over TLS: written');

# --- what needs no plaintext still works without TLS ------------------------------

is(over($coordinator, $tcp, q{SELECT count(*), max(upper(mrn)) FROM patients}), '100|MRN-99', 'TCP: a plain scan');
is(over($coordinator, $tcp, q{SELECT (pgphi.ciphertext_info(ssn)).key_version FROM patients WHERE id = 1}), '1',
	'TCP: pgphi functions that return no plaintext');
is(over($coordinator, $tcp, q{INSERT INTO patients VALUES (101, 'MRN-101', pgphi.encrypt_phi('ssn-101', 'ssn', 'MRN-101'))}),
	'', 'TCP: encrypting inserts');
is(over($coordinator, $tls, q{SELECT pgphi.decrypt_phi(ssn, 'ssn', mrn) FROM patients WHERE id = 101}), 'ssn-101',
	'... and the value decrypts over TLS');

# --- the Unix socket, and a worker reached directly -------------------------------

my $socket = "host=$coordinator->{_host}";
my $one = q{SELECT pgphi.decrypt_phi(ssn, 'ssn', mrn) FROM patients WHERE id = 7};
is(over($coordinator, $socket, $one), 'refused 28000', 'Unix socket under "tls": refused');
$coordinator->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.plaintext_transport = 'tls_or_local'; SELECT pg_reload_conf();});
is(over($coordinator, $socket, $one), 'ssn-7', 'Unix socket under "tls_or_local": decrypts');
is(over($coordinator, $tcp, $one), 'refused 28000', 'TCP without TLS still refused');
my $shard = $workers[0]->safe_psql('postgres', q{SET citus.override_table_visibility = off;
	SELECT relname FROM pg_class WHERE relname ~ '^patients_\d+$' LIMIT 1});
$workers[0]->safe_psql('postgres', qq{GRANT SELECT ON $shard TO reader});
is(over($workers[0], $tcp, qq{SET citus.override_table_visibility = off; SELECT count(pgphi.decrypt_phi(ssn, 'ssn', mrn)) FROM $shard}),
	'refused 28000', 'a worker reached directly without TLS refuses too');

# --- a plan cached before the setting was tightened --------------------------------

# A generic plan, made while the setting allowed the session, is planned (and
# so checked) again when the setting changes. As the superuser, who may SET it.
my @steps = (q{SET pgphi.plaintext_transport = 'any'}, q{SET plan_cache_mode = force_generic_plan},
	q{PREPARE one AS SELECT pgphi.decrypt_phi(ssn, 'ssn', mrn) FROM patients WHERE id = 7}, q{EXECUTE one},
	q{SET pgphi.plaintext_transport = 'tls'}, q{EXECUTE one});
my ($cached_out, $cached_err);
IPC::Run::run([ 'psql', '-XAtq', '-v', 'VERBOSITY=verbose', '-d',
		"$tcp port=" . $coordinator->port . ' dbname=postgres user=' . getpwuid($<), map { ('-c', $_) } @steps ],
	'>', \$cached_out, '2>', \$cached_err);
is($cached_out =~ s/\n$//r, 'ssn-7', 'a prepared statement decrypts while the setting allows it');
like($cached_err, qr/28000: pgphi does not return plaintext/, '... and is refused once the setting is tightened');

# --- audited ------------------------------------------------------------------------

ok($coordinator->poll_query_until('postgres', q{SELECT coalesce(sum(occurrences), 0) >= 20 FROM pgphi.audit_log
	WHERE outcome = 'refused' AND detail = 'client connection without TLS (Citus)' AND login_role = 'reader'}),
	'the refusals are in the coordinator\'s audit log');
$coordinator->safe_psql('postgres', q{ALTER SYSTEM RESET pgphi.plaintext_transport; SELECT pg_reload_conf();});

done_testing();
