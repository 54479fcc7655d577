# The nonce budget of a DEK version (issue 20, finding 2): its count of
# values sealed must survive a failover and a crash, and must not be
# multiplied by copying the database. A version seals only inside a
# reservation committed in WAL (pgphi.seal_reservations); a server that cannot
# trust its own count starts it at the reservation; a copied database must
# rotate before it encrypts at random.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $primary = PgphiTest::new_node('primary', allows_streaming => 1);
$primary->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn');
	CREATE TABLE patients (id int PRIMARY KEY, ssn pgphi.encrypted);
});
my $reservation = q{SELECT r.reserved FROM pgphi.seal_reservations r JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'ssn' AND r.version = 1};
my $count = q{SELECT encryptions FROM pgphi.key_usage() WHERE key_name = 'ssn' AND version = 1};
my $first = $primary->safe_psql('postgres', $reservation);
cmp_ok($first, '>', 0, "a new key version comes with a reservation of $first seals");
is($primary->safe_psql('postgres', q{SELECT d.datname FROM pgphi.seal_reservations r
	JOIN pg_database d ON d.oid = r.database_oid}), 'postgres', '... naming the database that seals under it');

$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
chmod 0600, $standby->data_dir . '/pgphi_local.kek';
$standby->start;

# The primary seals 5000 values after the base backup; its count file never
# reaches the standby.
$primary->safe_psql('postgres',
	q{INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'ssn') FROM generate_series(1, 5000) i});
is($primary->safe_psql('postgres', $count), '5000', 'the primary counted 5000 values');
$primary->wait_for_catchup($standby);

# Failover: the primary dies, the standby is promoted.
$primary->stop('immediate');
$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()') or die 'promotion did not finish';
$standby->safe_psql('postgres', q{INSERT INTO patients VALUES (5001, pgphi.encrypt_phi('ssn-5001', 'ssn'))});
my $after_failover = $standby->safe_psql('postgres', $count);
cmp_ok($after_failover, '>', 5000,
	"after failover the new primary's count covers every value the old one sealed ($after_failover)");
cmp_ok($after_failover, '>=', $first, '... as it starts at the reservation the old primary sealed inside');
is($standby->safe_psql('postgres', q{SELECT count(*) FROM patients WHERE pgphi.decrypt_phi(ssn) = 'ssn-' || id}),
	'5001', '... and every value decrypts');

# Past the reservation, sessions wait for the next one, which the broker's
# reservation worker commits; encryption goes on.
my $reserved_now = $standby->safe_psql('postgres', $reservation);
cmp_ok($reserved_now, '>', $after_failover, "the new primary reserved more ($reserved_now)");
is($standby->safe_psql('postgres', q{SELECT detail FROM pgphi.audit_log WHERE action = 'reserve_seals'
	ORDER BY seq DESC LIMIT 1}), "$reserved_now values may now be encrypted under this version",
	'... and the audit trail records the reservation');

# A crash restart loses the counts made since the last save of the count
# file; the reservation covers them.
my $node = $standby;
$node->safe_psql('postgres',
	q{INSERT INTO patients SELECT i, pgphi.encrypt_phi('ssn-' || i, 'ssn') FROM generate_series(5002, 7000) i});
my $before_crash = $node->safe_psql('postgres', $count);
$node->append_conf('postgresql.conf', "restart_after_crash = on\n");
$node->reload;
my $victim = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
kill 'KILL', $victim;
ok(PgphiTest::wait_for_restart($node), 'the server restarts after the broker was killed');
$node->safe_psql('postgres', q{INSERT INTO patients VALUES (7001, pgphi.encrypt_phi('ssn-7001', 'ssn'))});
cmp_ok($node->safe_psql('postgres', $count), '>', $before_crash,
	"after the crash the count still covers every value ($before_crash before it)");

# No reservation worker can start (as when every worker slot is taken):
# after the next crash, a session waits pgphi.key_wait_timeout and fails
# rather than seal unreserved; once a worker can start, encryption goes on.
$node->append_conf('postgresql.conf', "pgphi.test_fault = 'reservation_stall'\npgphi.key_wait_timeout = 2000\n");
$node->reload;
$victim = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
kill 'KILL', $victim;
ok(PgphiTest::wait_for_restart($node), 'the server restarts after another crash');
like(PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.encrypt_phi('x', 'ssn')}),
	qr/08006: pgphi key broker did not reserve seals for a key version within 2000 ms/,
	'without a reservation worker, randomized encryption fails after the wait (08006)');
$node->append_conf('postgresql.conf', "pgphi.test_fault = ''\n");
PgphiTest::reload_broker($node);
is($node->safe_psql('postgres', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('x', 'ssn'))}), 'x',
	'... and works again once the worker can start');

# A clean restart keeps the exact count: no reservation is spent.
my $exact = $node->safe_psql('postgres', $count);
$node->restart;
$node->safe_psql('postgres', q{INSERT INTO patients VALUES (7002, pgphi.encrypt_phi('ssn-7002', 'ssn'))});
is($node->safe_psql('postgres', $count), $exact + 1, 'after a clean restart the count is exact');

# CREATE DATABASE ... TEMPLATE copies the DEKs: the copy may decrypt, but
# must rotate before it encrypts at random, or the two databases would
# spend one budget twice.
$node->safe_psql('postgres', q{CREATE DATABASE clinic});
$node->safe_psql('clinic', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('mrn');
	CREATE TABLE charts AS SELECT 1 AS id, pgphi.encrypt_phi('mrn-1', 'mrn') AS mrn;
});
# The broker's audit writer may be connected to the template for a moment.
my ($ret, $err);
for (1 .. 50)
{
	($ret, undef, $err) = $node->psql('postgres', q{CREATE DATABASE clinic_copy TEMPLATE clinic});
	last if $ret == 0;
	select(undef, undef, undef, 0.2);
}
is($ret, 0, 'a database is copied from one that uses pgphi') or diag($err);
is($node->safe_psql('clinic_copy', q{SELECT pgphi.decrypt_phi(mrn) FROM charts}), 'mrn-1',
	'the copy decrypts what it was copied with');
like(PgphiTest::psql_error($node, 'clinic_copy', q{SELECT pgphi.encrypt_phi('mrn-2', 'mrn')}),
	qr/55000: pgphi key "mrn" version 1 cannot encrypt in this database.*DETAIL:  Its data key was copied from another database/s,
	'the copy refuses to encrypt at random under the copied version (55000)');
is($node->safe_psql('clinic_copy', q{SELECT pgphi.encrypt_phi('mrn-2', 'mrn', deterministic => true) IS NOT NULL}),
	't', '... while deterministic values, which use no nonce, still work');
$node->safe_psql('clinic_copy', q{SELECT pgphi.rotate_key('mrn')});
is($node->safe_psql('clinic_copy', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('mrn-2', 'mrn'))}), 'mrn-2',
	'after rotate_key the copy encrypts under its own version');
is($node->safe_psql('clinic', q{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('mrn-3', 'mrn'))}), 'mrn-3',
	'the original database goes on encrypting under its version');

# A restored dump has the DEKs but no reservation (the table is not dumped):
# it too must rotate first.
my $dump = $PostgreSQL::Test::Utils::tmp_check . '/clinic.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('clinic') ], 'clinic is dumped');
$node->safe_psql('postgres', q{CREATE DATABASE clinic_restored});
$node->command_ok([ 'pg_restore', '-d', $node->connstr('clinic_restored'), $dump ], '... and restored');
like(PgphiTest::psql_error($node, 'clinic_restored', q{SELECT pgphi.encrypt_phi('mrn-4', 'mrn')}),
	qr/55000: pgphi key "mrn" version 1 cannot encrypt in this database.*DETAIL:  Its data key came here by a restore/s,
	'the restored database refuses to encrypt at random until it rotates (55000)');

$node->stop;
done_testing();
