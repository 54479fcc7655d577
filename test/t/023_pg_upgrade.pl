# A major-version upgrade as a DBA runs it: a PostgreSQL 15 cluster with
# pgphi in use (keys of the local, Vault and AWS KMS providers, rotations,
# grants, an audit trail, deterministic and blind-index columns with their
# indexes, a protected column, and a second database still on 0.2.0) is
# upgraded with pg_upgrade to the PostgreSQL under test, in --copy and in
# --link mode. The local provider's KEK file and the seal counts file are
# carried over as the runbook in docs/versions-and-packages.md says. Then
# every value decrypts as before, the key catalog is unchanged, the
# searchable columns' lookups use their indexes, the audit chain verifies,
# the broker serves the new cluster, and ALTER EXTENSION pgphi UPDATE brings
# the 0.2.0 database to the current version.
#
# The old cluster's installation (PostgreSQL 15 with this checkout's pgphi)
# comes from PGPHI_OLD_INSTALL, which scripts/test.sh sets; it runs this in
# the pass of every version above 15.
use strict;
use warnings;

use Cwd;
use File::Copy;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;
use KeyManagerEmulator;

my ($new_major) = `pg_config --version` =~ /PostgreSQL (\d+)/;
my $old_install = $ENV{PGPHI_OLD_INSTALL} // '';
if ($new_major == 15)
{
	plan skip_all => 'pg_upgrade from PostgreSQL 15 is tested in the passes of 17 and 18 (PG_VERSIONS="15 17 18")';
}
if (!-x "$old_install/bin/postgres")
{
	# scripts/test.sh always provides it; only a hand-run prove lacks it.
	plan skip_all => 'PGPHI_OLD_INSTALL names no PostgreSQL 15 installation with pgphi (run through scripts/test.sh)';
}
my ($old_major) = `$old_install/bin/pg_config --version` =~ /PostgreSQL (\d+)/;
is($old_major, 15, "the old cluster runs PostgreSQL 15; the new one $new_major");

my $pki = KeyManagerEmulator::make_pki("$PostgreSQL::Test::Utils::tmp_check/pki");
my $emulator = KeyManagerEmulator->new(pki => $pki);
my $kms_key = $emulator->{kms_key};
my $vault_key = $emulator->{vault_key};
my $provider_settings = $emulator->postgres_settings;

# Checksums on in both clusters: 18's initdb enables them by default, and
# pg_upgrade requires old and new to agree.
my @initdb = (extra => [ '--data-checksums', '--locale=C', '--encoding=UTF8' ]);

sub configure
{
	my ($node) = @_;
	$node->append_conf('postgresql.conf', PgphiTest::log_settings() . $provider_settings . <<'CONF');
shared_preload_libraries = 'pgphi'
log_statement = none
CONF
}

# What must survive the upgrade, as text to compare: every value decrypted
# (one digest per column), the key catalog, the grants, the audit head, the
# seal counts, and the extension's version in each database.
my $snapshot_clinic = q{
	SELECT 'values', md5(string_agg(concat_ws('|', id, pgphi.decrypt_phi(ssn, 'ssn_key', mrn),
	                       pgphi.decrypt_phi(ssn_det), pgphi.decrypt_phi(vault_note), pgphi.decrypt_phi(kms_note),
	                       pgphi.decrypt_phi(diagnosis), encode(ssn_bidx, 'hex')), ',' ORDER BY id))
	  FROM clinic.patients
	UNION ALL
	SELECT 'keys', string_agg(concat_ws('|', key_id, name, provider, kek_ref, created_at, rotated_at), ',' ORDER BY key_id)
	  FROM pgphi.keys
	UNION ALL
	SELECT 'versions', string_agg(concat_ws('|', key_id, version, state, md5(wrapped_dek), kek_version, created_at),
	                              ',' ORDER BY key_id, version)
	  FROM pgphi.key_versions
	UNION ALL
	SELECT 'grants', string_agg(g::text, ',' ORDER BY g::text) FROM pgphi.key_grants g
	UNION ALL
	SELECT 'seal counts', string_agg(concat_ws('|', key_id, version, encryptions), ',' ORDER BY key_id, version)
	  FROM pgphi._usage_counts()
};
my $snapshot_legacy = q{
	SELECT 'legacy values', md5(string_agg(concat_ws('|', id, pgphi.decrypt_phi(ssn), pgphi.decrypt_phi(note)), ','
	                            ORDER BY id))
	  FROM records
	UNION ALL
	SELECT 'legacy keys', string_agg(concat_ws('|', key_id, version, state, md5(wrapped_dek)), ',' ORDER BY key_id, version)
	  FROM pgphi.key_versions
	UNION ALL
	SELECT 'legacy version', extversion FROM pg_extension WHERE extname = 'pgphi'
};

# The clinic database on the current version: every provider, rotations,
# grants, searchable columns with indexes, and a protected column.
my $setup_clinic = qq{
	SET client_min_messages = warning;
	CREATE EXTENSION pgphi;
	CREATE ROLE clerk LOGIN;
	CREATE ROLE outsider LOGIN;
	GRANT pgphi_decrypt TO clerk, outsider;
	SELECT pgphi.create_key('ssn_key');
	SELECT pgphi.create_key('det_key');
	SELECT pgphi.create_key('vault_notes', provider => 'vault', kek => '$vault_key');
	SELECT pgphi.create_key('kms_notes', provider => 'aws_kms', kek => '$kms_key');
	SELECT pgphi.create_key('dx_key');
	SELECT pgphi.create_blind_index_key('ssn_index', normalization => 'digits');
	CREATE SCHEMA clinic;
	GRANT USAGE ON SCHEMA clinic TO clerk, outsider;
	CREATE FUNCTION clinic.ssn_of(i integer) RETURNS text LANGUAGE sql IMMUTABLE
	    AS \$\$ SELECT overlay(overlay(lpad(i::text, 9, '0') PLACING '-' FROM 4 FOR 0) PLACING '-' FROM 7 FOR 0) \$\$;
	CREATE TABLE clinic.patients (id integer PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted,
	    ssn_det pgphi.encrypted, ssn_bidx bytea, vault_note pgphi.encrypted, kms_note pgphi.encrypted,
	    diagnosis text);
	CREATE INDEX patients_ssn_det ON clinic.patients (ssn_det);
	CREATE INDEX patients_ssn_bidx ON clinic.patients (ssn_bidx);
	GRANT SELECT ON clinic.patients TO clerk, outsider;
};
my $fill = q{
	INSERT INTO clinic.patients
	SELECT i, 'MRN-' || i, pgphi.encrypt_phi(clinic.ssn_of(i), 'ssn_key', 'MRN-' || i),
	       pgphi.encrypt_phi(clinic.ssn_of(i), 'det_key', deterministic => true),
	       pgphi.blind_index(clinic.ssn_of(i), 'ssn_index'),
	       pgphi.encrypt_phi('vault note ' || i, 'vault_notes'), pgphi.encrypt_phi('kms note ' || i, 'kms_notes'),
	       %s
	  FROM generate_series(%d, %d) i;
};
# The diagnosis column is plaintext until protect_column converts it.
my $plain_dx = q{'diagnosis ' || i};
my $encrypted_dx = q{pgphi.encrypt_phi('diagnosis ' || i, 'dx_key')};
my $after_fill = q{
	SELECT pgphi.grant_decrypt('ssn_key', 'clerk');
	SELECT pgphi.grant_decrypt('vault_notes', 'clerk');
	SELECT pgphi.grant_decrypt('kms_notes', 'clerk');
	SELECT pgphi.grant_decrypt('dx_key', 'clerk');
	SELECT pgphi.grant_decrypt('det_key', 'clerk');
	SELECT pgphi.revoke_decrypt('det_key', 'clerk');
	ANALYZE clinic.patients;
};

# The legacy database still on 0.2.0, with a rotated key.
my $setup_legacy = q{
	SET client_min_messages = warning;
	CREATE EXTENSION pgphi VERSION '0.2.0';
	SELECT pgphi.create_key('legacy_ssn');
	CREATE TABLE records (id integer PRIMARY KEY, ssn pgphi.encrypted, note pgphi.encrypted);
	INSERT INTO records SELECT i, pgphi.encrypt_phi('legacy ' || i, 'legacy_ssn'),
	       pgphi.encrypt_phi(jsonb_build_object('n', i), 'legacy_ssn') FROM generate_series(1, 200) i;
	SELECT pgphi.rotate_key('legacy_ssn');
	INSERT INTO records SELECT i, pgphi.encrypt_phi('legacy ' || i, 'legacy_ssn'),
	       pgphi.encrypt_phi(jsonb_build_object('n', i), 'legacy_ssn') FROM generate_series(201, 400) i;
};

sub uses_index
{
	my ($node, $query, $index) = @_;
	my $plan = $node->safe_psql('clinic', "SET search_path = public, pgphi; EXPLAIN (COSTS OFF) $query");
	return $plan =~ /Index (Only )?Scan using \Q$index\E|Bitmap Index Scan on \Q$index\E/ ? 1 : $plan;
}

for my $mode ('copy', 'link')
{
	# --- The PostgreSQL 15 cluster in use ----------------------------------
	my $old = PostgreSQL::Test::Cluster->new("old_$mode", install_path => $old_install);
	$old->init(@initdb);
	configure($old);
	$old->start;
	$old->safe_psql('postgres', 'CREATE DATABASE clinic; CREATE DATABASE legacy;');
	$old->safe_psql('clinic', $setup_clinic);
	$old->safe_psql('clinic', sprintf($fill, $plain_dx, 1, 2000));
	$old->safe_psql('clinic', q{
		SELECT pgphi.rotate_key('ssn_key');
		SELECT pgphi.rotate_key('vault_notes');
		SELECT pgphi.rotate_key('kms_notes');
	});
	$old->safe_psql('clinic', sprintf($fill, $plain_dx, 2001, 4000));
	$old->safe_psql('clinic', q{SELECT pgphi.rotate_key('ssn_key')});
	$old->safe_psql('clinic', sprintf($fill, $plain_dx, 4001, 5000));
	$old->safe_psql('clinic', $after_fill);
	# The plaintext column becomes an encrypted one in place.
	$old->safe_psql('clinic', q{CALL pgphi.protect_column('clinic.patients', 'diagnosis', 'dx_key', batch_size => 1000)});
	$old->safe_psql('legacy', $setup_legacy);
	is($old->safe_psql('clinic', q{SELECT format_type(atttypid, atttypmod) FROM pg_attribute
	                              WHERE attrelid = 'clinic.patients'::regclass AND attname = 'diagnosis'}),
		'pgphi.encrypted', "$mode: the protected column is encrypted before the upgrade");
	is(uses_index($old, q{SELECT id FROM clinic.patients
	                      WHERE ssn_det = pgphi.encrypt_phi('000-00-4242', 'det_key', deterministic => true)},
			'patients_ssn_det'), 1, "$mode: on 15 the deterministic lookup uses its index");

	# Decryptions below may add audit rows; the chain must still hold this head.
	my $audit_head = $old->safe_psql('clinic', q{SELECT head_hash FROM pgphi.verify_audit_log()});
	my $before = $old->safe_psql('clinic', $snapshot_clinic);
	my $legacy_before = $old->safe_psql('legacy', $snapshot_legacy);
	like($before, qr/^seal counts\|\d/m, "$mode: the old cluster has seal counts to carry over");
	like($legacy_before, qr/^legacy version\|0\.2\.0$/m, "$mode: the legacy database holds 0.2.0");

	# --- The upgrade, as the runbook says ----------------------------------
	my $new = PostgreSQL::Test::Cluster->new("new_$mode");
	$new->init(@initdb);
	configure($new);

	# Debian's 15.20 (a security release) gives every column an attribute
	# option pg_attver that 17.11 and 18.6 (the newest releases served here)
	# do not know, so their pg_upgrade fails on any table at all, pgphi's or
	# not. When the new server refuses the option, the old cluster's columns
	# lose it first (runbook, step "older target release").
	$new->start;
	my ($refused) = $new->psql('postgres',
		'CREATE TEMP TABLE probe (a int); ALTER TABLE probe ALTER COLUMN a SET (pg_attver = 1)');
	$new->stop;
	my $marked = $old->safe_psql('clinic',
		q{SELECT count(*) FROM pg_attribute WHERE attrelid >= 16384 AND attoptions::text LIKE '%pg_attver=%'});
	if ($refused != 0 && $marked > 0)
	{
		diag("$mode: the old server marks columns with pg_attver, which PostgreSQL $new_major here refuses; "
			  . 'removing the marks before pg_upgrade');
		for my $db (split /\n/, $old->safe_psql('postgres', 'SELECT datname FROM pg_database WHERE datallowconn'))
		{
			$old->safe_psql($db, q{
				UPDATE pg_attribute
				   SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o WHERE o NOT LIKE 'pg_attver=%'), '{}')
				 WHERE attrelid >= 16384 AND attoptions::text LIKE '%pg_attver=%'});
		}
	}
	$old->stop;
	# The KEK file of the local provider and the seal counts live in the data
	# directory, outside the relations pg_upgrade moves: copied by hand, with
	# the old server stopped, before the new one first starts.
	for my $file ('pgphi_local.kek', 'pgphi_dek_usage')
	{
		ok(-e $old->data_dir . "/$file", "$mode: the old data directory holds $file");
		copy($old->data_dir . "/$file", $new->data_dir . "/$file") or die "copy $file: $!";
		chmod 0600, $new->data_dir . "/$file";
	}
	my $workdir = PostgreSQL::Test::Utils::tempdir;
	my $cwd = Cwd::getcwd();
	chdir $workdir;
	my ($stdout, $stderr);
	my $upgraded = IPC::Run::run(
		[ 'pg_upgrade', '--no-sync', "--$mode",
		  '-d', $old->data_dir, '-D', $new->data_dir,
		  '-b', $old->config_data('--bindir'), '-B', $new->config_data('--bindir'),
		  '-s', $new->host, '-p', $old->port, '-P', $new->port ],
		'>', \$stdout, '2>', \$stderr);
	chdir $cwd;
	ok($upgraded, "$mode: pg_upgrade from 15 to $new_major succeeds")
	  or diag("pg_upgrade:\n$stdout\n$stderr\n"
		  . join("\n", map { "$_:\n" . slurp_file($_) } glob($new->data_dir . '/pg_upgrade_output.d/*/log/*.log')));
	$emulator->reset_stats;
	$new->start;

	# --- Everything as before ----------------------------------------------
	# The statistics stay behind on 17 (18 carries most of them): the runbook
	# analyzes first, as pg_upgrade advises.
	$new->safe_psql('clinic', 'ANALYZE');
	is($new->safe_psql('clinic', $snapshot_clinic), $before,
		"$mode: on $new_major every value decrypts as before, and the key catalog, grants and seal counts are unchanged");
	is($new->safe_psql('legacy', $snapshot_legacy), $legacy_before, "$mode: so do the 0.2.0 database's values and keys");

	is(uses_index($new, q{SELECT id FROM clinic.patients
	                      WHERE ssn_det = pgphi.encrypt_phi('000-00-4242', 'det_key', deterministic => true)},
			'patients_ssn_det'), 1, "$mode: the deterministic lookup uses its index");
	is(uses_index($new, q{SELECT id FROM clinic.patients WHERE ssn_bidx = pgphi.blind_index('000 00 4242', 'ssn_index')},
			'patients_ssn_bidx'), 1, "$mode: the blind-index lookup uses its index");
	is($new->safe_psql('clinic', q{
		SET search_path = public, pgphi;
		SELECT string_agg(id::text, ',' ORDER BY id) FROM clinic.patients
		 WHERE ssn_det = pgphi.encrypt_phi('000-00-4242', 'det_key', deterministic => true)
		    OR ssn_bidx = pgphi.blind_index('000 00 3141', 'ssn_index')}), '3141,4242',
		"$mode: and they find the rows");
	is($new->safe_psql('clinic', qq{SELECT intact FROM pgphi.verify_audit_log('$audit_head')}), 't',
		"$mode: the audit chain verifies and still holds the head recorded before the upgrade");

	# The broker serves the new cluster: every provider's keys are unwrapped
	# again by the key manager (the cache was empty at the start).
	is($new->safe_psql('clinic', q{
		SELECT pgphi.decrypt_phi(vault_note) || ' / ' || pgphi.decrypt_phi(kms_note) || ' / ' || pgphi.decrypt_phi(diagnosis)
		  FROM clinic.patients WHERE id = 17}), 'vault note 17 / kms note 17 / diagnosis 17',
		"$mode: values of the Vault, AWS KMS and local providers decrypt through the broker");
	my $stats = $emulator->stats;
	ok(($stats->{vault}{decrypt} // 0) > 0 && ($stats->{kms}{Decrypt} // 0) > 0,
		"$mode: Vault and AWS KMS were asked by the new cluster's broker");
	like($new->safe_psql('clinic', q{SELECT count(*) FROM pgphi.broker_processes()}), qr/^[1-9]/,
		"$mode: the key brokers run");

	# The grants hold: the clerk decrypts, the outsider does not.
	is($new->safe_psql('clinic', q{SELECT pgphi.decrypt_phi(ssn, 'ssn_key', mrn) FROM clinic.patients WHERE id = 5},
			extra_params => [ '-U', 'clerk' ]), '000-00-0005', "$mode: a granted role decrypts");
	my ($ret, $out, $err) = $new->psql('clinic', q{SELECT pgphi.decrypt_phi(ssn, 'ssn_key', mrn) FROM clinic.patients WHERE id = 5},
		extra_params => [ '-U', 'outsider' ]);
	like($err, qr/permission denied/, "$mode: a role without the grant is refused");

	# Keys keep working: a rotation, new rows, the protected column's trigger.
	$new->safe_psql('clinic', q{SELECT pgphi.rotate_key('ssn_key'); SELECT pgphi.rotate_key('kms_notes')});
	$new->safe_psql('clinic', sprintf($fill, $encrypted_dx, 5001, 5100));
	is($new->safe_psql('clinic', q{
		SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(ssn, 'ssn_key', mrn) = clinic.ssn_of(id)
		                          AND pgphi.decrypt_phi(kms_note) = 'kms note ' || id
		                          AND pgphi.decrypt_phi(diagnosis) = 'diagnosis ' || id)
		  FROM clinic.patients}), 5100, "$mode: after a rotation on $new_major, old and new rows decrypt");
	is($new->safe_psql('clinic', q{SELECT max(version) FROM pgphi.key_versions JOIN pgphi.keys USING (key_id)
	                              WHERE name = 'ssn_key'}), 4, "$mode: the rotation continued the version numbers");

	# The 0.2.0 database updates to the current version.
	my $default = $new->safe_psql('legacy', q{SELECT default_version FROM pg_available_extensions WHERE name = 'pgphi'});
	$new->safe_psql('legacy', 'ALTER EXTENSION pgphi UPDATE');
	is($new->safe_psql('legacy', q{SELECT extversion FROM pg_extension WHERE extname = 'pgphi'}), $default,
		"$mode: ALTER EXTENSION pgphi UPDATE brings the 0.2.0 database to $default");
	is($new->safe_psql('legacy', q{SELECT count(*) FROM records
	                              WHERE pgphi.decrypt_phi(ssn) = 'legacy ' || id
	                                AND pgphi.decrypt_phi_jsonb(note) = jsonb_build_object('n', id)}), 400,
		"$mode: and its values decrypt after the update");
	is($new->safe_psql('legacy', q{SELECT intact FROM pgphi.verify_audit_log()}), 't',
		"$mode: its audit chain verifies after the update");

	$new->stop;
}

done_testing();
