# Disk-full style failures of everything pgphi writes to disk:
#   - the local provider's KEK file, created by the key broker with the first
#     local key;
#   - the key catalog's rows, written by the backend running create_key or
#     rotate_key;
#   - the seal counts file pgphi_dek_usage in the data directory, written by
#     the key broker every few seconds and at shutdown.
# A full disk is emulated without root by a file-size limit (RLIMIT_FSIZE, set
# with prlimit) on the one process that writes: PostgreSQL ignores SIGXFSZ,
# so a write past the limit fails with EFBIG, or stops short, as it would on a
# full disk. Also: a KEK location that cannot be written, and /dev/full.
# Each failure must give a clear error with its SQLSTATE, leave nothing
# half-created, keep existing keys working, and heal once space is back.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('disk_full');
my $kek_dir = $node->basedir . '/kek';
mkdir $kek_dir, 0700 or die "mkdir $kek_dir: $!";
my $kek = "$kek_dir/pgphi.kek";
# The log goes through the logging collector's pipe: a process under a
# file-size limit could not append to a log file it writes itself. It is
# written beside the other TAP logs, where the catalogue check reads them.
my $log_dir = $PostgreSQL::Test::Utils::log_path;
$node->append_conf('postgresql.conf', <<CONF);
logging_collector = on
log_directory = '$log_dir'
log_filename = '011_disk_full_collected.log'
log_rotation_age = 0
log_rotation_size = 0
shared_buffers = '64MB'
pgphi.local_kek_file = '$kek'
CONF
$node->restart;
my $log_file = "$log_dir/011_disk_full_collected.log";

sub server_log { return -e $log_file ? slurp_file($log_file) : ''; }

sub wait_for_log
{
	my ($pattern, $what) = @_;
	for (1 .. 30 * 10)
	{
		return 1 if server_log() =~ $pattern;
		select(undef, undef, undef, 0.1);
	}
	diag("timed out waiting for the server log to show $what");
	return 0;
}

# Sets the file-size limit of a running server process (bytes, or
# 'unlimited'): the soft limit only, which an unprivileged user may raise
# again up to the hard limit.
sub limit_file_size
{
	my ($pid, $limit) = @_;
	system('prlimit', "--pid=$pid", "--fsize=$limit:unlimited") == 0 or die "prlimit --pid=$pid failed";
}

sub files_in { my ($dir) = @_; opendir my $d, $dir or die; return join ' ', sort grep { !/^\.\.?$/ } readdir $d; }

$node->safe_psql('postgres', 'CREATE EXTENSION pgphi');
my $broker = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
my $no_keys = q{SELECT (SELECT count(*) FROM pgphi.keys) || ' keys, ' || (SELECT count(*) FROM pgphi.key_versions) || ' versions'};

###############################################################################
# The KEK file
###############################################################################

# A KEK location the server account cannot write.
chmod 0500, $kek_dir or die;
my $err = PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.create_key('first')});
like($err, qr/42501: could not create local KEK file "\Q$kek\E": Permission denied/,
	'KEK directory not writable: create_key fails with 42501, naming the file');
like($err, qr/HINT:  pgphi.local_kek_file must be in a directory the server account can write/, '... and says why');
chmod 0700, $kek_dir or die;
is($node->safe_psql('postgres', $no_keys), '0 keys, 0 versions', '... no key row is left');
is(files_in($kek_dir), '', '... no KEK file or temporary file is left');

# A full disk: the broker can write 16 bytes of the 32-byte KEK.
limit_file_size($broker, 16);
$err = PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.create_key('first')});
like($err, qr/53100: could not write local KEK file "\Q$kek\E": File too large/,
	'disk full while writing the KEK: create_key fails with 53100 (disk_full)');
like($err, qr/DETAIL:  No key was created\.\n.*HINT:  Free space where pgphi.local_kek_file points, then retry/s,
	'... says that nothing was created and what to do');
is($node->safe_psql('postgres', $no_keys), '0 keys, 0 versions', '... no key row is left');
is(files_in($kek_dir), '', '... no partial KEK file or temporary file is left');
is($node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()'), $broker,
	'... the key broker survived the failed write (SIGXFSZ is ignored)');
ok(server_log() =~ /pgphi key broker: creation of key "first" version 1 through provider local failed: could not write local KEK file/,
	'... and logged the failure');

# /dev/full: exists, so it is taken as the KEK, and refused as not a file.
$node->safe_psql('postgres', q{ALTER SYSTEM SET pgphi.local_kek_file = '/dev/full'});
PgphiTest::reload_broker($node);
$err = PgphiTest::psql_error($node, 'postgres', q{SELECT pgphi.create_key('first')});
like($err, qr{F0000: local KEK file "/dev/full" is not a regular file}, 'KEK file /dev/full: F0000, not a regular file');
is($node->safe_psql('postgres', $no_keys), '0 keys, 0 versions', '... no key row is left');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET pgphi.local_kek_file});
PgphiTest::reload_broker($node);

# Space is back: the same call works.
limit_file_size($broker, 'unlimited');
my ($ret, $stdout, $stderr) = $node->psql('postgres', q{SELECT pgphi.create_key('first')});
is($ret, 0, 'once space is back, create_key succeeds');
like($stderr, qr/WARNING:  pgphi created a new local KEK file/, '... creating the KEK file, and says so');
is(files_in($kek_dir), 'pgphi.kek', '... the KEK file and nothing else');
is(-s $kek, 32, '... of 32 bytes');
is((stat $kek)[2] & 07777, 0600, '... mode 0600');

$node->safe_psql('postgres', q{
	CREATE TABLE charts (id int PRIMARY KEY, note pgphi.encrypted);
	INSERT INTO charts SELECT i, pgphi.encrypt_phi('disk-full chart note ' || i, 'first') FROM generate_series(1, 200) i;
});
# The failed attempts used up key ids: the key's id is not 1.
my $first_id = $node->safe_psql('postgres', q{SELECT key_id FROM pgphi.keys WHERE name = 'first'});
my $charts_ok = q{SELECT count(*) FROM charts WHERE pgphi.decrypt_phi(note) = 'disk-full chart note ' || id};
is($node->safe_psql('postgres', $charts_ok), '200', 'values encrypted under the new key decrypt');

###############################################################################
# The key catalog: a full disk under the backend that writes the rows
###############################################################################

# The backend limits itself (COPY TO PROGRAM runs prlimit as its child), then
# runs up to 500 statements (made by an SQL expression of i) until the key
# catalog needs a page that does not fit; returns psql's status, the number
# of statements that succeeded and psql's stderr. With
# synchronous_commit off the WAL is written by the WAL writer, which keeps
# no limit: a backend that cannot write WAL would PANIC, as PostgreSQL does
# on a full pg_wal, and that is not pgphi's to handle.
sub fill_catalog
{
	my ($statement_sql) = @_;
	my ($ret, $stdout, $stderr) = $node->psql('postgres', <<SQL, on_error_stop => 1);
\\set VERBOSITY verbose
SET synchronous_commit = off;
SELECT format('COPY (SELECT 1 WHERE false) TO PROGRAM %L', format('prlimit --pid=%s --fsize=%s:unlimited', pg_backend_pid(),
       greatest(pg_relation_size('pgphi.keys'), pg_relation_size('pgphi.key_versions')) + 4096)) \\gexec
SELECT $statement_sql FROM generate_series(1, 500) i \\gexec
SQL
	return ($ret, scalar(split /\n/, $stdout), $stderr);
}

# PostgreSQL's own refusal to extend a file past the limit: 15 writes the new
# block and reports the short write as disk full; 17 and later extend with
# zeros first and report the file-size limit (EFBIG) as it is.
my $extend_failed =
  $node->pg_version >= 17
  ? qr/XX000: could not extend file "[^"]+": File too large/
  : qr/53100: could not extend file "[^"]+": wrote only 4096 of 8192 bytes/;

my $versions = qq{SELECT string_agg(version || ' ' || state, ',' ORDER BY version) FROM pgphi.key_versions WHERE key_id = $first_id};
my ($status, $rotated, $rotate_err) = fill_catalog(q{format('SELECT pgphi.rotate_key(%L)', 'first')});
isnt($status, 0, "rotate_key fails once the key catalog needs more space (after $rotated rotations)");
like($rotate_err, $extend_failed, '... with PostgreSQL\'s own error for a full disk');
my $expected = join ',', (map { "$_ decrypt_only" } 1 .. $rotated), ($rotated + 1) . ' active';
is($node->safe_psql('postgres', $versions), $expected,
	'... the catalog holds every completed rotation, one active version and nothing of the failed one');
is($node->safe_psql('postgres', $charts_ok), '200', '... every value still decrypts');
is($node->safe_psql('postgres', q{SELECT (pgphi.ciphertext_info(pgphi.encrypt_phi('x', 'first'))).key_version}),
	$rotated + 1, '... and new values use the last completed version');
is($node->safe_psql('postgres', q{SELECT pgphi.rotate_key('first')}), $rotated + 2,
	'with space back (a session without the limit), rotate_key succeeds');

my ($created, $create_err);
($status, $created, $create_err) = fill_catalog(q{format('SELECT pgphi.create_key(%L)', 'filler_' || i)});
isnt($status, 0, "create_key fails once the key catalog needs more space (after $created keys)");
like($create_err, $extend_failed, '... with PostgreSQL\'s own error for a full disk');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM pgphi.keys k
	 WHERE k.name LIKE 'filler\_%'
	   AND (SELECT count(*) FROM pgphi.key_versions v WHERE v.key_id = k.key_id AND v.state = 'active') = 1}),
	$created, '... every key created before it is complete, with one active version');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM pgphi.keys k WHERE NOT EXISTS (SELECT FROM pgphi.key_versions v WHERE v.key_id = k.key_id)}),
	'0', '... and no key row without a version is left behind');
my $next_filler = 'filler_' . ($created + 1);
is($node->safe_psql('postgres', qq{SELECT count(*) FROM pgphi.keys WHERE name = '$next_filler'}), '0',
	'... the failed key does not exist');
$node->safe_psql('postgres', qq{SELECT pgphi.create_key('$next_filler')});
is($node->safe_psql('postgres', qq{SELECT pgphi.decrypt_phi(pgphi.encrypt_phi('ok', '$next_filler'))}), 'ok',
	'with space back, the same create_key succeeds and its key works');
is($node->safe_psql('postgres', $charts_ok), '200', 'every value still decrypts');
unlike(server_log(), qr/PANIC/, 'no PANIC in the server log');

###############################################################################
# The seal counts file
###############################################################################

my $usage_file = $node->data_dir . '/pgphi_dek_usage';
my $db_oid = $node->safe_psql('postgres', q{SELECT oid FROM pg_database WHERE datname = 'postgres'});
my $active = $node->safe_psql('postgres', qq{SELECT version FROM pgphi.key_versions WHERE key_id = $first_id AND state = 'active'});
my $encrypt = sub {
	my ($n) = @_;
	$node->safe_psql('postgres', "SELECT count(pgphi.encrypt_phi('usage ' || i, 'first')) FROM generate_series(1, $n) i");
};
my $saved_count = sub {
	my $text = -e $usage_file ? slurp_file($usage_file) : '';
	return $text =~ /^$db_oid $first_id $active (\d+) \d$/m ? $1 : -1;
};
my $counted = sub {
	return $node->safe_psql('postgres', "SELECT encryptions FROM pgphi.key_usage() WHERE key_name = 'first' AND version = $active");
};
my $wait_saved = sub {
	my ($n) = @_;
	for (1 .. 300) { return 1 if $saved_count->() == $n; select(undef, undef, undef, 0.1); }
	return 0;
};

$encrypt->(100);
ok($wait_saved->(100), 'the broker saves the seal counts to pgphi_dek_usage');

limit_file_size($broker, 0);
$encrypt->(50);
ok(wait_for_log(qr/LOG:  pgphi could not save the key usage counts to "pgphi_dek_usage": File too large/,
		'the failure to save the counts'),
	'with no space, the broker logs that it cannot save the counts');
like(server_log(), qr/DETAIL:  The counts are kept in shared memory and saved as soon as writing works again/,
	'... and that they are kept meanwhile');
is($saved_count->(), 100, '... the file keeps the previous counts, intact');
ok(!-e "$usage_file.tmp", '... no partial temporary file is left');
is($counted->(), 150, '... shared memory holds the current count');
is($node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()'), $broker, '... the broker keeps running');
$encrypt->(50);
sleep 6;    # the broker retries every 5 seconds
my @failures = server_log() =~ /could not save the key usage counts/g;
is(scalar @failures, 1, 'retries while the disk stays full are not logged again within the minute');

limit_file_size($broker, 'unlimited');
ok(wait_for_log(qr/pgphi saved the key usage counts to "pgphi_dek_usage" again, after \d+ s of failures/,
		'the recovery'), 'with space back, the broker saves the counts and says so');
ok($wait_saved->(200), '... the file holds every count made while the disk was full');
$node->restart;
is($counted->(), 200, '... and they survive a restart');

# The last save, at shutdown, fails: logged, and the previous file stays.
$broker = $node->safe_psql('postgres', 'SELECT pid FROM pgphi.broker_status()');
limit_file_size($broker, 0);
$encrypt->(25);
$node->stop('fast');
like(server_log(), qr/could not save the key usage counts to "pgphi_dek_usage": File too large\n.*DETAIL:  The counts made since the last save are lost; "pgphi_dek_usage" keeps the previous ones/,
	'a failed save at shutdown is logged with what it loses');
$node->start;
is($counted->(), 200, '... and the restarted server has the counts of the last save');

# Nothing secret reached the log.
my $kek_bytes = slurp_file($kek);
my $log = server_log();
ok(index($log, $kek_bytes) < 0 && index($log, unpack('H*', $kek_bytes)) < 0, 'the server log holds no KEK bytes');
unlike($log, qr/disk-full chart note|usage \d/, 'the server log holds no plaintext');

$node->stop;
done_testing();
