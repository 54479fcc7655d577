# Rotation with reencrypt on a distributed table while pgbench writes and
# reads through the coordinator (issue 17): every read checks the value it
# decrypts against the one its row must hold, no transaction fails, and
# afterwards every row is on the active version and decrypts to its value.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use PgphiTest;
use CitusTest;

my ($coordinator, @workers) = CitusTest::new_cluster();
my $rows = 5000;
$coordinator->safe_psql('postgres', qq{
	SELECT pgphi.citus_setup();
	SELECT pgphi.create_key('ssn');
	CREATE TABLE patients (id int PRIMARY KEY, mrn text NOT NULL, ssn pgphi.encrypted);
	SELECT create_distributed_table('patients', 'id');
	INSERT INTO patients SELECT i, 'MRN-' || i, pgphi.encrypt_phi('ssn-' || i, 'ssn', 'MRN-' || i)
	  FROM generate_series(1, $rows) i;
});

# Each transaction: an update of a random row with a new ciphertext (Citus
# runs no UPDATE that calls a volatile function on its rows, so the value is
# made in a subquery, on the coordinator), an insert of a new row, and a
# read that fails the transaction if a value does not decrypt to its own.
my $dir = PostgreSQL::Test::Utils::tempdir();
my $script = "$dir/load.sql";
PostgreSQL::Test::Utils::append_to_file($script, <<"SQL");
\\set id random(1, $rows)
\\set new random(100000, 2000000000)
UPDATE patients SET ssn = (SELECT pgphi.encrypt_phi('ssn-' || :id, 'ssn', 'MRN-' || :id)) WHERE id = :id;
INSERT INTO patients VALUES (:new, 'MRN-' || :new, pgphi.encrypt_phi('ssn-' || :new, 'ssn', 'MRN-' || :new))
    ON CONFLICT (id) DO NOTHING;
SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(ssn, 'ssn', mrn) IS DISTINCT FROM 'ssn-' || id) AS wrong
  FROM patients WHERE id = :id \\gset
\\if :wrong
SELECT 'a value did not decrypt to its own' :: int;
\\endif
SQL
my ($out, $err) = ('', '');
my $load = IPC::Run::start([ 'pgbench', '--no-vacuum', '--client=4', '--jobs=2', '--time=40', '--file', $script,
		$coordinator->connstr('postgres') ], '>', \$out, '2>', \$err, IPC::Run::timeout(300));

sleep 3;
my @versions;
for my $round (1 .. 2)
{
	push @versions, $coordinator->safe_psql('postgres', q{SELECT pgphi.rotate_key('ssn')});
	my ($r_out, $r_err) = ('', '');
	my $ret = $coordinator->psql('postgres', q{CALL pgphi.reencrypt('patients', 'ssn', 500, 'mrn')},
		stdout => \$r_out, stderr => \$r_err);
	is($ret, 0, "rotation $round: reencrypt finished under load") or diag($r_err);
	like($r_err, qr/shard 8 of 8/, "rotation $round: ... over every shard");
}
ok($load->finish, 'pgbench exited normally') or diag("exit status $?: $err");
like($out, qr/number of failed transactions: 0 /, 'no transaction failed');
unlike($err, qr/client \d+ aborted/, 'no client aborted');
my ($done) = $out =~ /number of transactions actually processed: (\d+)/;
ok(($done // 0) > 100, "pgbench ran ($done transactions)");

# The last rotation's sweep may have run while writers still committed
# values under the version before; one more call leaves none.
$coordinator->safe_psql('postgres', q{CALL pgphi.reencrypt('patients', 'ssn', 500, 'mrn')});
my $active = $versions[-1];
is($coordinator->safe_psql('postgres', qq{SELECT count(*) FROM patients
	WHERE (pgphi.ciphertext_info(ssn)).key_version <> $active}), '0', "every row is on version $active");
is($coordinator->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE pgphi.decrypt_phi(ssn, 'ssn', mrn) = 'ssn-' || id)
	= count(*) FROM patients}), 't', 'every row decrypts to its own value');
is($coordinator->safe_psql('postgres', q{SELECT coalesce(sum("values"), 0) FROM pgphi.key_version_usage('ssn', 1)}),
	'0', 'no value is left under version 1');
is($coordinator->safe_psql('postgres', q{SELECT pgphi.retire_key_version('ssn', 1)}), '', 'version 1 retires');

done_testing();
