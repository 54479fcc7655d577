# Rotation without downtime or data loss: rotate while writing; re-encrypt a
# million rows under concurrent updates across a server crash; rotate the KEK
# in the key manager and rewrap; dump and restore rotated keys elsewhere.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use PgphiTest;
use KeyManagerEmulator;

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
my $url = $emulator->url;
my $provider_conf = $emulator->postgres_settings;

my $node = PgphiTest::new_node('rotation');
$node->append_conf('postgresql.conf', $provider_conf);
$node->restart;
my $kms_key = $emulator->{kms_key};
$node->safe_psql('postgres', qq{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn', provider => 'aws_kms', kek => '$kms_key');
	CREATE TABLE visits (id bigserial PRIMARY KEY, writer int, n int, note pgphi.encrypted);
});

# Rotate twice while four sessions insert: no writer fails, and every row
# decrypts, under whichever version was active when it was written.
my @writers;
for my $w (1 .. 4)
{
	# Each writer commits 300 rows over about three seconds.
	my $sql = qq{DO \$\$ BEGIN FOR n IN 1..300 LOOP
		INSERT INTO visits (writer, n, note) VALUES ($w, n, pgphi.encrypt_phi('w$w-' || n, 'ssn'));
		COMMIT; PERFORM pg_sleep(0.01); END LOOP; END \$\$};
	my ($out, $err) = ('', '');
	push @writers, [ IPC::Run::start([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \$out, '2>', \$err, IPC::Run::timeout(120)), \$err ];
}
sleep 1;
$node->safe_psql('postgres', "SELECT pgphi.rotate_key('ssn')");
sleep 1;
$node->safe_psql('postgres', "SELECT pgphi.rotate_key('ssn')");
my $writer_errors = 0;
for (@writers) { $_->[0]->finish; $writer_errors++ if ${ $_->[1] } ne ''; }
is($writer_errors, 0, 'four sessions wrote through two rotations without an error');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM visits WHERE pgphi.decrypt_phi(note, 'ssn') = 'w' || writer || '-' || n}),
	'1200', 'every row written during the rotations decrypts');
is($node->safe_psql('postgres',
	q{SELECT string_agg(DISTINCT key_version::text, ',' ORDER BY key_version::text) FROM visits, pgphi.ciphertext_info(note)}),
	'1,2,3', 'rows were written under each version in turn');

# A million rows under version 3; rotate to 4, then re-encrypt while another
# session keeps updating: some updates write new values (under version 4),
# some touch another column only (copying the old ciphertext to a new row
# version). Kill the server halfway; restart; resume.
$node->safe_psql('postgres', q{
	CREATE TABLE charts (id int PRIMARY KEY, rev int NOT NULL DEFAULT 0, touched int NOT NULL DEFAULT 0,
	                     note pgphi.encrypted);
	INSERT INTO charts (id, note) SELECT i, pgphi.encrypt_phi('chart ' || i || ' rev 0', 'ssn')
	  FROM generate_series(1, 1000000) i;
	VACUUM ANALYZE charts;
	SELECT pgphi.rotate_key('ssn');
});
my $updater_sql = q{
	DO $$
	DECLARE
	    a int;
	    b int;
	BEGIN
	    FOR i IN 1..100000 LOOP
	        a := 1 + (random() * 999999)::int;   -- chosen once, so the UPDATE uses the index
	        b := 1 + (random() * 999999)::int;
	        UPDATE charts SET rev = rev + 1, note = pgphi.encrypt_phi('chart ' || id || ' rev ' || (rev + 1), 'ssn')
	         WHERE id = a;
	        UPDATE charts SET touched = touched + 1 WHERE id = b;
	        COMMIT;
	    END LOOP;
	END $$;
};
my ($upd_out, $upd_err) = ('', '');
my $updater = IPC::Run::start([ 'psql', '-X', '-q', '-d', $node->connstr('postgres'), '-c', $updater_sql ],
	'>', \$upd_out, '2>', \$upd_err, IPC::Run::timeout(300));
my ($re_out, $re_err) = ('', '');
my $reencrypt = IPC::Run::start([ 'psql', '-X', '-q', '-d', $node->connstr('postgres'),
	'-c', q{CALL pgphi.reencrypt('charts', 'note', batch_size => 20000)} ],
	'>', \$re_out, '2>', \$re_err, IPC::Run::timeout(300));
$node->poll_query_until('postgres',
	q{SELECT next_page * 2 > total_pages FROM pgphi.reencrypt_progress WHERE relation = 'charts'::regclass})
  or die 'the re-encryption did not progress';
$node->stop('immediate');
$reencrypt->finish;
$updater->finish;
like($re_err, qr/terminat|server closed|connection/, 'the server died in the middle of the re-encryption');

$node->start;
my $progress = $node->safe_psql('postgres',
	q{SELECT next_page > 0, next_page < total_pages, finished_at IS NULL FROM pgphi.reencrypt_progress});
is($progress, 't|t|t', 'the progress of the interrupted re-encryption survived the crash');
my $updater2 = IPC::Run::start([ 'psql', '-X', '-q', '-d', $node->connstr('postgres'), '-c',
	$updater_sql =~ s/1\.\.100000/1..3000/r ], '>', \$upd_out, '2>', \$upd_err, IPC::Run::timeout(300));
my ($ret, $resume_out, $resume_err) = $node->psql('postgres',
	q{CALL pgphi.reencrypt('charts', 'note', batch_size => 20000)});
$updater2->finish;
is($ret, 0, 'CALL reencrypt again finishes the job');
like($resume_err, qr/resuming re-encryption of public.charts.note at page [1-9]\d*/, '... resuming where it stopped');
is($node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE i.key_version = 4), count(*)
	  FROM charts, pgphi.ciphertext_info(note) i}), '1000000|1000000', 'every row is under the active version');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM charts WHERE pgphi.decrypt_phi(note, 'ssn') = 'chart ' || id || ' rev ' || rev}),
	'1000000', 'every row decrypts to its latest value: no update was lost');
ok($node->safe_psql('postgres', 'SELECT sum(rev) > 0 AND sum(touched) > 0 FROM charts') eq 't',
	'... although updates of both kinds ran during the re-encryption');
my $left = $node->safe_psql('postgres',
	q{SELECT string_agg(relation || '.' || column_name, ',') FROM pgphi.key_version_usage('ssn', 3)});
is($left, 'visits.note', 'only the other table still uses version 3');

# KEK rotation in the key managers, then rewrap: the catalog records the new
# KEK version, data is untouched, everything decrypts.
$node->safe_psql('postgres', qq{SELECT pgphi.create_key('vault_ssn', provider => 'vault', kek => '$emulator->{vault_key}')});
$node->safe_psql('postgres', q{CREATE TABLE v (n int, note pgphi.encrypted);
	INSERT INTO v SELECT i, pgphi.encrypt_phi('v' || i, 'vault_ssn') FROM generate_series(1, 100) i});
my ($rot_out, $rot_err);
IPC::Run::run([ 'curl', '-sS', '--cacert', "$pki/ca.pem", '-X', 'POST', '-H', 'X-Vault-Request: true', '-H', "X-Vault-Token: $emulator->{vault_root_token}",
	"$url/v1/transit/keys/$emulator->{vault_key}/rotate" ], '>', \$rot_out, '2>', \$rot_err) or die $rot_err;
$emulator->control('POST', 'kms/rotate', { key => $kms_key });
is($node->safe_psql('postgres', 'SELECT pgphi.rewrap_keys()'), '5', 'rewrap_keys rewraps every DEK version');
is($node->safe_psql('postgres', q{SELECT v.kek_version FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id) WHERE k.name = 'vault_ssn'}),
	'v2', 'the Vault key now records Transit key version 2');
# KMS rewraps inside KMS. Vault's rewrap cannot carry the associated data
# that binds a DEK to its key, so the broker decrypts and encrypts instead.
ok($emulator->stats->{kms}{ReEncrypt} >= 4, 'KMS ReEncrypt did it inside KMS');
ok(!$emulator->stats->{vault}{rewrap} && $emulator->stats->{vault}{encrypt} >= 2,
	'... and Vault through decrypt and encrypt, never rewrap');
$node->safe_psql('postgres', 'SELECT pgphi.flush_cache()');
is($node->safe_psql('postgres', q{SELECT count(*) FROM v WHERE pgphi.decrypt_phi(note) = 'v' || n}), '100',
	'Vault-wrapped values decrypt after the rewrap');
is($node->safe_psql('postgres', q{SELECT count(*) FROM charts WHERE id <= 1000 AND pgphi.decrypt_phi(note, 'ssn') = 'chart ' || id || ' rev ' || rev}),
	'1000', 'KMS-wrapped values decrypt after the rewrap');

# pg_dump of the rotated database, restored into a fresh cluster that uses
# the same key managers: every value decrypts there.
my $dump = $node->basedir . '/rotated.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-d', $node->connstr('postgres'), '-f', $dump ], 'pg_dump');
my $fresh = PgphiTest::new_node('fresh');
$fresh->append_conf('postgresql.conf', $provider_conf);
$fresh->restart;
$fresh->safe_psql('postgres', 'CREATE DATABASE clinic');
$fresh->command_ok([ 'pg_restore', '-d', $fresh->connstr('clinic'), $dump ], 'pg_restore into a fresh cluster');
is($fresh->safe_psql('clinic', q{SELECT count(*) FROM charts WHERE pgphi.decrypt_phi(note, 'ssn') = 'chart ' || id || ' rev ' || rev}),
	'1000000', 'the fresh cluster decrypts every re-encrypted row');
is($fresh->safe_psql('clinic', q{SELECT count(*) FROM visits WHERE pgphi.decrypt_phi(note, 'ssn') = 'w' || writer || '-' || n}),
	'1200', '... and the rows of every older version');
is($fresh->safe_psql('clinic', q{SELECT count(*) FROM v WHERE pgphi.decrypt_phi(note) = 'v' || n}), '100',
	'... and the Vault-wrapped ones');

$fresh->stop;
$node->stop;
$emulator->stop;
done_testing();
