# Exfiltration limits, anomaly alerts and break-glass (docs/key-lifecycle.md):
# two sessions share one decrypt budget and the next value past it is refused
# (53400) in both; the alert is raised once per window with its three
# outputs (an audit row, a WARNING in the server log, NOTIFY pgphi_alert,
# received by a listening session), also when raised by a read-only
# transaction; alert-only mode lets decrypts through; failed decrypts,
# refused attempts and a role's volume far above its baseline alert once;
# break-glass takes two custodians to configure, grants decrypt for the
# configured period only, counts every value, and ends by itself; on a
# standby a limit refuses and alerts with a WARNING only.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $primary = PgphiTest::new_node('primary', allows_streaming => 1);
$primary->append_conf('postgresql.conf', q{
pgphi.alert_window = 600
pgphi.alert_failed_decrypts = 3
pgphi.alert_refused_attempts = 5
pgphi.alert_volume_min = 1000000
});
$primary->reload;
$primary->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	CREATE ROLE app LOGIN; GRANT pgphi_decrypt TO app;
	CREATE ROLE clerk LOGIN; GRANT pgphi_decrypt TO clerk;
	CREATE ROLE bulk LOGIN; GRANT pgphi_decrypt TO bulk;
	CREATE ROLE doc LOGIN; GRANT pgphi_decrypt TO doc;
	SELECT pgphi.create_key('lk');
	SELECT pgphi.grant_decrypt('lk', r) FROM unnest(ARRAY['app', 'bulk']::regrole[]) r;
	CREATE TABLE t (id int PRIMARY KEY, v pgphi.encrypted);
	INSERT INTO t SELECT i, pgphi.encrypt_phi('value-' || i, 'lk', 'ctx-' || i) FROM generate_series(1, 1000) i;
	GRANT SELECT ON t TO app, clerk, bulk, doc;
});
$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
chmod 0600, $standby->data_dir . '/pgphi_local.kek';
$standby->start;

sub decrypt_sql
{
	my ($n) = @_;
	return qq{SELECT count(pgphi.decrypt_phi(v, 'lk', 'ctx-' || id)) FROM t WHERE id <= $n};
}

sub as_custodian
{
	my ($who, $sql) = @_;
	return $primary->safe_psql('postgres', $sql, extra_params => [ '-U', $who ]);
}

# A session that listens, and a way to wait for what it hears.
my $listener = $primary->background_psql('postgres', on_error_stop => 0);
$listener->query_safe('LISTEN pgphi_alert');
my $heard = '';
sub wait_for_notification
{
	my ($pattern, $name) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		$heard .= $listener->query('SELECT 1') // '';
		if ($heard =~ $pattern)
		{
			pass($name);
			return;
		}
		sleep 0.2;
	}
	fail($name);
	diag("heard: $heard");
}
sub alert_rows
{
	my ($kind, $role) = @_;
	my $of_role = defined $role ? "AND acting_role = '$role'" : '';
	return $primary->safe_psql('postgres',
		"SELECT count(*) FROM pgphi.audit_log WHERE action = 'alert' AND detail LIKE '$kind:%' $of_role");
}
sub wait_for_alert_row
{
	my ($kind) = @_;
	return $primary->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM pgphi.audit_log WHERE action = 'alert' AND detail LIKE '$kind:%'");
}

# --- Decrypt limits ----------------------------------------------------------

is(as_custodian('c1', q{SELECT pgphi.set_decrypt_limit('lk', 'app', 100, interval '1 hour')}), 't',
	'a custodian sets a decrypt limit');
is(as_custodian('c1', q{SELECT pgphi.set_decrypt_limit('lk', 'app', 100, interval '1 hour')}), 'f',
	'setting the same limit again changes nothing');
like(PgphiTest::psql_error($primary, 'postgres',
		q{SET SESSION AUTHORIZATION c1; SELECT pgphi.set_decrypt_limit('lk', 'app', 0)}),
	qr/22023/, 'a limit of no values is refused');

my $s1 = $primary->background_psql('postgres', on_error_stop => 0);
my $s2 = $primary->background_psql('postgres', on_error_stop => 0);
$s1->query_safe('SET ROLE app');
$s2->query_safe('SET ROLE app');
is($s1->query_safe(decrypt_sql(60)), '60', 'session 1 decrypts 60 values within the limit');
is($s2->query_safe(decrypt_sql(40)), '40', 'session 2 decrypts the other 40 of the shared budget');
$s1->query("\\set VERBOSITY verbose");
my $refused = $s1->query('SELECT pgphi.decrypt_phi(v, \'lk\', \'ctx-1\') FROM t WHERE id = 1');
like($s1->{stderr}, qr/53400.*pgphi decrypt limit reached for key "lk"/s,
	'the next value past the shared budget is refused with 53400');
like($s1->{stderr}, qr/at most 100 values per 01:00:00/, 'the detail names the limit and its window');
$s1->{stderr} = '';
$s2->query('SELECT pgphi.decrypt_phi(v, \'lk\', \'ctx-2\') FROM t WHERE id = 2');
like($s2->{stderr}, qr/pgphi decrypt limit reached/, 'the other session is refused too');
$s2->{stderr} = '';

# The alert: once per window, with its three outputs.
wait_for_alert_row('decrypt_limit');
is(alert_rows('decrypt_limit'), '1', 'the limit alert is one audit row');
wait_for_notification(qr/pgphi_alert.*decrypt_limit/, 'the listening session receives NOTIFY pgphi_alert');
$primary->poll_query_until('postgres', q{SELECT count(*) > 0 FROM pgphi.audit_log
	WHERE action = 'decrypt' AND outcome = 'refused' AND detail = 'decrypt limit reached'})
  or die 'no refusal row';
pass('each refused value is audited (coalesced) as a refused decrypt');
my $log = slurp_file($primary->logfile);
my @warnings = ($log =~ /WARNING:  pgphi alert \(decrypt_limit\)/g);
is(scalar(@warnings), 1, 'the server log has the alert\'s WARNING once');

# A read-only transaction past the limit: refused, no second alert.
$s1->query('BEGIN READ ONLY');
$s1->query(decrypt_sql(5));
like($s1->{stderr}, qr/decrypt limit reached/, 'a read-only transaction is refused as well');
$s1->query('ROLLBACK');
$s1->{stderr} = '';
$s2->{stderr} = '';

# Alert-only mode: decrypts pass the limit.
$primary->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.decrypt_limit_action = 'alert'});
$primary->reload;
$s1->query_safe('SELECT 1');    # takes in the reload
is($s1->query_safe(decrypt_sql(10)), '10', 'with decrypt_limit_action = alert the values are decrypted');
is(alert_rows('decrypt_limit'), '1', 'and the window\'s alert is not raised again');
$primary->safe_psql('postgres', q{ALTER SYSTEM RESET pgphi.decrypt_limit_action});
$primary->reload;

# A new limit (a new alert window of its own) reached by a read-only
# transaction: the alert is still recorded and signalled, by the audit writer.
is(as_custodian('c1', q{SELECT pgphi.set_decrypt_limit('lk', 'bulk', 5, interval '1 day')}), 't',
	'a limit on a second role');
my $ro = $primary->background_psql('postgres', on_error_stop => 0);
$ro->query_safe('SET ROLE bulk');
$ro->query('BEGIN READ ONLY');
$ro->query(decrypt_sql(6));
like($ro->{stderr}, qr/WARNING:  pgphi alert \(decrypt_limit\).*ERROR:  pgphi decrypt limit reached/s,
	'a read-only transaction raises the alert\'s WARNING, then the refusal');
$ro->query('ROLLBACK');
$ro->{stderr} = '';
wait_for_notification(qr/pgphi_alert.*role bulk passed/, 'the read-only transaction\'s alert is signalled');
is(as_custodian('c2', q{SELECT pgphi.set_decrypt_limit('lk', 'bulk', NULL)}), 't', 'a limit is removed');
is($ro->query_safe(decrypt_sql(6)), '6', 'and no longer applies');

# Custodians cannot loosen a limit on themselves.
$primary->safe_psql('postgres', 'CREATE ROLE limited; CREATE ROLE cust_app LOGIN; GRANT pgphi_key_custodian, limited TO cust_app');
like(PgphiTest::psql_error($primary, 'postgres',
		q{SET SESSION AUTHORIZATION cust_app; SELECT pgphi.set_decrypt_limit('lk', 'limited', 1)}),
	qr/42501/, 'a custodian cannot change a limit on a role it belongs to');

# --- Anomaly alerts ----------------------------------------------------------

# Failed decrypts: values read with the wrong context.
$primary->psql('postgres', q{SET ROLE bulk; SELECT pgphi.decrypt_phi(v, 'lk', 'wrong') FROM t WHERE id = 1})
  for 1 .. 4;
wait_for_alert_row('failed_decrypts');
is(alert_rows('failed_decrypts'), '1', 'failed decrypts above the threshold alert once');
wait_for_notification(qr/pgphi_alert.*failed_decrypts/, 'the failed-decrypts alert is signalled');

# Refused attempts: a role without a grant.
$primary->psql('postgres', q{SET ROLE clerk; SELECT pgphi.decrypt_phi(v) FROM t WHERE id = 1}) for 1 .. 7;
wait_for_alert_row('refused_attempts');
is(alert_rows('refused_attempts'), '1', 'refused attempts above the threshold alert once');
wait_for_notification(qr/pgphi_alert.*refused_attempts/, 'the refused-attempts alert is signalled');

# Volume far above the role's baseline: bulk averaged 1 value per window.
$primary->safe_psql('postgres', q{
	INSERT INTO pgphi.key_use_stats (window_start, role_name, key_id, decryptions)
	SELECT date_trunc('hour', now()) - i * interval '1 hour', 'bulk', pgphi._key_id('lk'), 1
	  FROM generate_series(1, 24) i;
	ALTER SYSTEM SET pgphi.alert_volume_min = 100;
});
$primary->reload;
is($primary->safe_psql('postgres', 'SET ROLE bulk; ' . decrypt_sql(300)), '300', 'bulk decrypts 300 values');
wait_for_alert_row('decrypt_volume');
is(alert_rows('decrypt_volume', 'bulk'), '1', 'a volume far above the baseline alerts');
wait_for_notification(qr/pgphi_alert.*decrypt_volume.*role bulk decrypted/, 'the volume alert is signalled');
$primary->safe_psql('postgres', 'SET ROLE bulk; ' . decrypt_sql(300));
sleep 12;    # the next volume flush
is(alert_rows('decrypt_volume', 'bulk'), '1', 'and only once in its window');

# --- Break-glass -------------------------------------------------------------

like(PgphiTest::psql_error($primary, 'postgres', q{SET ROLE doc; SELECT pgphi.break_glass('lk', 'incident 7')}),
	qr/42501.*may not break the glass/s, 'a role not configured cannot break the glass');
is(as_custodian('c1', q{SELECT pgphi.set_break_glass_role('lk', 'doc', interval '8 seconds')}), 'proposed',
	'one custodian proposes a break-glass role');
like(PgphiTest::psql_error($primary, 'postgres',
		q{SET SESSION AUTHORIZATION c1; SELECT pgphi.set_break_glass_role('lk', 'doc', interval '8 seconds')}),
	qr/42501.*second key custodian/s, 'the same custodian cannot approve it');
like(PgphiTest::psql_error($primary, 'postgres', q{SET ROLE doc; SELECT pgphi.break_glass('lk', 'incident 7')}),
	qr/42501/, 'a proposal alone does not allow breaking the glass');
is(as_custodian('c2', q{SELECT pgphi.set_break_glass_role('lk', 'doc', interval '8 seconds')}), 'approved',
	'a second custodian approves it');
like(PgphiTest::psql_error($primary, 'postgres', q{SET ROLE doc; SELECT pgphi.break_glass('lk', ' ')}),
	qr/22023/, 'breaking the glass needs a reason');
like(PgphiTest::psql_error($primary, 'postgres', q{SET ROLE doc; } . decrypt_sql(1)), qr/42501/,
	'before breaking the glass the role cannot decrypt');

my $doc = $primary->background_psql('postgres', on_error_stop => 0);
$doc->query_safe('SET ROLE doc');
$doc->query(q{SELECT pgphi.break_glass('lk', 'incident 7: patient in ER, chart locked')});
like($doc->{stderr}, qr/WARNING:  pgphi alert \(break_glass\): role doc broke the glass/,
	'breaking the glass raises a WARNING');
$doc->{stderr} = '';
wait_for_notification(qr/pgphi_alert.*break_glass/, 'and NOTIFY pgphi_alert');
is($primary->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log
	WHERE action = 'break_glass' AND detail LIKE 'doc may decrypt until % reason: incident 7: patient in ER%'}), '1',
	'it is audited with the reason');
is($doc->query_safe(decrypt_sql(25)), '25', 'the break-glass role decrypts');
is($doc->query_safe(decrypt_sql(5)), '5', 'in several statements');
$primary->poll_query_until('postgres', q{SELECT values_decrypted = 30 FROM pgphi.break_glass_events
	WHERE role = 'doc'::regrole}) or diag('values_decrypted did not reach 30');
is($primary->safe_psql('postgres', q{SELECT values_decrypted FROM pgphi.break_glass_events WHERE role = 'doc'::regrole}),
	'30', 'every value it decrypted is counted against the event');
like(PgphiTest::psql_error($primary, 'postgres', q{SET ROLE app; SELECT pgphi.break_glass('lk', 'x')}),
	qr/42501/, 'another role cannot break the glass');
$primary->poll_query_until('postgres', q{SELECT ends_at < now() FROM pgphi.break_glass_events
	WHERE role = 'doc'::regrole}) or die 'the event did not end';
$doc->query(decrypt_sql(1));
like($doc->{stderr}, qr/permission denied to decrypt with pgphi key "lk"/,
	'when the period ends the open session is refused');

# --- On a standby ------------------------------------------------------------

as_custodian('c1', q{SELECT pgphi.set_decrypt_limit('lk', 'app', 10, interval '1 day')});
$primary->wait_for_catchup($standby);
my $replica = $standby->background_psql('postgres', on_error_stop => 0);
$replica->query_safe('SET ROLE app');
is($replica->query_safe(decrypt_sql(10)), '10', 'a standby session decrypts within the limit');
$replica->query(decrypt_sql(1));
like($replica->{stderr}, qr/WARNING:  pgphi alert \(decrypt_limit\).*ERROR:  pgphi decrypt limit reached/s,
	'past it the standby refuses, and alerts with a WARNING');
$replica->{stderr} = '';
my $standby_log = slurp_file($standby->logfile);
like($standby_log, qr/WARNING:  pgphi alert \(decrypt_limit\)/, 'the WARNING is in the standby\'s server log');
is($replica->query_safe('SELECT 1'), '1', 'the standby session carries on');

$_->quit for ($listener, $s1, $s2, $ro, $doc, $replica);
done_testing();
