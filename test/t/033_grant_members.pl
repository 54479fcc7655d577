# A key grant to a group covers the members the group had when a custodian
# made it, not the roles someone adds later (docs/access-control-and-audit.md,
# "Grants to groups and later members"). The roles are as in production:
# two custodians and a role admin who may add members to the group but holds
# no key right of its own.
#   - a member added after the grant is refused (42501, audited), and so is a
#     member of that member; has_key_privilege and access_review agree;
#   - the role admin cannot approve the member it added, nor can the member;
#     another custodian can, and that is audited;
#   - a revoke takes the records with it, a new grant covers the members then;
#   - an update from 0.2.0 keeps every existing member's access.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('grant_members');
$node->safe_psql('postgres', q{
	CREATE EXTENSION pgphi;
	CREATE ROLE c1 LOGIN; CREATE ROLE c2 LOGIN; GRANT pgphi_key_custodian TO c1, c2;
	CREATE ROLE ward; CREATE ROLE early LOGIN; CREATE ROLE late LOGIN; CREATE ROLE later LOGIN;
	CREATE ROLE team;
	GRANT pgphi_decrypt TO early, late, later;
	GRANT ward TO early;
	CREATE ROLE ward_admin LOGIN;
	GRANT ward TO ward_admin WITH ADMIN OPTION;
	GRANT team TO ward_admin WITH ADMIN OPTION;
	GRANT pgphi_key_custodian TO ward_admin;
	SELECT pgphi.create_key('k');
	CREATE TABLE t (id int, v pgphi.encrypted);
	INSERT INTO t VALUES (1, pgphi.encrypt_phi('phi-1', 'k'));
	GRANT SELECT ON t TO early, late, later;
	-- The ward may decrypt as a role too (for SECURITY DEFINER functions it owns).
	GRANT pgphi_decrypt TO ward; GRANT SELECT ON t TO ward;
	CREATE SCHEMA ws AUTHORIZATION ward;
	CREATE ROLE intruder LOGIN; CREATE ROLE client LOGIN;
});
# c1 grants the key to the ward, whose only member is early.
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.grant_decrypt('k', 'ward')});

my $read = q{SELECT pgphi.decrypt_phi(v, 'k') FROM t WHERE id = 1};
sub read_as
{
	my ($role) = @_;
	return $node->psql('postgres', "SET ROLE $role; $read");
}
sub refusal_as
{
	my ($role) = @_;
	return PgphiTest::psql_error($node, 'postgres', "SET ROLE $role; $read");
}
sub has_key
{
	my ($role) = @_;
	return $node->safe_psql('postgres', "SELECT pgphi.has_key_privilege('$role', 'k', 'decrypt')");
}
sub in_force
{
	my ($role) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(bool_or(in_force)::text, 'none') FROM pgphi.access_review() WHERE role_name = '$role'");
}

is((read_as('early'))[1], 'phi-1', 'a member when the grant was made decrypts');
is(has_key('early'), 't', 'has_key_privilege agrees');

# The role admin adds late to the ward, and late to the team; later joins
# the team only once the team is in the ward.
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; GRANT ward TO late; GRANT ward TO team});
like(refusal_as('late'), qr/42501: permission denied to decrypt with pgphi key "k"/,
	'a role added to the group after the grant is refused');
like(refusal_as('late'), qr/joined after the grant was made/, 'the refusal says why');
is(has_key('late'), 'f', 'has_key_privilege says no');
is(in_force('late'), 'false', 'access_review shows it not in force');
ok($node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE action = 'decrypt' AND outcome = 'refused' AND acting_role = 'late'
	  AND detail = 'member not covered by the grant')}), 'the refusal is audited');

# A later member cannot become the group to get around it: not by SET ROLE,
# nor through a SECURITY DEFINER function it writes as the group, whoever
# calls it. While the ward has members its grant does not cover, nobody uses
# the grant as the ward itself, not even a covered member.
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; GRANT ward TO intruder});
like(PgphiTest::psql_error($node, 'postgres', "SET SESSION AUTHORIZATION intruder; SET ROLE ward; $read"),
	qr/42501: .*Role "ward" has members that joined after the key was granted to role "ward"/s,
	'a later member is refused after SET ROLE to the group');
like(PgphiTest::psql_error($node, 'postgres', "SET SESSION AUTHORIZATION early; SET ROLE ward; $read"),
	qr/42501: .*Role "ward" has members that joined after/s, 'and so is a covered member acting as the group meanwhile');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION intruder; SET ROLE ward;
	CREATE FUNCTION ws.peek() RETURNS text LANGUAGE sql SECURITY DEFINER
		AS $$ SELECT pgphi.decrypt_phi(v, 'k') FROM public.t WHERE id = 1 $$;
	GRANT EXECUTE ON FUNCTION ws.peek() TO client;
	GRANT USAGE ON SCHEMA ws TO client});
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION intruder; SELECT ws.peek()}),
	qr/42501: .*Role "ward" has members that joined after/s,
	'a later member is refused through a SECURITY DEFINER function it wrote as the group');
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION client; SELECT ws.peek()}),
	qr/42501: .*Role "ward" has members that joined after/s, 'and so is anyone else who calls it');
ok($node->poll_query_until('postgres', q{SELECT EXISTS (SELECT FROM pgphi.audit_log
	WHERE action = 'decrypt' AND outcome = 'refused' AND acting_role = 'ward'
	  AND detail = 'role has members not covered')}), 'those refusals are audited');
# Memberships are revoked by the role that granted them: from PostgreSQL 16
# on, a superuser's REVOKE removes only grants made by itself. ward_admin is
# no superuser, so this also shows a role admin's REVOKE prunes the records.
$node->safe_psql('postgres', q{DROP FUNCTION ws.peek(); SET SESSION AUTHORIZATION ward_admin; REVOKE ward FROM intruder});

# Approval: not by whoever added the member, not by the member itself.
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION ward_admin;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'late')}),
	qr/42501: role "ward_admin" made role late a member, and cannot also approve/,
	'the role admin who added the member cannot approve it');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; GRANT ward TO c2});
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'c2')}),
	qr/42501: role "c2" cannot approve its own use of pgphi key "k"/, 'a custodian cannot approve itself');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; REVOKE ward FROM c2});
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION late;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'late')}),
	qr/42501: permission denied for function approve_grant_member/,
	'the member cannot approve itself');
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'nobody_here')}),
	qr/role "nobody_here" does not exist/, 'an unknown role is refused');
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'later')}),
	qr/22023: role later is not a member of role ward/, 'a role outside the group is refused');
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'encrypt', 'ward', 'late')}),
	qr/42704: role ward holds no encrypt grant on pgphi key "k"/, 'a grant that does not exist is refused');
is($node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'late')}), '1', 'another custodian approves');
is((read_as('late'))[1], 'phi-1', 'the approved member decrypts');
is(has_key('late'), 't', 'has_key_privilege says yes');
is(in_force('late'), 'true', 'access_review shows it in force');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log
	WHERE action = 'grant_member' AND acting_role = 'c2' AND detail = 'decrypt grant to ward covers late (approved)'}),
	'1', 'the approval is audited');

# The team joined the ward after the grant; later joins the team now.
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; GRANT team TO later});
like(refusal_as('later'), qr/42501: .*joined after the grant was made/s,
	'a member of a role added later is refused too');
is($node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'team')}), '2',
	'approving a group covers its members now (team and later)');
is((read_as('later'))[1], 'phi-1', 'then its member decrypts');
is($node->safe_psql('postgres', "SET SESSION AUTHORIZATION early; SET ROLE ward; $read"), 'phi-1',
	'once every member is covered, a member may act as the group');

# Revoking takes the records with it; a new grant covers the members then.
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.revoke_decrypt('k', 'ward')});
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.key_grant_members}), '0',
	'a revoked grant leaves no member records');
like(refusal_as('early'), qr/42501: .*holds no decrypt grant/s, 'a revoked grant covers nobody');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.grant_decrypt('k', 'ward')});
is($node->safe_psql('postgres', q{SELECT string_agg(member::text || ':' || reason, ',' ORDER BY member::text)
	FROM pgphi.key_grant_members}),
	'early:member when granted,late:member when granted,later:member when granted,team:member when granted,'
	  . 'ward_admin:member when granted',
	'a new grant covers the members the group has now');
is((read_as('later'))[1], 'phi-1', 'and they decrypt');

# A superuser's direct DML on the records is audited like every catalog change.
$node->safe_psql('postgres', q{DELETE FROM pgphi.key_grant_members WHERE member = 'later'::regrole});
like(refusal_as('later'), qr/42501: .*joined after the grant was made/s, 'a deleted record takes the access');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log
	WHERE action = 'catalog_delete' AND detail LIKE '%key_grant_members%'}), '1',
	'the direct delete is audited');

# A role that leaves the group loses its record (REVOKE in this database):
# added again, it is a later member again. Audited as forget_member.
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; REVOKE ward FROM late});
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.key_grant_members WHERE member = 'late'::regrole}), '0',
	'REVOKE removes the record of the role that left');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log
	WHERE action = 'forget_member' AND detail = 'decrypt grant to ward no longer covers late: no longer a member'}),
	'1', 'and the audit log says so');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION ward_admin; GRANT ward TO late});
like(refusal_as('late'), qr/42501: .*joined after the grant was made/s, 'added again, it is refused again');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c2; SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'late')});

# Widening a grant to a group takes two custodians, as a group-wide grant does.
$node->safe_psql('postgres', q{
	CREATE ROLE staff; SELECT format('CREATE ROLE s%s; GRANT staff TO s%s', i, i) FROM generate_series(1, 11) i \gexec
	GRANT staff TO ward_admin WITH ADMIN OPTION;
	SET SESSION AUTHORIZATION ward_admin; GRANT ward TO staff;
});
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'staff')}),
	qr/42501: extending the grant of pgphi key "k" to staff needs the approval of a second key custodian/,
	'approving a member that brings more than ten roles needs a second custodian');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c1; SELECT pgphi.approve_grant('k', 'staff', 'decrypt')});
is($node->safe_psql('postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'staff')}), '12',
	'with another custodian\'s approve_grant it adds the group and its members');

# Whoever made a membership on the way cannot approve, also through a role
# it belongs to.
$node->safe_psql('postgres', q{
	CREATE ROLE helper; GRANT ward TO helper WITH ADMIN OPTION; GRANT helper TO c2;
	CREATE ROLE staff2;
	SET SESSION AUTHORIZATION c2; SET ROLE helper; GRANT ward TO staff2;
});
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION c2;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'staff2')}),
	qr/42501: role "c2" made role staff2 a member, and cannot also approve/,
	'a membership made through a role the approver belongs to counts as the approver\'s');

# A LOGIN grantee with a later member: the member could set its password and
# log in as it, so the grantee's own sessions are refused too, until the
# member is approved or gone.
$node->safe_psql('postgres', q{
	CREATE ROLE svc LOGIN; GRANT pgphi_decrypt TO svc; GRANT SELECT ON t TO svc;
	CREATE ROLE svc_admin LOGIN; GRANT svc TO svc_admin WITH ADMIN OPTION;
	SET SESSION AUTHORIZATION c1; SELECT pgphi.grant_decrypt('k', 'svc');
});
is($node->safe_psql('postgres', "SET SESSION AUTHORIZATION svc; $read"), 'phi-1', 'a LOGIN grantee decrypts');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION svc_admin; GRANT svc TO intruder});
like(PgphiTest::psql_error($node, 'postgres', "SET SESSION AUTHORIZATION svc; $read"),
	qr/42501: .*Role "svc" has members that joined after/s,
	'its own sessions are refused while it has a member the grant does not cover');
# Role admins and roles themselves still change memberships and passwords in
# this database (the records are pruned as the extension's owner).
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION svc_admin; REVOKE svc FROM intruder});
is($node->safe_psql('postgres', "SET SESSION AUTHORIZATION svc; $read"), 'phi-1',
	'a role admin\'s REVOKE works, and the grantee decrypts again');
$node->safe_psql('postgres', q{SET SESSION AUTHORIZATION svc; ALTER ROLE svc PASSWORD 'changed-by-itself'});
pass('a role changes its own password in this database');

# A custodian who administers the group cannot approve its members.
$node->safe_psql('postgres', q{CREATE ROLE newbie; GRANT svc TO newbie; GRANT pgphi_key_custodian TO svc_admin});
like(PgphiTest::psql_error($node, 'postgres', q{SET SESSION AUTHORIZATION svc_admin;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'svc', 'newbie')}),
	qr/42501: role "svc_admin" can add members to role svc, and cannot also approve members/,
	'a custodian with ADMIN OPTION on the group cannot approve its members');

# Under session_replication_role = replica the semantic audit triggers do
# not fire; the catalog audit then records pgphi's own changes.
$node->safe_psql('postgres', q{SET session_replication_role = replica;
	SELECT pgphi.approve_grant_member('k', 'decrypt', 'ward', 'helper')});
is($node->safe_psql('postgres', q{SELECT count(*) FROM pgphi.audit_log WHERE action = 'catalog_insert'
	AND detail LIKE 'pgphi.key_grant_members row %under session_replication_role = replica'}), '2',
	'in replica mode an approval is still audited, row by row');

# An update from 0.2.0: the members a grant reaches keep their access.
$node->safe_psql('postgres', q{
	CREATE DATABASE old;
});
$node->safe_psql('old', q{
	CREATE EXTENSION pgphi VERSION '0.2.0';
	CREATE ROLE old_group; CREATE ROLE old_member LOGIN;
	GRANT old_group TO old_member; GRANT pgphi_decrypt TO old_member;
	SELECT pgphi.create_key('ok');
	SELECT pgphi.grant_decrypt('ok', 'old_group');
	CREATE TABLE t (v bytea);
	INSERT INTO t VALUES (pgphi.encrypt_phi('phi-old', 'ok'));
	GRANT SELECT ON t TO old_member;
	ALTER EXTENSION pgphi UPDATE TO '0.3.0';
});
is($node->safe_psql('old', q{SET ROLE old_member; SELECT pgphi.decrypt_phi(v, 'ok') FROM t}), 'phi-old',
	'after the update an existing member still decrypts');
is($node->safe_psql('old', q{SELECT member::text || ':' || reason FROM pgphi.key_grant_members}),
	'old_member:member when granted', 'the update recorded it');

done_testing();
