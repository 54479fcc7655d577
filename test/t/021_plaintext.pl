# Plaintext stays out of what PostgreSQL writes on its own:
#  1. autovacuum never decrypts, so extended statistics on a decrypting
#     wrapper stay empty (issue 13, finding 2, as the reviewer did it: plain
#     TCP under plaintext_transport = 'tls');
#  2. no pgphi error echoes a value passed in a text argument: every pgphi
#     function, enumerated from pg_proc, is called with a PHI-like marker in
#     each text argument in turn, as three kinds of role (finding 12);
#  3. with the settings docs/security-model.md recommends, PostgreSQL's own errors (a
#     unique violation's DETAIL, a failed cast) leave no plaintext in the
#     server log, which they do with the defaults;
#  4. a background worker without a client (logical replication's apply
#     worker, firing a trigger) never decrypts.
use strict;
use warnings;

use File::Copy;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;

my $pki = "$PostgreSQL::Test::Utils::tmp_check/pki";
KeyManagerEmulator::make_pki($pki);

my $node = PgphiTest::new_node('plaintext');
my $data = $node->data_dir;
copy("$pki/server.pem", "$data/server.crt") or die "copy: $!";
copy("$pki/server.key", "$data/server.key") or die "copy: $!";
chmod 0600, "$data/server.key";
$node->append_conf('postgresql.conf', <<CONF);
listen_addresses = '127.0.0.1'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
autovacuum_naptime = 1
log_autovacuum_min_duration = 0
CONF
$node->append_conf('pg_hba.conf', "host all all 127.0.0.1/32 trust\n");
$node->restart;
my $port = $node->port;

# Where the server log stands, and what it gained since.
sub log_position { return -s $node->logfile; }
sub log_since
{
	my ($offset) = @_;
	open my $fh, '<', $node->logfile or die "open log: $!";
	seek $fh, $offset, 0;
	local $/;
	my $text = <$fh>;
	close $fh;
	return $text // '';
}

# Runs SQL as `user` over TCP (with or without TLS); returns [stdout, stderr].
sub over_tcp
{
	my ($sslmode, $user, $sql) = @_;
	my ($stdout, $stderr);
	IPC::Run::run([ 'psql', '-XAtq', '-v', 'VERBOSITY=verbose', '-d',
			"host=127.0.0.1 sslmode=$sslmode port=$port dbname=postgres user=$user", '-c', $sql ],
		'>', \$stdout, '2>', \$stderr);
	return [ $stdout // '', $stderr // '' ];
}

$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE clinician LOGIN;
	GRANT pgphi_encrypt, pgphi_decrypt TO clinician;
	GRANT CREATE ON SCHEMA public TO clinician;
	SELECT pgphi.create_key('ssn');
	SELECT pgphi.grant_encrypt('ssn', 'clinician'), pgphi.grant_decrypt('ssn', 'clinician');
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted);
	ALTER TABLE patients OWNER TO clinician;
	INSERT INTO patients SELECT i, pgphi.encrypt_phi(format('zz-ssn-%s', lpad(i::text, 4, '0')), 'ssn')
	  FROM generate_series(1, 500) i;
	CREATE TABLE visits (id int, note text);
	ALTER SYSTEM SET pgphi.plaintext_transport = 'tls';
	SELECT pg_reload_conf();
});

# --- 1. Autovacuum does not decrypt ------------------------------------------

my $decrypt_one = q{SELECT pgphi.decrypt_phi(ssn) FROM patients WHERE id = 7};
like(over_tcp('disable', 'clinician', $decrypt_one)->[1], qr/28000: pgphi does not return plaintext/,
	'over plain TCP the clinician cannot decrypt');
is(over_tcp('require', 'clinician', $decrypt_one)->[0], "zz-ssn-0007\n", 'over TLS it can');

# The reviewer's attack, over plain TCP: extended statistics on an IMMUTABLE
# wrapper, and autovacuum told to analyze the table at once.
my $attack = over_tcp('disable', 'clinician', q{
	CREATE FUNCTION reveal(v pgphi.encrypted) RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT pgphi.decrypt_phi(v) $$;
	CREATE STATISTICS patients_reveal ON (reveal(ssn)) FROM patients;
	ALTER TABLE patients SET (autovacuum_analyze_threshold = 0, autovacuum_analyze_scale_factor = 0);
	UPDATE patients SET id = id WHERE id <= 100;
});
is($attack->[1], '', 'the attacker sets up extended statistics without an error');
$node->safe_psql('postgres', q{
	ALTER TABLE visits SET (autovacuum_analyze_threshold = 0, autovacuum_analyze_scale_factor = 0);
	INSERT INTO visits SELECT i, 'note' FROM generate_series(1, 100) i;
});

ok($node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE detail = 'derived data: in autovacuum' AND key_name = 'ssn' AND outcome = 'refused')}),
	'autovacuum was refused, and the refusal is in the audit log');
ok($node->poll_query_until('postgres', q{SELECT autoanalyze_count > 0 FROM pg_stat_user_tables WHERE relname = 'visits'}),
	'autovacuum goes on analyzing other tables');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_statistic_ext s
	JOIN pg_statistic_ext_data d ON d.stxoid = s.oid WHERE s.stxname = 'patients_reveal'}),
	'0', 'pg_statistic_ext_data holds nothing for the statistics object');
my $read_back = over_tcp('disable', 'clinician', q{SELECT count(*) FROM pg_stats_ext_exprs
	WHERE statistics_name = 'patients_reveal' AND num_nulls(null_frac, most_common_vals, histogram_bounds) < 3});
is($read_back->[0], "0\n", 'and the attacker reads no statistics back from pg_stats_ext_exprs');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_statistic
	WHERE concat_ws(',', stavalues1, stavalues2, stavalues3, stavalues4, stavalues5) LIKE '%zz-ssn%'}),
	'0', 'pg_statistic holds no plaintext anywhere');
like(slurp_file($node->logfile), qr/ERROR:  pgphi does not decrypt in autovacuum/,
	'autovacuum logged the refusal');
unlike(slurp_file($node->logfile), qr/zz-ssn-/, 'and the server log holds no plaintext');
is(over_tcp('require', 'clinician', q{SELECT count(pgphi.decrypt_phi(ssn)) FROM patients})->[0], "500\n",
	'a client over TLS still decrypts everything');
$node->safe_psql('postgres', q{DROP STATISTICS patients_reveal; ALTER SYSTEM RESET pgphi.plaintext_transport;
	SELECT pg_reload_conf();});

# --- 2. No pgphi error repeats a value from a text argument ------------------

# PostgreSQL logs each failing statement's text, which holds the marker as a
# literal; the guidance in docs/security-model.md turns that off, and the test checks the rest.
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET log_min_error_statement = panic;
	ALTER SYSTEM SET log_error_verbosity = verbose;
	SELECT pg_reload_conf();
	CREATE ROLE marker_app;
	CREATE ROLE marker_custodian;
	GRANT pgphi_encrypt, pgphi_decrypt TO marker_app;
	GRANT pgphi_key_custodian TO marker_custodian;
	CREATE TABLE marker_t (id int PRIMARY KEY, ssn pgphi.encrypted, plain text, idx bytea);
	INSERT INTO marker_t VALUES (1, pgphi.encrypt_phi('zz-ssn-0001', 'ssn'), 'zz-ssn-0001', NULL);
	GRANT ALL ON marker_t TO marker_app, marker_custodian;
});
my $marker = '123-45-6789';
my $cipher = $node->safe_psql('postgres', q{SELECT encode(pgphi.encrypt_phi('zz-ssn-0002', 'ssn')::bytea, 'hex')});

# A valid value for every argument type pgphi's functions take; the text
# argument under test gets the marker instead. A new argument type fails the
# test until it has a value here.
my %value_of = (
	'text'                     => q{'ssn'},
	'name'                     => q{'ssn'},
	'bytea'                    => qq{'\\x$cipher'},
	'pgphi.encrypted'          => qq{'\\x$cipher'},
	'integer'                  => '1',
	'bigint'                   => '1',
	'boolean'                  => 'false',
	'interval'                 => q{'1 day'},
	'jsonb'                    => q{'{}'},
	'regclass'                 => q{'public.marker_t'},
	'regrole'                  => q{'marker_app'},
	'timestamp with time zone' => 'now()',
	'text[]'                   => q{'{}'},
	'integer[]'                => q{'{}'},
	'name[]'                   => q{'{}'},
	'pgphi.audit_log'          => 'NULL',
	'regtype[]'                => q{'{text}'},
	'regclass[]'               => q{'{}'},
	'regprocedure'             => q{'pgphi.create_key(text,text,text,boolean)'},
	'pg_ddl_command'           => 'NULL',
	'oid'                      => '0',
	'double precision'         => '1',
);
# Arguments of type name are SQL identifiers (a table's columns), which
# PostgreSQL's own errors name as they do everywhere: the marker goes into
# the text arguments, where key names, contexts and values are passed.
my %text_like = map { $_ => 1 } ('text', 'character varying');
# Text arguments that are not a user's input by design, and so may appear
# in what they produce: the batch procedures' internal helpers that run one
# generated statement (an error quotes its SQL) or word a message, and the
# audit trail's writers (superuser only), whose arguments are the row.
my %sql_fragment_args = ('_update_pages' => [ 1, 2 ], '_update_sweep' => [ 2, 3 ],
	'_progress_pages' => [ 3, 4 ], '_progress_sweep' => [ 3, 4 ], '_citus_sweep' => [8], '_check_column_type' => [4],
	'_audit' => [ 1, 4, 5 ], '_record_audit_event' => [ 2, 3, 4, 6, 8, 9 ]);

# Every function and procedure of the extension. Those taking or returning
# PostgreSQL-internal types (type I/O, ANALYZE support, triggers) cannot be
# called from SQL with a text argument, and are counted apart.
my $functions = $node->safe_psql('postgres', q{
	SET search_path = pg_catalog;
	SELECT p.oid, p.prokind, quote_ident(n.nspname) || '.' || quote_ident(p.proname),
	       coalesce(array_to_string(ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t), ';'), ''),
	       format_type(p.prorettype, NULL), p.oid::regprocedure
	  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
	  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pgphi'
	 ORDER BY p.oid});

my (@cases, %functions_tested, @internal, @no_text, @untyped);
for my $line (split /\n/, $functions)
{
	my ($oid, $kind, $name, $args, $ret, $signature) = split /\|/, $line;
	my @types = $args eq '' ? () : split /;/, $args;
	if (grep { $_ eq 'internal' || $_ eq 'cstring' } @types or $ret =~ /^(trigger|internal|cstring)$/)
	{
		push @internal, $signature;
		next;
	}
	my @missing = grep { !exists $value_of{$_} } @types;
	if (@missing)
	{
		push @untyped, "$signature (@missing)";
		next;
	}
	my ($short_name) = $signature =~ /^pgphi\.(\w+)\(/;
	my %fragment = map { ($_ - 1) => 1 } @{ $sql_fragment_args{$short_name} // [] };
	my @text_positions = grep { $text_like{ $types[$_] } && !$fragment{$_} } 0 .. $#types;
	if (!@text_positions)
	{
		push @no_text, $signature;
		next;
	}
	$functions_tested{$signature} = 1;
	for my $position (@text_positions)
	{
		my @values = map { $_ == $position ? "'$marker'" : $value_of{ $types[$_] } } 0 .. $#types;
		my $call = join(', ', map { "$values[$_]::$types[$_]" } 0 .. $#types);
		push @cases, { signature => $signature, position => $position + 1, kind => $kind,
			sql => ($kind eq 'p' ? "CALL $name($call)" : "SELECT $name($call)") };
	}
}
is(scalar(@untyped), 0, 'every argument type of pgphi\'s functions has a test value')
  or diag("no test value for: @untyped");
cmp_ok(scalar(keys %functions_tested), '>=', 30, 'the functions with text arguments were enumerated from pg_proc');
note(scalar(keys %functions_tested) . ' functions with text arguments, ' . scalar(@cases) . ' text arguments; '
	  . scalar(@no_text) . ' functions without one, ' . scalar(@internal) . ' with internal types');

# One session per role; each case rolls back (procedures, which commit, run
# on their own), and its messages are told apart by a marker line on stderr.
# Returns the calls that failed, the leaks, and the server log lines with
# the marker.
my %roles = (superuser => 'RESET ROLE', custodian => 'SET ROLE marker_custodian', application => 'SET ROLE marker_app');
sub run_cases
{
	my ($cases) = @_;
	my $log_start = log_position();
	my ($errors, @leaks) = (0);
	for my $role (sort keys %roles)
	{
		my $script = "\\set VERBOSITY verbose\n\\set SHOW_CONTEXT always\n";
		for my $i (0 .. $#$cases)
		{
			my $case = $cases->[$i];
			$script .= "\\warn ===CASE $i===\n$roles{$role};\n";
			$script .= $case->{kind} eq 'p' ? "$case->{sql};\n" : "BEGIN;\n$case->{sql};\nROLLBACK;\n";
			$script .= "RESET ROLE;\n";
		}
		$script .= "\\warn ===CASE END===\n";
		my ($stdout, $stderr);
		IPC::Run::run([ 'psql', '-XAq', '-d', $node->connstr('postgres') ], '<', \$script, '>', \$stdout, '2>', \$stderr);
		my @blocks = split /^===CASE (\d+|END)===\n/m, $stderr;
		shift @blocks;
		my %seen;
		while (my ($id, $text) = splice(@blocks, 0, 2))
		{
			next if $id eq 'END';
			$seen{$id} = 1;
			$errors++ if $text =~ /ERROR:/;
			push @leaks, "$role: $cases->[$id]{signature} argument $cases->[$id]{position}: " . ($text =~ s/\n/ | /gr)
			  if index($text, $marker) >= 0;
		}
		is(scalar(keys %seen), scalar(@$cases), "as $role: all " . scalar(@$cases) . ' cases ran');
	}
	$node->safe_psql('postgres', 'SELECT 1');
	my @log_leaks = grep { index($_, $marker) >= 0 } split /\n/, log_since($log_start);
	return ($errors, \@leaks, \@log_leaks);
}

my ($errors, $leaks, $log_leaks) = run_cases(\@cases);
note("$errors of " . 3 * scalar(@cases) . ' calls failed, as most must');
is(scalar(@$leaks), 0, 'no pgphi error, detail, hint or context repeats the marker') or diag(join("\n", @$leaks));
is(scalar(@$log_leaks), 0, 'no server log line holds it') or diag(join("\n", @$log_leaks));

# --- 3. PostgreSQL's own errors, with and without the recommended settings -------

$node->safe_psql('postgres', q{
	CREATE TABLE ssn_copy (ssn text UNIQUE);
	INSERT INTO ssn_copy SELECT pgphi.decrypt_phi(ssn) FROM patients WHERE id = 11;
});
my @postgres_errors = (
	[ 'unique violation', q{INSERT INTO ssn_copy SELECT pgphi.decrypt_phi(ssn) FROM patients WHERE id = 11},
		qr/duplicate key value violates unique constraint/ ],
	[ 'failed cast', q{SELECT pgphi.decrypt_phi(ssn)::integer FROM patients WHERE id = 12},
		qr/invalid input syntax for type integer/ ],
	[ 'literal in a failing statement', q{SELECT pgphi.encrypt_phi('zz-ssn-0013', 'ssn') / 0},
		qr/operator does not exist/ ],
);
sub run_postgres_errors
{
	my $start = log_position();
	for my $case (@postgres_errors)
	{
		my ($what, $sql, $expected) = @$case;
		my ($ret, $stdout, $stderr) = $node->psql('postgres', $sql);
		like($stderr, $expected, "$what: the client gets the error");
	}
	# The log is written by the logging collector or stderr at once; a
	# statement after the errors makes sure they are all in.
	$node->safe_psql('postgres', 'SELECT 1');
	return log_since($start);
}

$node->safe_psql('postgres', q{ALTER SYSTEM RESET log_min_error_statement; ALTER SYSTEM RESET log_error_verbosity;
	SELECT pg_reload_conf();});
my $with_defaults = run_postgres_errors();
like($with_defaults, qr/zz-ssn-0011/, 'with the defaults, a unique violation logs the plaintext (DETAIL)');
like($with_defaults, qr/zz-ssn-0012/, 'a failed cast logs it in its message');
like($with_defaults, qr/zz-ssn-0013/, 'and a failing statement logs its literals');

# The settings from "Keeping PHI out of the server log" in docs/security-model.md.
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET log_min_messages = log;
	ALTER SYSTEM SET log_min_error_statement = panic;
	ALTER SYSTEM SET log_error_verbosity = terse;
	ALTER SYSTEM SET log_statement = none;
	ALTER SYSTEM SET log_min_duration_statement = -1;
	ALTER SYSTEM SET log_parameter_max_length = 0;
	ALTER SYSTEM SET log_parameter_max_length_on_error = 0;
	SELECT pg_reload_conf();
});
my $with_guidance = run_postgres_errors();
unlike($with_guidance, qr/zz-ssn-/, 'with the recommended log settings, none of them leaves plaintext in the server log');
unlike($with_guidance, qr/ERROR:/, 'errors go to the client only');

# --- 4. A background worker without a client does not decrypt ----------------

# The logical replication apply worker runs for no client. A trigger that
# the subscriber fires on replicated rows (ENABLE ALWAYS) and that decrypts
# into a table would store plaintext nobody asked for: refused, and audited.
$node->stop;
my $publisher = PgphiTest::new_node('publisher', allows_streaming => 'logical');
$publisher->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn');
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted);
	CREATE PUBLICATION clinic FOR TABLE patients, pgphi.keys, pgphi.key_versions;
});
my $subscriber = PgphiTest::new_node('subscriber');
copy($publisher->data_dir . '/pgphi_local.kek', $subscriber->data_dir . '/pgphi_local.kek') or die;
chmod 0600, $subscriber->data_dir . '/pgphi_local.kek';
$subscriber->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted);
	CREATE TABLE plain_copy (id int, ssn text);
	CREATE FUNCTION copy_plain() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.plain_copy VALUES (NEW.id, pgphi.decrypt_phi(NEW.ssn));
		RETURN NEW;
	END $$;
	CREATE TRIGGER copy_plain AFTER INSERT ON patients FOR EACH ROW EXECUTE FUNCTION copy_plain();
	ALTER TABLE patients ENABLE ALWAYS TRIGGER copy_plain;
});
(my $connstr = $publisher->connstr('postgres')) =~ s/'/''/g;
$subscriber->safe_psql('postgres', "CREATE SUBSCRIPTION clinic CONNECTION '$connstr' PUBLICATION clinic");
$subscriber->wait_for_subscription_sync($publisher, 'clinic');
$publisher->safe_psql('postgres', q{INSERT INTO patients VALUES (1, pgphi.encrypt_phi('zz-ssn-0001', 'ssn'))});
ok($subscriber->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE detail = 'derived data: in a process without a client' AND key_name = 'ssn')}),
	'the apply worker is refused, and the refusal is audited');
like(slurp_file($subscriber->logfile), qr/ERROR:  pgphi does not decrypt in a process without a client connection/,
	'with its own message');
is($subscriber->safe_psql('postgres', 'SELECT count(*) FROM plain_copy'), '0', 'no plaintext was stored');
$subscriber->safe_psql('postgres', q{ALTER TABLE patients DISABLE TRIGGER copy_plain});
$subscriber->poll_query_until('postgres', 'SELECT count(*) = 1 FROM patients') or die 'the row did not replicate';
is($subscriber->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(ssn) FROM patients}), 'zz-ssn-0001',
	'without the trigger the row replicates, and a client decrypts it');
$subscriber->stop;
$publisher->stop;

done_testing();
