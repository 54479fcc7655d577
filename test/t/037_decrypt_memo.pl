# decrypt_phi keeps, per call site, the key and grant answer of the last
# value it decrypted (docs/performance.md), revalidated per value. These
# tests make one statement, at one call site, meet each change that must
# still stop it or make it look again partway through a scan: a decrypt
# limit reached, a value under a key the role holds no grant on, a tampered
# value with the same header, the key cache flushed, and a suspension
# committed by another session. (A time-limited grant expiring inside a
# statement is in 030_key_lifecycle.pl.)
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('memo');
$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; GRANT pgphi_key_custodian TO c1;
	CREATE ROLE reader LOGIN; GRANT pgphi_decrypt TO reader;
	CREATE ROLE limited LOGIN; GRANT pgphi_decrypt TO limited;
	SELECT pgphi.create_key('ka'), pgphi.create_key('kb');
	SELECT pgphi.grant_decrypt('ka', 'reader'), pgphi.grant_decrypt('ka', 'limited');
	-- 1..1000 under ka; 1001 under kb, which reader holds no grant on.
	CREATE TABLE t (id int PRIMARY KEY, v pgphi.encrypted);
	INSERT INTO t SELECT i, pgphi.encrypt_phi('value-' || i, 'ka') FROM generate_series(1, 1000) i;
	INSERT INTO t VALUES (1001, pgphi.encrypt_phi('value-1001', 'kb'));
	-- The same values as bytea, row 700 with its last tag byte flipped.
	CREATE TABLE raw AS SELECT id, CASE WHEN id = 700
		THEN set_byte(v::bytea, length(v::bytea) - 1, get_byte(v::bytea, length(v::bytea) - 1) # 1)
		ELSE v::bytea END AS v FROM t WHERE id <= 1000;
	GRANT SELECT ON t, raw TO reader, limited;
});

my $scan = q{SELECT count(*) FROM t WHERE id <= 1000 AND pgphi.decrypt_phi(v) = 'value-' || id};
is($node->safe_psql('postgres', "SET ROLE reader; $scan"), '1000', 'a scan of one key decrypts every value');

# A value under another key, after 1000 under a granted one: refused.
like(PgphiTest::psql_error($node, 'postgres',
	q{SET ROLE reader; SELECT count(pgphi.decrypt_phi(v)) FROM (SELECT v FROM t ORDER BY id OFFSET 0) s}),
	qr/42501: permission denied to decrypt with pgphi key "kb"/,
	'the first value under a key without a grant is refused after a run of values under another');

# A tampered value whose header is the one before it: authentication still fails.
like(PgphiTest::psql_error($node, 'postgres',
	q{SET ROLE reader; SELECT count(pgphi.decrypt_phi(v)) FROM (SELECT v FROM raw ORDER BY id OFFSET 0) s}),
	qr/pgphi ciphertext failed authentication/, 'a tampered value in the middle of a scan fails authentication');

# The key cache flushed in the middle of a statement: the values after it
# need the key again, and the key manager is asked for it again.
my $calls = q{SELECT key_manager_calls FROM pgphi.cache_stats};
my $before = $node->safe_psql('postgres', $calls);
is($node->safe_psql('postgres', q{SELECT count(*) FROM (SELECT id, v, CASE WHEN id = 500 THEN pgphi.flush_cache() END
	FROM t WHERE id <= 1000 ORDER BY id OFFSET 0) s WHERE pgphi.decrypt_phi(v) = 'value-' || id}),
	'1000', 'a scan across a cache flush decrypts every value');
cmp_ok($node->safe_psql('postgres', $calls), '>', $before, '... and takes the key from the key manager again');

# A decrypt limit reached partway through one statement: refused there, and
# the values before it used up the whole budget (each one was charged).
$node->safe_psql('postgres', q{SELECT pgphi.set_decrypt_limit('ka', 'limited', 300, interval '1 hour')},
	extra_params => [ '-U', 'c1' ]);
like(PgphiTest::psql_error($node, 'postgres', "SET ROLE limited; $scan"),
	qr/53400: pgphi decrypt limit reached for key "ka"/, 'a scan past the decrypt limit is refused partway');
like(PgphiTest::psql_error($node, 'postgres',
	q{SET ROLE limited; SELECT pgphi.decrypt_phi(v) FROM t WHERE id = 1}),
	qr/53400: pgphi decrypt limit reached/, '... having used the whole budget: the next statement is refused');

# A suspension committed by another session while a scan runs (10 ms a row):
# the scan stops at a value after it, not at its end.
my $long = $node->background_psql('postgres', on_error_stop => 0);
$long->query_safe('SET ROLE reader');
$long->query_until(qr/long started/, qq{\\echo long started\n}
	. qq{SELECT count(pgphi.decrypt_phi(v)), clock_timestamp() FROM (SELECT v, pg_sleep(0.01) FROM t WHERE id <= 1000 ORDER BY id OFFSET 0) s;\n});
$node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pg_stat_activity
	WHERE state = 'active' AND query LIKE 'SELECT count(pgphi.decrypt_phi%')})
  or die 'the long statement did not start';
my $t0 = time;
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.suspend_key('ka', reason => 'tap');});
$long->query('SELECT 1');
like($long->{stderr}, qr/pgphi key "ka" version 1 is suspended/, 'a scan running when the key is suspended stops');
cmp_ok(time - $t0, '<', 4, '... within moments of the suspension (the whole scan takes at least 10 s)');
$long->quit;

$node->stop;
done_testing();
