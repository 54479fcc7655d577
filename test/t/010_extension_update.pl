# The upgrade path: a database that installed a released version of pgphi,
# with keys, rotations and encrypted data, runs ALTER EXTENSION pgphi UPDATE
# and then decrypts everything, keeps its key catalog, works as before, and
# holds exactly the objects a fresh installation of the new version holds.
# Released scripts are guarded by their checksums (test/released_scripts.sha256).
use strict;
use warnings;

use Digest::SHA;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('update');

# Released scripts are exactly as released.
my $extension_dir = $node->config_data('--sharedir') . '/extension';
my %released;    # script file name => checksum
open my $list, '<', "$ENV{PGPHI_TEST_DIR}/released_scripts.sha256" or die "released_scripts.sha256: $!";
while (<$list>)
{
	next if /^\s*(#|$)/;
	/^([0-9a-f]{64})  (pgphi--[0-9.]+(?:--[0-9.]+)?\.sql)$/ or die "bad line in released_scripts.sha256: $_";
	$released{$2} = $1;
}
close $list;
ok(exists $released{'pgphi--0.1.0.sql'}, 'the checksum list names the first release, 0.1.0');
for my $script (sort keys %released)
{
	my $file = "$extension_dir/$script";
	is(-e $file ? Digest::SHA->new(256)->addfile($file)->hexdigest : 'missing', $released{$script},
		"released script $script is unchanged");
}
# A released version is one whose script is listed; any installed script that
# leads to a released version must be listed too, or it escapes the guard.
my %released_versions = map { /--([0-9.]+)\.sql$/ ? ($1 => 1) : () } keys %released;
for my $file (glob "$extension_dir/pgphi--*.sql")
{
	(my $script = $file) =~ s{.*/}{};
	my ($target) = $script =~ /--([0-9.]+)\.sql$/;
	ok(exists $released{$script}, "$script, leading to released version $target, is in the checksum list")
	  if $released_versions{$target};
}

my $default_version = $node->safe_psql('postgres',
	q{SELECT default_version FROM pg_available_extensions WHERE name = 'pgphi'});
ok(!exists $released_versions{$default_version} && !exists $released{"pgphi--$default_version.sql"},
	"the version in progress, $default_version, is not a released one");

# Every released version installs (through its install script, or the chain
# of released scripts that leads to it) and updates. A new installation of
# the version in progress runs its own install script, generated from
# src/sql/; the updated databases ran the update scripts instead, so the
# comparisons below are what keeps the two paths alike.
my @install_versions = sort keys %released_versions;

# Keys of both kinds of history and values of every type, made by the old
# version: a rotated key whose data spans two versions, a key whose data was
# re-encrypted and whose old version was retired, text, bytea and jsonb values,
# the encrypted type and a plain bytea column, with and without context.
my $make_data = q{
	SET client_min_messages = error;
	SELECT pgphi.create_key('ssn_key');
	SELECT pgphi.create_key('notes_key');
	CREATE SCHEMA app;
	CREATE TABLE app.patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted,
	                           photo bytea, chart pgphi.encrypted, notes pgphi.encrypted);
	INSERT INTO app.patients
	SELECT i, 'MRN-' || i,
	       pgphi.encrypt_phi(lpad(i::text, 9, '0'), 'ssn_key', 'MRN-' || i),
	       pgphi.encrypt_phi(sha256(i::text::bytea), 'ssn_key'),
	       pgphi.encrypt_phi(jsonb_build_object('id', i, 'allergies', jsonb_build_array('penicillin')), 'notes_key'),
	       pgphi.encrypt_phi('note ' || i, 'notes_key', 'MRN-' || i)
	  FROM generate_series(1, 500) i;
	SELECT pgphi.rotate_key('ssn_key');
	INSERT INTO app.patients
	SELECT i, 'MRN-' || i,
	       pgphi.encrypt_phi(lpad(i::text, 9, '0'), 'ssn_key', 'MRN-' || i),
	       pgphi.encrypt_phi(sha256(i::text::bytea), 'ssn_key'),
	       pgphi.encrypt_phi(jsonb_build_object('id', i, 'allergies', jsonb_build_array('penicillin')), 'notes_key'),
	       pgphi.encrypt_phi('note ' || i, 'notes_key', 'MRN-' || i)
	  FROM generate_series(501, 1000) i;
	SELECT pgphi.rotate_key('notes_key');
	CALL pgphi.reencrypt('app.patients', 'chart', 200);
	CALL pgphi.reencrypt('app.patients', 'notes', 200, context_column => 'mrn');
	SELECT pgphi.retire_key_version('notes_key', 1);
};

# Everything that must not change: each value's plaintext, and the catalog.
my $plaintexts = q{
	SELECT count(*), md5(string_agg(concat_ws('|', pgphi.decrypt_phi(ssn, 'ssn_key', mrn),
	                                            encode(pgphi.decrypt_phi_bytea(photo, 'ssn_key'), 'hex'),
	                                            pgphi.decrypt_phi_jsonb(chart)::text,
	                                            pgphi.decrypt_phi(notes, 'notes_key', mrn)), ',' ORDER BY id))
	  FROM app.patients};
my $catalog = q{
	SELECT string_agg(concat_ws(' ', k.key_id, k.name, k.provider, k.kek_ref, v.version, v.state,
	                            encode(v.wrapped_dek, 'hex'), v.kek_version), E'\n' ORDER BY k.key_id, v.version)
	  FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id)};
my $versions_in_use = q{
	SELECT string_agg(format('%s %s', i.key_id, i.key_version), ',' ORDER BY i.key_id, i.key_version)
	  FROM (SELECT DISTINCT (pgphi.ciphertext_info(c)).key_id, (pgphi.ciphertext_info(c)).key_version FROM app.patients,
	        LATERAL (VALUES (ssn), (photo::pgphi.encrypted), (chart), (notes)) v(c)) i};

# The extension's objects, as described by the catalogs and by pg_dump.
my $members = q{
	SELECT string_agg(pg_describe_object(classid, objid, objsubid), E'\n'
	                  ORDER BY pg_describe_object(classid, objid, objsubid))
	  FROM pg_depend
	 WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
	   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pgphi')};
my $config = q{
	SELECT extversion, extconfig::regclass[], extcondition FROM pg_extension WHERE extname = 'pgphi'};

# pg_dump prints an extension's member objects one by one only in its
# binary-upgrade mode. What depends on the database's history rather than on
# the objects is left out: object ids and transaction ids it preserves there,
# the sequence's position, the random key of \restrict, and the "missing
# values" PostgreSQL keeps for a column that ALTER TABLE ADD COLUMN gave a
# default without rewriting the table (an update adds such columns; a new
# installation creates the table with them; the default itself is compared).
sub extension_ddl
{
	my ($db) = @_;
	my ($out, $err) = run_command(
		[ 'pg_dump', '--schema-only', '--binary-upgrade', '--exclude-schema=app', '-d', $node->connstr($db) ]);
	die "pg_dump $db: $err" if $err;
	$out =~ s/^(SET relfrozenxid = |WHERE oid = )'\d+'/$1'(id)'/mg;
	$out =~ s/^-- set missing value\.\nSELECT pg_catalog\.binary_upgrade_set_missing_value\(.*\);\n\n\n//mg;
	return join "\n", grep {
		!/binary_upgrade_set_next_|binary_upgrade_create_empty_extension|For binary upgrade, must preserve|
		   ^SELECT\ pg_catalog\.setval\(|^\\(un)?restrict\ /x
	} split /\n/, $out;
}

# What differs, as a unified diff.
sub ddl_diff
{
	my ($updated, $fresh) = @_;
	my $dir = $node->basedir;
	append_to_file("$dir/updated.sql", $updated);
	append_to_file("$dir/fresh.sql", $fresh);
	my ($diff) = run_command([ 'diff', '-u', "$dir/fresh.sql", "$dir/updated.sql" ]);
	return $diff;
}

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION pgphi');
is($node->safe_psql('fresh', q{SELECT extversion FROM pg_extension WHERE extname = 'pgphi'}),
	$default_version, "a fresh installation is at $default_version");

# A reader who, under 0.1.0, could decrypt every key through its role alone.
$node->safe_psql('postgres', 'CREATE ROLE legacy_reader; GRANT pgphi_decrypt TO legacy_reader;');

for my $from (@install_versions)
{
	my $db = "from_$from";
	$db =~ tr/./_/;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION pgphi VERSION '$from'");
	is($node->safe_psql($db, q{SELECT extversion FROM pg_extension WHERE extname = 'pgphi'}), $from,
		"installed version $from");
	$node->safe_psql($db, $make_data);

	my $plain_before = $node->safe_psql($db, $plaintexts);
	like($plain_before, qr/^1000\|/, "$from: 1000 rows of data, every value decrypts");
	my $catalog_before = $node->safe_psql($db, $catalog);
	is($node->safe_psql($db, $versions_in_use), '1 1,1 2,2 2', "$from: values on both ssn_key versions");

	$node->safe_psql($db, 'ALTER EXTENSION pgphi UPDATE');
	is($node->safe_psql($db, q{SELECT extversion FROM pg_extension WHERE extname = 'pgphi'}),
		$default_version, "$from: ALTER EXTENSION pgphi UPDATE reaches $default_version");

	# A new session: no key cached from before the update.
	is($node->safe_psql($db, $plaintexts), $plain_before, "$from: after the update every value decrypts as before");
	is($node->safe_psql($db, $catalog), $catalog_before, "$from: the key catalog is unchanged");

	# 0.2.0 adds per-key grants: existing keys keep 0.1.0's behaviour as
	# audited grants to the two roles; a key created now starts with none.
	$node->safe_psql($db, 'GRANT USAGE ON SCHEMA app TO legacy_reader; GRANT SELECT ON app.patients TO legacy_reader');
	if ($from eq '0.1.0')
	{
		is($node->safe_psql($db, q{SET ROLE legacy_reader; SELECT count(pgphi.decrypt_phi(ssn, 'ssn_key', mrn)) FROM app.patients}),
			'1000', "$from: a pgphi_decrypt member still decrypts the existing keys");
		# (A volume alert may come in between: the test's decrypts are a new
		# role's first volume, which alerts by design.)
		like($node->safe_psql($db, q{SELECT string_agg(format('%s %s %s', action, key_name, detail), ',' ORDER BY key_name, action)
		                               FROM pgphi.audit_log WHERE action <> 'alert'}),
			qr/^grant_decrypt notes_key to pgphi_decrypt,grant_encrypt notes_key to pgphi_encrypt,grant_member notes_key decrypt grant to pgphi_decrypt covers legacy_reader \(member when granted\),grant_decrypt ssn_key to pgphi_decrypt,grant_encrypt ssn_key to pgphi_encrypt,grant_member ssn_key decrypt grant to pgphi_decrypt covers legacy_reader \(member when granted\)$/,
			"$from: those grants, and the members they cover (0.3.0), are the audit log's first entries");
	}
	$node->safe_psql($db, q{
		SELECT pgphi.create_key('new_key');
		CREATE TABLE app.fresh AS SELECT pgphi.encrypt_phi('x', 'new_key') AS v;
		GRANT SELECT ON app.fresh TO legacy_reader;
	});
	like(PgphiTest::psql_error($node, $db, q{SET ROLE legacy_reader; SELECT pgphi.decrypt_phi(v) FROM app.fresh}),
		qr/42501: permission denied to decrypt with pgphi key "new_key"/, "$from: a key created after the update has no grants");

	is($node->safe_psql($db, $members), $node->safe_psql('fresh', $members),
		"$from: the updated extension has the members of a fresh $default_version");
	is($node->safe_psql($db, $config), $node->safe_psql('fresh', $config),
		"$from: ... the same configuration tables");
	my ($updated_ddl, $fresh_ddl) = (extension_ddl($db), extension_ddl('fresh'));
	ok(length($fresh_ddl) > 10000 && $fresh_ddl =~ /CREATE FUNCTION pgphi\.rotate_key/,
		'pg_dump describes the extension object by object');
	ok($updated_ddl eq $fresh_ddl, "$from: ... and pg_dump describes each object alike (definitions, grants, owners)")
	  or diag(ddl_diff($updated_ddl, $fresh_ddl));

	# The old functions keep working on the updated database. (Functions that
	# a later version adds are exercised by the regression suite on a fresh
	# installation, and the checks above show that the updated database has
	# the very same objects.)
	$node->safe_psql($db, q{
		INSERT INTO app.patients
		SELECT 1001, 'MRN-1001', pgphi.encrypt_phi('000001001', 'ssn_key', 'MRN-1001'),
		       pgphi.encrypt_phi(sha256('1001'::bytea), 'ssn_key'),
		       pgphi.encrypt_phi('{"id": 1001, "allergies": ["penicillin"]}'::jsonb, 'notes_key'),
		       pgphi.encrypt_phi('note 1001', 'notes_key', 'MRN-1001');
	});
	is($node->safe_psql($db, 'SELECT pgphi.rotate_key(\'ssn_key\')'), '3', "$from: rotate_key after the update");
	$node->safe_psql($db, q{
		CALL pgphi.reencrypt('app.patients', 'ssn', 300, context_column => 'mrn');
		CALL pgphi.reencrypt('app.patients', 'photo', 300);
	});
	is($node->safe_psql($db, $versions_in_use), '1 3,2 2', "$from: reencrypt moved every value to the new version");
	is($node->safe_psql($db, 'SELECT pgphi.rewrap_keys()'), '6', "$from: rewrap_keys rewraps the six live versions");
	$node->safe_psql($db, q{SELECT pgphi.retire_key_version('ssn_key', 1), pgphi.retire_key_version('ssn_key', 2)});
	like($node->safe_psql($db, $plaintexts), qr/^1001\|/, "$from: all 1001 rows decrypt");
	is($node->safe_psql($db, q{
		SELECT count(*) FROM app.patients
		 WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) = lpad(id::text, 9, '0')
		   AND pgphi.decrypt_phi_bytea(photo) = sha256(id::text::bytea)
		   AND pgphi.decrypt_phi_jsonb(chart) = jsonb_build_object('id', id, 'allergies', jsonb_build_array('penicillin'))
		   AND pgphi.decrypt_phi(notes, 'notes_key', mrn) = 'note ' || id}), '1001',
		"$from: every value decrypts to what was encrypted");
	is($node->safe_psql($db, q{SELECT string_agg(format('%s %s %s', key_name, version, state), ',')
	                             FROM pgphi.key_usage()}),
		'new_key 1 active,notes_key 1 retired,notes_key 2 active,ssn_key 1 retired,ssn_key 2 retired,ssn_key 3 active',
		"$from: key_usage lists every version");
}

$node->stop;
done_testing();
