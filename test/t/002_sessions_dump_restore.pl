# Key catalog changes (here a version retired and brought back by direct
# DML; a destroyed one could not come back) reach other sessions at once,
# cancel leaves a session usable, and pg_dump / pg_restore keep every value
# decryptable.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('sessions');
$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	SELECT pgphi.create_key('ssn_key');
	SELECT pgphi.create_key('name_key');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text, ssn pgphi.encrypted, name bytea);
	INSERT INTO patients
	SELECT i, 'MRN-' || i,
	       pgphi.encrypt_phi(lpad(i::text, 9, '0'), 'ssn_key', 'MRN-' || i),
	       pgphi.encrypt_phi('Patient ' || i, 'name_key')
	  FROM generate_series(1, 1000) i;
});

my $count_ok = q{SELECT count(*) FROM patients
	WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) = lpad(id::text, 9, '0')
	  AND pgphi.decrypt_phi(name, 'name_key') = 'Patient ' || id};

# A session with warm key caches sees another session's catalog change.
my $reader = $node->background_psql('postgres', on_error_stop => 0);
is($reader->query_safe($count_ok), '1000', 'reader decrypts with warm caches');

$node->safe_psql('postgres', q{
	CREATE TABLE saved_versions AS SELECT * FROM pgphi.key_versions;
	UPDATE pgphi.key_versions SET state = 'retired'
	 WHERE key_id = (SELECT key_id FROM pgphi.keys WHERE name = 'ssn_key');
});
$reader->query($count_ok);
like($reader->{stderr}, qr/pgphi key "ssn_key" version 1 is retired/,
	'the warm session sees the retired version at its next query');
$reader->{stderr} = '';    # BackgroundPsql keeps stderr across queries

$node->safe_psql('postgres', q{
	UPDATE pgphi.key_versions v SET state = s.state, wrapped_dek = s.wrapped_dek
	  FROM saved_versions s WHERE s.key_id = v.key_id AND s.version = v.version;
});
is($reader->query_safe($count_ok), '1000', 'and decrypts again once it is back');

# A key retired while a statement is already running: the statement's first
# catalog lookup must see the committed change, and the session must not
# cache the key from the statement's older snapshot for later statements.
my $slow_session = IPC::Run::start(
	[ 'psql', '-X', '-d', $node->connstr('postgres'), '-v', 'ON_ERROR_STOP=0',
	  '-c', q{SELECT count(pgphi.decrypt_phi(p.ssn, 'ssn_key', p.mrn))
	            FROM (SELECT pg_sleep(2) OFFSET 0) s, patients p},
	  '-c', q{SELECT count(pgphi.decrypt_phi(ssn, 'ssn_key', mrn)) FROM patients} ],
	'>', \my $slow_out, '2>', \my $slow_err);
sleep 1;
$node->safe_psql('postgres', q{
	UPDATE pgphi.key_versions SET state = 'retired'
	 WHERE key_id = (SELECT key_id FROM pgphi.keys WHERE name = 'ssn_key');
});
$slow_session->finish;
my @retired = ($slow_err =~ /is retired/g);
is(scalar @retired, 2, 'a key retired during a running statement is refused there and afterwards');
is($slow_out, '', '... and no value was decrypted after the retirement committed');

# Catalog changes made with session_replication_role = replica (as logical
# replication applies them) invalidate too.
$node->safe_psql('postgres', q{
	UPDATE pgphi.key_versions v SET state = s.state, wrapped_dek = s.wrapped_dek
	  FROM saved_versions s WHERE s.key_id = v.key_id AND s.version = v.version;
});
my $warm = $node->background_psql('postgres', on_error_stop => 0);
is($warm->query_safe($count_ok), '1000', 'a warm session before a replica-mode change');
$node->safe_psql('postgres', q{
	SET session_replication_role = replica;
	UPDATE pgphi.key_versions SET state = 'retired'
	 WHERE key_id = (SELECT key_id FROM pgphi.keys WHERE name = 'ssn_key');
});
$warm->query($count_ok);
like($warm->{stderr}, qr/is retired/, 'a change made in replica mode reaches the warm session');
$warm->quit;
$node->safe_psql('postgres', q{
	UPDATE pgphi.key_versions v SET state = s.state, wrapped_dek = s.wrapped_dek
	  FROM saved_versions s WHERE s.key_id = v.key_id AND s.version = v.version;
});

# A cancelled decrypt-heavy query leaves the session usable.
$reader->query(q{SET statement_timeout = '300ms';
	SELECT count(pgphi.decrypt_phi(ssn, 'ssn_key', mrn))
	  FROM patients, generate_series(1, 100000)});
like($reader->{stderr}, qr/canceling statement due to statement timeout/,
	'a long decrypt scan is cancelled');
$reader->{stderr} = '';
$reader->query_safe('RESET statement_timeout');
is($reader->query_safe($count_ok), '1000', 'the session decrypts after the cancel');
$reader->quit;

# pg_dump includes the key catalog; a restore decrypts every value.
my $dump = $node->basedir . '/clinic.dump';
$node->command_ok(['pg_dump', '-Fc', '-d', $node->connstr('postgres'), '-f', $dump],
	'pg_dump of a database with encrypted columns');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
$node->command_ok(['pg_restore', '-d', $node->connstr('restored'), $dump], 'pg_restore');
is($node->safe_psql('restored', $count_ok), '1000', 'every value decrypts after restore');
is($node->safe_psql('restored', 'SELECT string_agg(key_id || name, \',\' ORDER BY key_id) FROM pgphi.keys'),
	'1ssn_key,2name_key', 'key ids are kept');
is($node->safe_psql('restored', "SELECT pgphi.create_key('mrn_key')"), '3',
	'the key id sequence is restored too');

$node->stop;
done_testing();
