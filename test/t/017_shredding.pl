# Crypto-shredding leaves no copy of the wrapped DEK in the cluster's tables.
#
# A key version gets several tuple versions of its catalog row (create,
# rotate, two rewraps with a VACUUM between them, so that some copies were
# pruned into the pages' free space, retirement), then is destroyed. After a
# CHECKPOINT, the files of pgphi.key_versions (every fork and segment), of its
# TOAST table and indexes, and of pg_statistic (and its TOAST table and
# indexes) are searched for every wrapped DEK the version ever had, on the
# primary, on a streaming standby, on a logical replication subscriber of the
# key catalog and after crash recovery: none is found. The same search finds
# them before the destruction (so it would have caught the finding) and finds
# the live version's DEK afterwards (so it can find what is there). Values
# under the destroyed version fail with 55000 on both.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $primary = PgphiTest::new_node('primary', allows_streaming => 'logical');
$primary->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	CREATE ROLE a1 LOGIN; GRANT pgphi_key_auditor TO a1;
	SELECT pgphi.create_key('shred');
	SELECT pgphi.create_key('bystander');
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted);
	INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'shred') FROM generate_series(1, 200) i;
});
$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->append_conf('postgresql.conf', PgphiTest::log_settings());
chmod 0600, $standby->data_dir . '/pgphi_local.kek';
$standby->start;
# A logical replication subscriber of the key catalog: it applies every
# change of the version's row, and the destruction, under
# session_replication_role = replica.
$primary->safe_psql('postgres', 'CREATE PUBLICATION keys FOR TABLE pgphi.keys, pgphi.key_versions');
my $subscriber = PgphiTest::new_node('subscriber');
$subscriber->safe_psql('postgres', 'CREATE EXTENSION pgphi');
(my $connstr = $primary->connstr('postgres')) =~ s/'/''/g;
$subscriber->safe_psql('postgres', "CREATE SUBSCRIPTION keys CONNECTION '$connstr' PUBLICATION keys");
$subscriber->wait_for_subscription_sync($primary, 'keys');

# Every wrapped DEK version 1 of "shred" ever had, as raw bytes.
my %historic;
my $v1_dek = q{SELECT encode(v.wrapped_dek, 'hex') FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'shred' AND v.version = 1};
sub remember
{
	my $hex = $primary->safe_psql('postgres', $v1_dek);
	$historic{$hex} = pack('H*', $hex) if $hex ne '';
}
remember();
my $old_value = $primary->safe_psql('postgres', 'SELECT ssn FROM patients WHERE id = 1');

$primary->safe_psql('postgres', q{SELECT pgphi.rotate_key('shred')});
$primary->safe_psql('postgres', q{SELECT pgphi.rewrap_keys('shred')});
remember();
# Pruned: the tuples' line pointers are freed, their bytes left in free space.
$primary->safe_psql('postgres', 'VACUUM pgphi.key_versions');
$primary->safe_psql('postgres', q{SELECT pgphi.rewrap_keys('shred')});
remember();
$primary->safe_psql('postgres', q{SELECT pgphi.rewrap_keys()});
remember();
$primary->safe_psql('postgres', q{CALL pgphi.reencrypt('patients', 'ssn')});
$primary->safe_psql('postgres', q{SELECT pgphi.retire_key_version('shred', 1)});
# Statistics never sample the wrapped DEKs.
$primary->safe_psql('postgres', 'ANALYZE pgphi.key_versions');
is(scalar(keys %historic), 4, 'version 1 had four different wrapped DEKs');

# The files that may hold a wrapped DEK: the catalog table, its TOAST table
# and every index of either, and the same for pg_statistic.
my $files_query = q{
	WITH RECURSIVE base(oid) AS (VALUES ('pgphi.key_versions'::regclass::oid), ('pg_catalog.pg_statistic'::regclass::oid)),
	rels(oid) AS (
	    SELECT oid FROM base
	    UNION SELECT c.reltoastrelid FROM pg_class c JOIN base b ON b.oid = c.oid WHERE c.reltoastrelid <> 0
	    UNION SELECT i.indexrelid FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
	       WHERE c.oid IN (SELECT oid FROM base) OR c.oid IN (SELECT reltoastrelid FROM pg_class WHERE oid IN (SELECT oid FROM base)))
	SELECT string_agg(c.relname || '=' || pg_relation_filepath(c.oid), ' ' ORDER BY c.relname) FROM rels r JOIN pg_class c ON c.oid = r.oid};

# Names of the relation files (all forks and segments) holding any of the
# needles, and how many files were searched.
sub search_files
{
	my ($node, @needles) = @_;
	return search_db_files($node, 'postgres', @needles);
}

sub search_db_files
{
	my ($node, $db, @needles) = @_;
	my $list = $node->safe_psql($db, $files_query);
	my (@found, $searched);
	for my $entry (split / /, $list)
	{
		my ($rel, $path) = split /=/, $entry, 2;
		for my $file (glob($node->data_dir . "/$path*"))
		{
			$searched++;
			my $content = slurp_file($file);
			for my $needle (@needles)
			{
				push @found, "$rel:" . substr($file, length($node->data_dir) + 1) if index($content, $needle) >= 0;
			}
		}
	}
	return (\@found, $searched);
}

$primary->safe_psql('postgres', 'CHECKPOINT');
my ($found, $searched) = search_files($primary, values %historic);
ok(scalar(@$found) >= 2, "before destruction the old wrapped DEKs are on disk") or diag("found: @$found");
note("before destruction: @$found");

# A snapshot taken before the destruction keeps the row's old version
# visible (so VACUUM could not remove it, even if it ran).
my $old_snapshot = $primary->background_psql('postgres');
$old_snapshot->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ');
my $seen_before = $old_snapshot->query_safe($v1_dek);
ok(exists $historic{$seen_before}, 'an open snapshot reads the wrapped DEK before the destruction');

# Destruction by two custodians.
$primary->safe_psql('postgres', q{
	SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_destroy('shred', 1); RESET SESSION AUTHORIZATION;
	SET SESSION AUTHORIZATION c2; SELECT pgphi.approve_destroy('shred', 1); SELECT pgphi.destroy_key('shred', 1);
});
$primary->safe_psql('postgres', 'CHECKPOINT');
($found, $searched) = search_files($primary, values %historic);
is_deeply($found, [], "after destroy_key and a CHECKPOINT no wrapped DEK of the version is in $searched files");
is($old_snapshot->query_safe($v1_dek), '00' x length($historic{$seen_before}),
	'the snapshot taken before the destruction now reads zeros of the same length');
$old_snapshot->query_safe('COMMIT');
$old_snapshot->quit;
my $live = pack('H*', $primary->safe_psql('postgres', q{SELECT encode(v.wrapped_dek, 'hex')
	FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id) WHERE k.name = 'shred' AND v.version = 2}));
($found) = search_files($primary, $live);
ok(scalar(@$found) >= 1, 'the search finds the live version\'s wrapped DEK');
is($primary->safe_psql('postgres', q{SELECT count(*) FROM pg_statistic s JOIN pg_attribute a
	ON a.attrelid = s.starelid AND a.attnum = s.staattnum
	WHERE s.starelid = 'pgphi.key_versions'::regclass AND a.attname = 'wrapped_dek'}), '0',
	'pg_statistic holds no statistics of wrapped_dek');
is($primary->safe_psql('postgres', q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn) = 'ssn-' || id}),
	'200', 'values under the live version decrypt');
like(PgphiTest::psql_error($primary, 'postgres', "SELECT pgphi.decrypt_phi('$old_value'::pgphi.encrypted)"),
	qr/55000: pgphi key "shred" version 1 has been destroyed/, 'a value under the destroyed version fails with 55000');

# The standby replayed the same pages.
$primary->wait_for_catchup($standby);
$standby->safe_psql('postgres', 'CHECKPOINT');
($found, $searched) = search_files($standby, values %historic);
is_deeply($found, [], "on the standby, after the restartpoint, no wrapped DEK of the version is in $searched files");
($found) = search_files($standby, $live);
ok(scalar(@$found) >= 1, 'the standby search finds the live version\'s wrapped DEK');
like(PgphiTest::psql_error($standby, 'postgres', "SELECT pgphi.decrypt_phi('$old_value'::pgphi.encrypted)"),
	qr/55000: pgphi key "shred" version 1 has been destroyed/, 'the standby refuses it too');
is($standby->safe_psql('postgres', q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn) = 'ssn-' || id}),
	'200', 'and decrypts the live version');

# The destruction certificate (docs/key-lifecycle.md), as an auditor reads
# it: the version, both custodians, the check that no value was left, the
# records' place in the chain. The standby, which replayed the records,
# issues the same document, and both verify it.
my $certificate = $primary->safe_psql('postgres', q{SET ROLE a1; SELECT pgphi.destruction_certificate('shred', 1)});
(my $quoted = $certificate) =~ s/'/''/g;
is($primary->safe_psql('postgres', qq{SELECT c->>'key', c->'version', c->'approved_by', c->>'destroyed_by',
	c->'no_value_remained', c->'check_at_destruction'->'values_found',
	c->'check_at_destruction'->'columns_not_scanned'
	FROM (SELECT '$quoted'::jsonb AS c) s}), 'shred|1|["c1", "c2"]|c2|true|0|0',
	'the certificate names the version, both approvers, and no value left');
is($primary->safe_psql('postgres', qq{SELECT string_agg(r->>'action' || ' ' || (a.row_hash = decode(r->>'row_hash', 'hex')),
	', ' ORDER BY (r->>'seq')::bigint) FROM jsonb_array_elements('$quoted'::jsonb->'audit_records') r
	JOIN pgphi.audit_log a ON a.seq = (r->>'seq')::bigint}),
	'retire true, approve_destroy true, approve_destroy true, destroy true',
	'it cites the records at their place in the hash chain');
is($standby->safe_psql('postgres', q{SET ROLE a1; SELECT pgphi.destruction_certificate('shred', 1)}), $certificate,
	'the standby issues the same certificate');
is($standby->safe_psql('postgres', qq{SET ROLE a1; SELECT pgphi.verify_destruction_certificate('$quoted')}), 't',
	'the standby verifies it');
(my $forged = $quoted) =~ s/"c1"/"c3"/;
is($primary->safe_psql('postgres', qq{SET ROLE a1; SELECT pgphi.verify_destruction_certificate('$quoted'),
	pgphi.verify_destruction_certificate('$forged')}), 't|f', 'the primary verifies it, and not a changed copy');
like(PgphiTest::psql_error($standby, 'postgres', q{SELECT pgphi.destruction_certificate('shred', 2)}),
	qr/55000: pgphi key "shred" version 2 has not been destroyed/, 'the standby refuses a live version');

# The subscriber erased its copies when it applied the destruction.
$primary->wait_for_catchup('keys');
is($subscriber->safe_psql('postgres', q{SELECT v.state FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'shred' AND v.version = 1}), 'destroyed', 'the subscriber applied the destruction');
$subscriber->safe_psql('postgres', 'CHECKPOINT');
($found, $searched) = search_files($subscriber, values %historic);
is_deeply($found, [], "on the logical subscriber no wrapped DEK of the version is in $searched files");
($found) = search_files($subscriber, $live);
ok(scalar(@$found) >= 1, 'the subscriber search finds the live version\'s wrapped DEK');
like(PgphiTest::psql_error($subscriber, 'postgres', q{SET session_replication_role = replica;
	UPDATE pgphi.key_versions v SET state = 'retired', wrapped_dek = '\x00' FROM pgphi.keys k
	 WHERE k.key_id = v.key_id AND k.name = 'shred' AND v.version = 1}),
	qr/55000: pgphi key "shred" version 1 has been destroyed/, 'the subscriber keeps it destroyed');
# Its replication slot would hold back the removal of dead catalog rows
# (pg_statistic's, below) in every database of the publisher.
$subscriber->safe_psql('postgres', 'DROP SUBSCRIPTION keys');
$subscriber->stop;

# A crash after the destruction: recovery replays the same zeroed pages.
$primary->stop('immediate');
$primary->start;
$primary->safe_psql('postgres', 'CHECKPOINT');
($found, $searched) = search_files($primary, values %historic);
is_deeply($found, [], 'after crash recovery no wrapped DEK of the version is on disk');

# A version destroyed by a superuser's direct UPDATE is erased the same way.
my $bystander = pack('H*', $primary->safe_psql('postgres', q{SELECT encode(v.wrapped_dek, 'hex')
	FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id) WHERE k.name = 'bystander' AND v.version = 1}));
$primary->safe_psql('postgres', q{UPDATE pgphi.key_versions v SET state = 'destroyed', wrapped_dek = NULL,
	destroyed_at = now() FROM pgphi.keys k WHERE k.key_id = v.key_id AND k.name = 'bystander'});
$primary->safe_psql('postgres', 'CHECKPOINT');
($found) = search_files($primary, $bystander);
is_deeply($found, [], 'a version destroyed by direct DML leaves no wrapped DEK on disk either');

# A database that destroyed versions under 0.2.0 (which left their wrapped
# DEKs in dead tuples, and let ANALYZE put them into pg_statistic): the update
# to 0.3.0 erases them from the key catalog's files when it commits;
# pg_statistic's dead tuples go with VACUUM FULL, as docs/rotation-runbook.md says.
$primary->safe_psql('postgres', 'CREATE DATABASE old_release');
$primary->safe_psql('old_release', q{
	CREATE EXTENSION pgphi VERSION '0.2.0';
	CREATE ROLE c3 LOGIN; CREATE ROLE c4 LOGIN; GRANT pgphi_key_custodian TO c3, c4;
	SELECT pgphi.create_key('old');
	SELECT pgphi.rotate_key('old');
	SELECT pgphi.rewrap_keys('old');
	SELECT pgphi.rotate_key('old');
	ANALYZE pgphi.key_versions;
});
my %old_deks;
for my $version (1, 2)
{
	my $hex = $primary->safe_psql('old_release', qq{SELECT encode(v.wrapped_dek, 'hex') FROM pgphi.key_versions v
		JOIN pgphi.keys k USING (key_id) WHERE k.name = 'old' AND v.version = $version});
	$old_deks{$hex} = pack('H*', $hex);
}
$primary->safe_psql('old_release', q{
	SET SESSION AUTHORIZATION c3; SELECT pgphi.approve_destroy('old', 1), pgphi.approve_destroy('old', 2);
	RESET SESSION AUTHORIZATION; SET SESSION AUTHORIZATION c4;
	SELECT pgphi.approve_destroy('old', 1), pgphi.approve_destroy('old', 2);
	SELECT pgphi.destroy_key('old', 1), pgphi.destroy_key('old', 2);
});
$primary->safe_psql('old_release', 'CHECKPOINT');
($found) = search_db_files($primary, 'old_release', values %old_deks);
ok(scalar(grep { /^key_versions:/ } @$found) >= 1, '0.2.0 left destroyed wrapped DEKs in the key catalog\'s files');
ok(scalar(grep { /^pg_statistic/ } @$found) >= 1, '... and ANALYZE put them into pg_statistic');
$primary->safe_psql('old_release', 'ALTER EXTENSION pgphi UPDATE');
$primary->safe_psql('old_release', 'CHECKPOINT');
($found) = search_db_files($primary, 'old_release', values %old_deks);
is_deeply([ grep { !/^pg_statistic/ } @$found ], [], 'after ALTER EXTENSION pgphi UPDATE the key catalog\'s files hold none');
$primary->safe_psql('old_release', 'VACUUM FULL pg_catalog.pg_statistic');
$primary->safe_psql('old_release', 'CHECKPOINT');
($found) = search_db_files($primary, 'old_release', values %old_deks);
is_deeply($found, [], 'after VACUUM FULL pg_catalog.pg_statistic neither does pg_statistic');

$standby->stop;
$primary->stop;
done_testing();
