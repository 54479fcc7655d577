# The key lifecycle across sessions and on a standby (docs/key-lifecycle.md):
# a suspension by one custodian stops every open session's next statement,
# also inside a transaction block, stops a statement already running on the
# primary, and reaches a warm standby session; lifting it (two custodians)
# reaches them all again; a compromise mark reaches the standby; a
# time-limited grant stops working at its expiry in an open session, and
# inside a statement that crosses it.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $primary = PgphiTest::new_node('primary', allows_streaming => 1);
$primary->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	CREATE ROLE app LOGIN; GRANT pgphi_encrypt, pgphi_decrypt TO app;
	CREATE ROLE temp_reader LOGIN; GRANT pgphi_decrypt TO temp_reader;
	SELECT pgphi.create_key('lc');
	SELECT pgphi.grant_decrypt('lc', 'app'), pgphi.grant_encrypt('lc', 'app');
	CREATE TABLE t (id int PRIMARY KEY, v pgphi.encrypted);
	INSERT INTO t SELECT i, pgphi.encrypt_phi('value-' || i, 'lc') FROM generate_series(1, 2000) i;
	GRANT SELECT ON t TO app, temp_reader;
});
$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
chmod 0600, $standby->data_dir . '/pgphi_local.kek';
$standby->start;
$primary->wait_for_catchup($standby);

my $all = q{SELECT count(*) FROM t WHERE pgphi.decrypt_phi(v, 'lc') = 'value-' || id};

# Warm sessions: on the primary (one inside a transaction block that has
# already read the table), and on the standby.
my $warm = $primary->background_psql('postgres', on_error_stop => 0);
$warm->query_safe('SET ROLE app');
is($warm->query_safe($all), '2000', 'a warm primary session decrypts');
my $in_block = $primary->background_psql('postgres', on_error_stop => 0);
$in_block->query_safe('SET ROLE app');
$in_block->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ');
is($in_block->query_safe($all), '2000', 'a session inside a transaction block decrypts');
my $replica = $standby->background_psql('postgres', on_error_stop => 0);
is($replica->query_safe($all), '2000', 'a warm standby session decrypts');

# A statement already running when the key is suspended (5 ms a row, 2000
# rows: at least 10 s).
my $long = $primary->background_psql('postgres', on_error_stop => 0);
$long->query_safe('SET ROLE app');
$long->query_until(qr/long started/, qq{\\echo long started\n}
	. qq{SELECT count(pgphi.decrypt_phi(v, 'lc')) FROM (SELECT v, pg_sleep(0.005) FROM t ORDER BY id OFFSET 0) s;\n});
$primary->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pg_stat_activity
	WHERE state = 'active' AND query LIKE 'SELECT count(pgphi.decrypt_phi%')})
  or die 'the long statement did not start';

$primary->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.suspend_key('lc', reason => 'tap');});

$long->query('SELECT 1');
like($long->{stderr}, qr/pgphi key "lc" version 1 is suspended/,
	'a statement running when the key was suspended stops');
$long->{stderr} = '';
$warm->query($all);
like($warm->{stderr}, qr/pgphi key "lc" version 1 is suspended/, 'a warm primary session is refused');
$warm->{stderr} = '';
$in_block->query($all);
like($in_block->{stderr}, qr/pgphi key "lc" version 1 is suspended/,
	'the next statement of a transaction block is refused');
$in_block->{stderr} = '';
$in_block->query('ROLLBACK');
$warm->query(q{SELECT pgphi.encrypt_phi('x', 'lc')});
like($warm->{stderr}, qr/pgphi key "lc" version 1 is suspended/, 'encrypting is refused');
$warm->{stderr} = '';
$primary->wait_for_catchup($standby);
$replica->query($all);
like($replica->{stderr}, qr/pgphi key "lc" version 1 is suspended/, 'a warm standby session is refused');
$replica->{stderr} = '';
like(PgphiTest::psql_error($standby, 'postgres', $all), qr/55000: pgphi key "lc" version 1 is suspended/,
	'a new standby session is refused, with SQLSTATE 55000');
ok($primary->poll_query_until('postgres', q{SELECT count(*) >= 2 FROM pgphi.audit_log
	WHERE action IN ('decrypt', 'encrypt') AND outcome = 'refused' AND detail = 'key is suspended'}),
	'the refusals are audited');
is($primary->safe_psql('postgres', q{SELECT string_agg(DISTINCT suspended::text, ',') FROM pgphi.key_inventory
	WHERE key_name = 'lc'}), 'true', 'the inventory shows the suspension');

# Two custodians lift it; every session decrypts again.
like(PgphiTest::psql_error($primary, 'postgres',
	q{SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_resume('lc'); SELECT pgphi.resume_key('lc');}),
	qr/42501: resuming pgphi key "lc" needs the approval of a second key custodian/,
	'one custodian cannot lift a suspension alone');
$primary->safe_psql('postgres', q{SET SESSION AUTHORIZATION c2; SELECT pgphi.resume_key('lc');});
$primary->wait_for_catchup($standby);
is($warm->query_safe($all), '2000', 'after the resume the primary session decrypts');
is($replica->query_safe($all), '2000', 'after the resume the standby session decrypts');

# A compromise mark reaches the standby; re-encryption on the primary
# moves the values off the version, and the standby reads them.
$primary->safe_psql('postgres', q{
	SET SESSION AUTHORIZATION c1; SELECT pgphi.rotate_key('lc'); SELECT pgphi.mark_compromised('lc', 1);
});
$primary->wait_for_catchup($standby);
$replica->query($all);
like($replica->{stderr}, qr/pgphi key "lc" version 1 is marked compromised/,
	'a version marked compromised on the primary is refused on the standby');
$replica->{stderr} = '';
$primary->safe_psql('postgres', q{CALL pgphi.reencrypt('t', 'v')});
$primary->wait_for_catchup($standby);
is($replica->query_safe($all), '2000', 'after re-encryption the standby decrypts every value');
is($warm->query_safe(q{SELECT string_agg(DISTINCT (pgphi.ciphertext_info(v)).key_version::text, ',') FROM t}), '2',
	'every value is under the new version');

# A time-limited grant in an open session: works, then stops at its expiry,
# inside a statement that crosses it, without any revoke.
$primary->safe_psql('postgres', q{
	SET SESSION AUTHORIZATION c1;
	SELECT pgphi.grant_decrypt('lc', 'temp_reader', valid_until => clock_timestamp() + interval '8 seconds');
});
my $until = $primary->safe_psql('postgres', q{SELECT extract(epoch FROM valid_until) FROM pgphi.key_grants
	WHERE grantee = 'temp_reader'::regrole});
my $temp = $primary->background_psql('postgres', on_error_stop => 0);
$temp->query_safe('SET ROLE temp_reader');
is($temp->query_safe(q{SELECT pgphi.decrypt_phi(v, 'lc') FROM t WHERE id = 7}), 'value-7',
	'a time-limited grant works before its expiry');
# 10 ms a row over 2000 rows: 20 s, past the expiry.
$temp->query(q{SELECT count(pgphi.decrypt_phi(v, 'lc')) FROM (SELECT v, pg_sleep(0.01) FROM t ORDER BY id OFFSET 0) s});
like($temp->{stderr}, qr/time-limited decrypt grant of role "temp_reader" on the key has expired/,
	'a statement that crosses the expiry stops');
$temp->{stderr} = '';
cmp_ok($primary->safe_psql('postgres', 'SELECT extract(epoch FROM clock_timestamp())'), '>=', $until,
	'... after the expiry');
$temp->query(q{SELECT pgphi.decrypt_phi(v, 'lc') FROM t WHERE id = 7});
like($temp->{stderr}, qr/has expired/, 'the open session stays refused');
$temp->{stderr} = '';
ok($primary->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE action = 'decrypt' AND outcome = 'refused' AND detail = 'decrypt grant expired'
	AND acting_role = 'temp_reader')}), 'the expiry is audited at the first refused use');
is($primary->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.expire_key_grants()}), '1',
	'expire_key_grants removes the expired grant');
is($primary->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log WHERE action = 'expire_decrypt'
	AND detail LIKE 'from temp_reader; expired at %'}), '1', '... audited as an expiry');

$_->quit for ($warm, $in_block, $replica, $long, $temp);
$standby->stop;
$primary->stop;
done_testing();
