# Audit events under a flood and under a full worker pool, and the chain's
# anchors outside the database.
#
# - Two sessions make tens of thousands of refused decrypts, and a third as
#   many tamper failures, at once: every one is counted in audit_log (the sum
#   of occurrences equals what the sessions counted), in a few coalesced
#   rows, and the server log grows by a small, bounded amount.
# - With every background worker slot taken (max_worker_processes = 3: the
#   key broker and two sleeping parallel workers), refusals keep waiting in
#   shared memory instead of being dropped after some broker loops; more
#   distinct events than the queue holds are kept as overflow counts; once
#   the slots are free, every refusal is in audit_log.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;

my $node = PgphiTest::new_node('audit_events');
$node->append_conf('postgresql.conf', <<'CONF');
max_worker_processes = 3
max_parallel_workers = 2
max_logical_replication_workers = 0
CONF
$node->restart;

$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE snoop1 LOGIN;
	CREATE ROLE snoop2 LOGIN;
	CREATE ROLE tamperer LOGIN;
	GRANT pgphi_decrypt, pgphi_encrypt TO snoop1, snoop2, tamperer;
	SELECT pgphi.create_key('k');
	SELECT pgphi.grant_decrypt('k', 'tamperer');
	CREATE TABLE vals AS SELECT pgphi.encrypt_phi('secret value', 'k') AS v;
	-- The same value with its last tag bit flipped: fails authentication.
	CREATE TABLE tampered AS SELECT set_byte(v::bytea, length(v::bytea) - 1,
	    get_byte(v::bytea, length(v::bytea) - 1) # 1)::pgphi.encrypted AS v FROM vals;
	GRANT SELECT ON vals, tampered TO PUBLIC;
	-- 1 for a refusal, 2 for a failed authentication; caught, so PostgreSQL
	-- logs none of them (only pgphi's own log lines are measured).
	CREATE FUNCTION public.attempt_decrypt(v pgphi.encrypted) RETURNS int LANGUAGE plpgsql AS $$
	BEGIN
	    PERFORM pgphi.decrypt_phi(v);
	    RETURN 0;
	EXCEPTION WHEN insufficient_privilege THEN RETURN 1;
	          WHEN data_corrupted THEN RETURN 2;
	END $$;
	CREATE FUNCTION public.attempt_encrypt(key_name text) RETURNS int LANGUAGE plpgsql AS $$
	BEGIN
	    PERFORM pgphi.encrypt_phi('x', key_name);
	    RETURN 0;
	EXCEPTION WHEN insufficient_privilege THEN RETURN 1;
	END $$;
});

sub queue_empty
{
	return $node->poll_query_until('postgres', q{SELECT queued_events = 0 FROM pgphi.audit_queue_status()});
}

# The sum of occurrences of the refusals and failures recorded for a role.
sub recorded
{
	my ($role, $outcome, $extra) = @_;
	$extra //= '';
	return $node->safe_psql('postgres', qq{SELECT coalesce(sum(occurrences), 0) FROM pgphi.audit_log
		WHERE acting_role = '$role' AND outcome = '$outcome' $extra});
}

# --- A flood from two sessions, and tamper failures ---------------------------

my $per_session = 25_000;
my $log_before = -s $node->logfile;
my @runs;
for my $job ([ 'snoop1', "SELECT sum(attempt_decrypt(v)) FROM vals, generate_series(1, $per_session)" ],
	[ 'snoop2', "SELECT sum(attempt_decrypt(v)) FROM vals, generate_series(1, $per_session)" ],
	[ 'tamperer', "SELECT sum(attempt_decrypt(v)) / 2 FROM tampered, generate_series(1, $per_session)" ])
{
	my ($role, $sql) = @$job;
	my %run = (role => $role, out => '', err => '');
	$run{h} = IPC::Run::start([ 'psql', '-XAtq', '-d', $node->connstr('postgres') . " user=$role", '-c', $sql ],
		'>', \$run{out}, '2>', \$run{err});
	push @runs, \%run;
}
my %made;
for my $run (@runs)
{
	$run->{h}->finish;
	chomp(my $n = $run->{out});
	$made{ $run->{role} } = $n;
	is($n, $per_session, "$run->{role}: $per_session attempts, each refused or failed")
	  or diag($run->{err});
}
ok(queue_empty(), 'the audit queue drains');
is(recorded('snoop1', 'refused'), $made{snoop1}, 'every refused decrypt of session 1 is counted in audit_log');
is(recorded('snoop2', 'refused'), $made{snoop2}, 'every refused decrypt of session 2 is counted in audit_log');
is(recorded('tamperer', 'failed', q{AND detail = 'ciphertext failed authentication'}), $made{tamperer},
	'every tamper failure is counted in audit_log');
my $rows = $node->safe_psql('postgres',
	q{SELECT count(*) FROM pgphi.audit_log WHERE acting_role IN ('snoop1', 'snoop2', 'tamperer')});
cmp_ok($rows, '<', 500, "identical events coalesce: @{[ 3 * $per_session ]} events in $rows rows");
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log
	WHERE acting_role IN ('snoop1', 'snoop2', 'tamperer')
	  AND NOT (first_at <= last_at AND logged_at = first_at AND occurrences >= 1)}), '0',
	'each coalesced row has its count and its first and last time');
is($node->safe_psql('postgres', q{SELECT dropped_events, overflow_events FROM pgphi.audit_queue_status()}), '0|0',
	'nothing dropped, nothing overflowed');
my $log_growth = (-s $node->logfile) - $log_before;
cmp_ok($log_growth, '<', 16_384, "the server log grew by $log_growth bytes for @{[ 3 * $per_session ]} events");
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'the chain verifies');

# --- No free worker slot: refusals wait, and none is lost -----------------------

$node->safe_psql('postgres', q{
	SELECT pgphi.create_key('many_' || g) FROM generate_series(1, 300) g;
	CREATE TABLE filler (id int, pad text) WITH (fillfactor = 10);
	INSERT INTO filler SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 400) g;
	ANALYZE filler;
	CREATE FUNCTION public.slow(int) RETURNS boolean LANGUAGE plpgsql PARALLEL SAFE AS $$
	BEGIN PERFORM pg_sleep(0.5); RETURN true; END $$;
});
my ($fill_out, $fill_err) = ('', '');
my $filler = IPC::Run::start([ 'psql', '-XAtq', '-d', $node->connstr('postgres'), '-c', q{
	SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
	SET max_parallel_workers_per_gather = 2; SET parallel_leader_participation = off;
	SET application_name = 'filler';
	SELECT count(*) FROM filler WHERE slow(id);} ], '>', \$fill_out, '2>', \$fill_err);
ok($node->poll_query_until('postgres',
	q{SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'parallel worker'}),
	'two sleeping parallel workers take the last worker slots');

my $seq_before = $node->safe_psql('postgres', q{SELECT max(seq) FROM pgphi.audit_log});
$log_before = -s $node->logfile;
my $identical = $node->safe_psql('postgres', q{SELECT sum(attempt_decrypt(v)) FROM vals, generate_series(1, 100)},
	extra_params => [ '-U', 'snoop1' ]);
my $distinct = $node->safe_psql('postgres', q{SELECT sum(attempt_encrypt('many_' || g))
	FROM generate_series(1, 300) g, generate_series(1, 2)}, extra_params => [ '-U', 'snoop1' ]);
is("$identical/$distinct", '100/600', '700 refusals made while no worker slot is free');
my $warned = $node->wait_for_log(qr/could not start an audit writer for database \d+: no background worker slot/,
	$log_before);
ok($warned, 'the broker warns that no worker slot is free');
ok($node->safe_psql('postgres', q{SELECT queued_events > 0 AND overflow_events > 0 FROM pgphi.audit_queue_status()})
	  eq 't', 'the events wait in shared memory, the distinct ones beyond the queue as overflow counts');
# Longer than 20 broker loops (the old code dropped the events after those).
sleep 25;
is($node->safe_psql('postgres', q{SELECT dropped_events FROM pgphi.audit_queue_status()}), '0',
	'nothing was dropped while the pool was full');
$node->safe_psql('postgres', q{SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'filler'});
$filler->finish;
ok(queue_empty(), 'once the slots are free, the queue drains');
is(recorded('snoop1', 'refused', qq{AND action = 'decrypt' AND seq > $seq_before}), 100, 'all 100 refused decrypts made while the pool was full are in audit_log');
is(recorded('snoop1', 'refused', qq{AND action = 'encrypt' AND seq > $seq_before}), 600,
	'all 600 refused encrypts under 300 keys are counted, the queue\'s overflow included');
cmp_ok($node->safe_psql('postgres', q{SELECT sum(occurrences) FROM pgphi.audit_log
	WHERE action = 'encrypt' AND key_id IS NULL AND detail LIKE 'the audit queue was full%'}), '>', 0,
	'beyond the queue, events are kept as counts per role and action');
my $log = slurp_file($node->logfile, $log_before);
my $warnings = () = $log =~ /no background worker slot is free/g;
cmp_ok($warnings, '<=', 2, "the full pool was reported $warnings time(s), not at every retry");
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'the chain verifies');

# --- Anchors: the chain's head authenticated outside the database ---------------

# Scheduled: a changed chain is anchored within the interval, and the anchor
# is in the server log for a SIEM.
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.audit_anchor_interval = '2s'});
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('anchored_key')});
ok($node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_anchors
	WHERE audit_seq = (SELECT max(seq) FROM pgphi.audit_log))}),
	'a changed chain is anchored on schedule');
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.audit_anchor_interval = 0});
PgphiTest::reload_broker($node);

$node->safe_psql('postgres', q{
	CREATE ROLE auditor LOGIN IN ROLE pgphi_key_auditor;
	SELECT pgphi.create_key('on_demand_key');
});
my $anchor = $node->safe_psql('postgres', q{SELECT anchor_seq || ' ' || audit_seq || ' ' || mac
	FROM pgphi.anchor_audit_log()}, extra_params => [ '-U', 'auditor' ]);
like($anchor, qr/^\d+ \d+ local:v1:[0-9a-f]{64}$/, "an auditor anchors the head on demand: $anchor");
is($node->safe_psql('postgres', q{SELECT audit_seq = (SELECT max(seq) FROM pgphi.audit_log)
	FROM pgphi.audit_anchors ORDER BY anchor_seq DESC LIMIT 1}), 't', 'the anchor covers the head');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.anchor_audit_log() a
	JOIN pgphi.audit_anchors s USING (anchor_seq)}, extra_params => [ '-U', 'auditor' ]), '1',
	'anchoring an anchored head again makes no new anchor');

my $log_text = slurp_file($node->logfile);
my $anchors = $node->safe_psql('postgres', q{SELECT anchor_seq, audit_seq, encode(audit_hash, 'hex'), mac
	FROM pgphi.audit_anchors ORDER BY anchor_seq});
my $in_log = 0;
my @anchor_rows = split /\n/, $anchors;
for my $row (@anchor_rows)
{
	my ($n, $seq, $hash, $mac) = split /\|/, $row;
	$in_log++ if $log_text =~ /LOG:  pgphi audit anchor: database "postgres" anchor $n at [^:]+:[^:]+:[^:]+: row $seq, head $hash, mac \Q$mac\E \(provider local, key default\)/;
}
is($in_log, scalar(@anchor_rows), "each of the @{[ scalar @anchor_rows ]} anchors is in the server log");
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}, extra_params => [ '-U', 'auditor' ]),
	't', 'the auditor verifies chain and anchors');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_anchors WHERE mac NOT LIKE 'local:v1:%'}), '0',
	'every anchor carries a MAC of the local provider');
unlike($log_text, qr/secret value/, 'no plaintext in the server log');

# A superuser who turns the guards off: every change to what an anchor covers
# is found by verify_audit_log(), with no head hash recorded by hand.
$node->safe_psql('postgres', q{
	CREATE TABLE saved_log AS SELECT * FROM pgphi.audit_log;
	CREATE TABLE saved_anchors AS SELECT * FROM pgphi.audit_anchors;
});
# (A superuser tampering must first switch off the DDL guard too.)
my $guards_off = q{
	ALTER EVENT TRIGGER pgphi_guard_catalog_ddl DISABLE;
	ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_chain;
	ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_no_change;
	ALTER TABLE pgphi.audit_log DISABLE TRIGGER audit_log_no_truncate;
	ALTER TABLE pgphi.audit_anchors DISABLE TRIGGER audit_anchors_no_change;
	ALTER TABLE pgphi.audit_anchors DISABLE TRIGGER audit_anchors_no_truncate;
};
my $guards_on = q{
	ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
	ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_no_change;
	ALTER TABLE pgphi.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
	ALTER TABLE pgphi.audit_anchors ENABLE ALWAYS TRIGGER audit_anchors_no_change;
	ALTER TABLE pgphi.audit_anchors ENABLE ALWAYS TRIGGER audit_anchors_no_truncate;
	ALTER EVENT TRIGGER pgphi_guard_catalog_ddl ENABLE ALWAYS;
};
my $restore = q{
	DELETE FROM pgphi.audit_log;
	INSERT INTO pgphi.audit_log SELECT * FROM saved_log;
	DELETE FROM pgphi.audit_anchors;
	INSERT INTO pgphi.audit_anchors SELECT * FROM saved_anchors;
};
# Recomputes every row's hashes, as a forger would after changing rows.
my $rehash = q{
	DO $$
	DECLARE r pgphi.audit_log; prev bytea := '\x';
	BEGIN
	    FOR r IN SELECT * FROM pgphi.audit_log ORDER BY seq LOOP
	        r.prev_hash := prev;
	        r.row_hash := pgphi._audit_row_hash(prev, r);
	        UPDATE pgphi.audit_log SET prev_hash = r.prev_hash, row_hash = r.row_hash WHERE seq = r.seq;
	        prev := r.row_hash;
	    END LOOP;
	END $$;
};
my $anchored_seq = $node->safe_psql('postgres', q{SELECT max(audit_seq) FROM pgphi.audit_anchors});
my $first_anchored = $node->safe_psql('postgres', q{SELECT min(audit_seq) FROM pgphi.audit_anchors});
my $last_anchor = $node->safe_psql('postgres', q{SELECT max(anchor_seq) FROM pgphi.audit_anchors});

sub after_tampering
{
	my ($what, $sql, $expected) = @_;
	my $result = $node->safe_psql('postgres', "$guards_off $sql;
		SELECT CASE WHEN intact THEN 't' ELSE 'f' END || ' ' || coalesce(first_bad_seq::text, '-') || ' ' || problem FROM pgphi.verify_audit_log();");
	$node->safe_psql('postgres', "$restore $guards_on");
	like($result, $expected, "$what: $result");
	is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', "$what: restored, intact");
}

after_tampering('the last anchored rows cut off',
	"DELETE FROM pgphi.audit_log WHERE seq > $anchored_seq - 3",
	qr/^f @{[ $anchored_seq - 2 ]} row \d+ was anchored \(anchor \d+\) but the chain ends at row @{[ $anchored_seq - 3 ]}: rows were removed from its end$/);
after_tampering('TRUNCATE', 'TRUNCATE pgphi.audit_log',
	qr/^f 1 row $first_anchored was anchored \(anchor 1\) but the chain ends at row 0: rows were removed/);
after_tampering('an anchored row edited and the whole chain re-hashed',
	"UPDATE pgphi.audit_log SET acting_role = 'someone_else' WHERE seq = 2; $rehash",
	qr/^f $first_anchored row $first_anchored does not match anchor 1: the chain up to it was rewritten$/);
after_tampering('a forged row inserted among anchored ones, renumbered and re-hashed',
	"UPDATE pgphi.audit_log SET seq = -(seq + 1) WHERE seq >= 3;
	 UPDATE pgphi.audit_log SET seq = -seq WHERE seq < 0;
	 INSERT INTO pgphi.audit_log (seq, logged_at, login_role, acting_role, action, outcome, prev_hash, row_hash)
	     VALUES (3, now(), 'postgres', 'postgres', 'grant_decrypt', 'ok', '', '');
	 $rehash",
	qr/^f \d+ row \d+ does not match anchor \d+: the chain up to it was rewritten$/);
after_tampering('a row removed among anchored ones and the chain re-hashed',
	"DELETE FROM pgphi.audit_log WHERE seq = 2;
	 UPDATE pgphi.audit_log SET seq = seq - 1 WHERE seq > 2;
	 $rehash",
	qr/^f \d+ row \d+ does not match anchor 1: the chain up to it was rewritten$/);
after_tampering('re-hashed and re-anchored with a made-up MAC',
	"UPDATE pgphi.audit_log SET acting_role = 'someone_else' WHERE seq = 2; $rehash;
	 UPDATE pgphi.audit_anchors a SET audit_hash = l.row_hash FROM pgphi.audit_log l WHERE l.seq = a.audit_seq;",
	qr/^f - audit anchor 1 is not authentic: the key manager does not vouch for its MAC$/);
after_tampering('the last anchor removed', "DELETE FROM pgphi.audit_anchors WHERE anchor_seq = $last_anchor",
	qr/^f - audit anchors $last_anchor to $last_anchor were made by this server and are missing: anchors were removed$/);
after_tampering('the first anchor removed', 'DELETE FROM pgphi.audit_anchors WHERE anchor_seq = 1',
	qr/^f - audit anchor 1 is missing: anchors were removed$/);

# Anchors removed and remade over a rewritten chain: the broker refuses.
my $stderr = PgphiTest::psql_error($node, 'postgres', "$guards_off
	DELETE FROM pgphi.audit_anchors;
	SELECT pgphi.anchor_audit_log();");
$node->safe_psql('postgres', "$restore $guards_on");
like($stderr, qr/XX001: pgphi refuses to make audit anchor 1: this server already anchored up to anchor $last_anchor/,
	'anchors cannot be remade from the start (XX001)');
like(PgphiTest::psql_error($node, 'postgres', q{DELETE FROM pgphi.audit_anchors}),
	qr/42501: pgphi.audit_anchors is append-only/, 'the anchors are append-only (42501)');
like(PgphiTest::psql_error($node, 'postgres', q{TRUNCATE pgphi.audit_anchors}),
	qr/42501: pgphi.audit_anchors is append-only/, 'also for TRUNCATE');
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'all restored: intact');

# An anchor whose transaction rolls back never counts: it is made again, and
# nothing is reported missing. What committed survives a restart.
$node->safe_psql('postgres', q{SELECT pgphi.create_key('rolled_back_anchor')});
my $before_rollback = $node->safe_psql('postgres', q{SELECT max(anchor_seq) FROM pgphi.audit_anchors});
$node->safe_psql('postgres', q{BEGIN; SELECT pgphi.anchor_audit_log(); ROLLBACK;
	BEGIN; SAVEPOINT s; SELECT pgphi.anchor_audit_log(); ROLLBACK TO s; COMMIT;});
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't',
	'anchors rolled back (a transaction, a savepoint) are not reported missing');
is($node->safe_psql('postgres', q{SELECT anchor_seq FROM pgphi.anchor_audit_log()}), $before_rollback + 1,
	'and the next anchor takes their number');
$node->restart;
$last_anchor = $node->safe_psql('postgres', q{SELECT max(anchor_seq) FROM pgphi.audit_anchors});
$node->safe_psql('postgres', q{
	DROP TABLE saved_log, saved_anchors;
	CREATE TABLE saved_log AS SELECT * FROM pgphi.audit_log;
	CREATE TABLE saved_anchors AS SELECT * FROM pgphi.audit_anchors;
});
ok($node->poll_query_until('postgres', q{SELECT pgphi._audit_anchor_last_known() IS NOT NULL}),
	'after a restart the broker has read back the last committed anchor');
after_tampering('the last anchor removed, after a restart',
	"DELETE FROM pgphi.audit_anchors WHERE anchor_seq = $last_anchor",
	qr/^f - audit anchors $last_anchor to $last_anchor were made by this server and are missing/);
like(PgphiTest::psql_error($node, 'postgres', "$guards_off
	DELETE FROM pgphi.audit_anchors WHERE anchor_seq = $last_anchor;
	SELECT pgphi.anchor_audit_log();"),
	qr/XX001: pgphi refuses to make audit anchor $last_anchor: this server already anchored up to anchor $last_anchor/,
	'and the last anchor cannot be redone after a restart either');
$node->safe_psql('postgres', "$restore $guards_on");

# Vault Transit anchors (hmac and verify), at the emulator; anchors of both
# providers verify side by side, each with the key manager that made it.
my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
$node->append_conf('postgresql.conf', $emulator->postgres_settings . <<CONF);
pgphi.audit_anchor_provider = 'vault'
pgphi.audit_anchor_key = '$emulator->{vault_key}'
CONF
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('vault_anchored')});
my $vault_anchor = $node->safe_psql('postgres', q{SELECT mac FROM pgphi.anchor_audit_log()});
like($vault_anchor, qr/^vault:v1:[A-Za-z0-9+\/=]+$/, "a Vault Transit HMAC anchors the head: $vault_anchor");
is($node->safe_psql('postgres', q{SELECT string_agg(DISTINCT provider, ',' ORDER BY provider) FROM pgphi.audit_anchors}),
	'local,vault', 'anchors of both providers');
$emulator->reset_stats;
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't',
	'verify_audit_log checks the Vault anchor at Vault');
like(join(',', sort keys %{ $emulator->stats->{vault} // {} }), qr/verify/, 'Vault was asked to verify');
$node->safe_psql('postgres', q{
	DROP TABLE saved_log, saved_anchors;
	CREATE TABLE saved_log AS SELECT * FROM pgphi.audit_log;
	CREATE TABLE saved_anchors AS SELECT * FROM pgphi.audit_anchors;
});
after_tampering('a Vault anchor\'s MAC replaced by another well-formed one',
	"UPDATE pgphi.audit_anchors SET mac = 'vault:v1:' || encode(sha256(mac::bytea), 'base64')
	  WHERE provider = 'vault'",
	qr/^f - audit anchor \d+ is not authentic: the key manager does not vouch for its MAC$/);
after_tampering('a local anchor relabelled as a Vault one',
	"UPDATE pgphi.audit_anchors SET provider = 'vault', key_ref = '$emulator->{vault_key}' WHERE anchor_seq = 1",
	qr/^f - audit anchor 1 is not authentic/);
$emulator->fault(mode => 'internal_error', target => 'vault');
like(PgphiTest::psql_error($node, 'postgres', q{SELECT intact FROM pgphi.verify_audit_log()}),
	qr/08006: .*Vault/, 'with Vault down, verification fails with its error instead of guessing');
$emulator->clear_faults;

# AWS KMS anchors (GenerateMac and VerifyMac with an HMAC_256 key).
my $hmac_key = $emulator->control('POST', 'kms/keys', { key_spec => 'HMAC_256' })->{arn};
$node->safe_psql('postgres', qq{ALTER SYSTEM SET pgphi.audit_anchor_provider = 'aws_kms';
	ALTER SYSTEM SET pgphi.audit_anchor_key = '$hmac_key'});
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('kms_anchored')});
my $kms_anchor = $node->safe_psql('postgres', q{SELECT mac FROM pgphi.anchor_audit_log()});
like($kms_anchor, qr/^kms:HMAC_SHA_256:[A-Za-z0-9+\/=]+$/, "an AWS KMS HMAC key anchors the head: $kms_anchor");
$emulator->reset_stats;
is($node->safe_psql('postgres', q{SELECT intact FROM pgphi.verify_audit_log()}), 't',
	'verify_audit_log checks local, Vault and KMS anchors, each with its key manager');
ok($emulator->stats->{kms}{VerifyMac}, 'KMS was asked to VerifyMac');
$node->safe_psql('postgres', q{
	DROP TABLE saved_log, saved_anchors;
	CREATE TABLE saved_log AS SELECT * FROM pgphi.audit_log;
	CREATE TABLE saved_anchors AS SELECT * FROM pgphi.audit_anchors;
});
after_tampering('a KMS anchor\'s MAC replaced by another well-formed one',
	"UPDATE pgphi.audit_anchors SET mac = 'kms:HMAC_SHA_256:' || encode(sha256(mac::bytea), 'base64')
	  WHERE provider = 'aws_kms'",
	qr/^f - audit anchor \d+ is not authentic: the key manager does not vouch for its MAC$/);
$node->safe_psql('postgres', q{DROP TABLE saved_log, saved_anchors});
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.audit_anchor_key = '1234abcd-12ab-34cd-56ef-1234567890ab'});
PgphiTest::reload_broker($node);
$node->safe_psql('postgres', q{SELECT pgphi.create_key('kms_wrong_key')});
like(PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.anchor_audit_log()}),
	qr/InvalidKeyUsageException/, 'an encryption KMS key cannot anchor: KMS says so');

# A failing scheduled anchor holds back no event, and is logged once an hour.
$log_before = -s $node->logfile;
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.audit_anchor_interval = '1s'});
PgphiTest::reload_broker($node);
my $refused_before = recorded('snoop2', 'refused');
for my $i (1 .. 3)
{
	$node->safe_psql('postgres', qq{SELECT pgphi.create_key('scheduled_$i')});
	$node->psql('postgres', q{SELECT attempt_decrypt(v) FROM vals}, extra_params => [ '-U', 'snoop2' ]);
	sleep 2;
}
ok(queue_empty(), 'events keep being written while anchoring fails');
is(recorded('snoop2', 'refused'), $refused_before + 3, 'the refusals made meanwhile are in audit_log');
my $failures = () = slurp_file($node->logfile, $log_before) =~
  /LOG:  pgphi could not anchor the audit log of database \d+: AWS KMS InvalidKeyUsageException/g;
is($failures, 1, 'the failing scheduled anchor was logged once');
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.audit_anchor_interval = 0});
PgphiTest::reload_broker($node);

$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.audit_anchor_provider = 'local'; ALTER SYSTEM SET pgphi.audit_anchor_key = ''});
PgphiTest::reload_broker($node);

# Rows from before 0.3.0 keep verifying: a database made at 0.2.0, with
# events written one row each, then updated.
$node->safe_psql('postgres', q{CREATE DATABASE old_chain});
$node->safe_psql('old_chain', q{
	CREATE EXTENSION pgphi VERSION '0.2.0';
	SELECT pgphi.create_key('old_key');
	SELECT pgphi.rotate_key('old_key');
});
$node->psql('old_chain', q{SET ROLE snoop1; SELECT pgphi.encrypt_phi('x', 'old_key');});
ok($node->poll_query_until('old_chain', q{SELECT EXISTS (SELECT FROM pgphi.audit_log WHERE outcome = 'refused')}),
	'a 0.2.0 database gets its refusal');
$node->safe_psql('old_chain', q{ALTER EXTENSION pgphi UPDATE});
is($node->safe_psql('old_chain', q{SELECT intact || ' ' || (rows_checked >= 3) FROM pgphi.verify_audit_log()}), 'true true',
	'after the update its old rows verify');
$node->safe_psql('old_chain', q{SELECT pgphi.anchor_audit_log()});
$node->psql('old_chain', q{SET ROLE snoop1; SELECT pgphi.encrypt_phi('x', 'old_key');});
ok($node->poll_query_until('old_chain', q{SELECT count(*) = 2 FROM pgphi.audit_log WHERE outcome = 'refused'}),
	'a new refusal arrives');
is($node->safe_psql('old_chain', q{SELECT intact FROM pgphi.verify_audit_log()}), 't',
	'old and new rows, and the anchor, verify together');

done_testing();
