# Every change to pgphi's catalog is audited, by whatever path (issue 13,
# finding 4), and the DDL that could switch the auditing off is refused and
# recorded.
#
# Generated: the tables and columns come from pg_depend and pg_attribute,
# the DDL cases from pg_trigger and pg_proc. As a superuser, and under
# session_replication_role = replica (no foreign key checks, origin triggers
# off), every column of every pgphi table is changed by direct UPDATE, a row
# of each is deleted and inserted again, and each table is truncated; each
# change must leave an audit row that names the table and that column (every
# column for a delete or insert), with binary columns shown only as a digest.
# A table without a row to change, or a column the probe cannot change, fails
# the test. audit_log must refuse every change instead. Then the DDL paths.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

my $node = PgphiTest::new_node('catalog_audit');
my $db = 'postgres';

# --- A catalog with a row in every table, made through pgphi's functions ---

$node->safe_psql($db, q{
	CREATE EXTENSION pgphi;
	CREATE ROLE catalog_audit_cust_a; CREATE ROLE catalog_audit_cust_b;
	GRANT pgphi_key_custodian TO catalog_audit_cust_a, catalog_audit_cust_b;
	CREATE ROLE catalog_audit_app; CREATE ROLE catalog_audit_other; CREATE ROLE catalog_audit_super SUPERUSER;
	SELECT pgphi.create_key('alpha');
	SELECT pgphi.create_key('beta');
	SELECT pgphi.create_blind_index_key('alpha_index', normalization => 'trim_lower');
	SELECT pgphi.grant_encrypt('alpha', 'catalog_audit_app'), pgphi.grant_decrypt('alpha', 'catalog_audit_app');
	SELECT pgphi.set_cryptoperiod('beta', '90 days');
	SELECT pgphi.grant_decrypt('beta', 'catalog_audit_app');
	-- A grant to a group with a member: a row in pgphi.key_grant_members.
	CREATE ROLE catalog_audit_ward; GRANT catalog_audit_ward TO catalog_audit_other;
	SELECT pgphi.grant_decrypt('alpha', 'catalog_audit_ward');
	CREATE TABLE catalog_audit_data (id int, v pgphi.encrypted);
	INSERT INTO catalog_audit_data SELECT g, pgphi.encrypt_phi('value ' || g, 'alpha') FROM generate_series(1, 50) g;
	SELECT pgphi.rotate_key('alpha');
	SELECT pgphi.rotate_key('beta');
	SELECT pgphi.rotate_key('beta');
});
$node->safe_psql($db, q{CALL pgphi.reencrypt('catalog_audit_data', 'v', 10)});
$node->safe_psql($db, q{
	SELECT pgphi.retire_key_version('beta', 1);
	SELECT pgphi.retire_key_version('beta', 2);
	SELECT pgphi.retire_key_version('alpha', 1);
	SET SESSION AUTHORIZATION catalog_audit_cust_a; SELECT pgphi.approve_destroy('beta', 2);
	SET SESSION AUTHORIZATION catalog_audit_cust_b; SELECT pgphi.approve_destroy('beta', 2);
	RESET SESSION AUTHORIZATION;
	SELECT pgphi.destroy_key('beta', 2);
	SET SESSION AUTHORIZATION catalog_audit_cust_a; SELECT pgphi.approve_destroy('alpha', 1);
	SELECT pgphi.approve_destroy('alpha', 1);
	-- A pending approval of a group-wide grant (pgphi_decrypt), not yet used.
	SELECT pgphi.approve_grant('alpha', 'pgphi_decrypt', 'decrypt');
	RESET SESSION AUTHORIZATION;
});
# Rows in rekey_approvals: approvals of moving a key, not yet used.
$node->safe_psql($db, q{
	SELECT pgphi.create_key('moving');
	SET SESSION AUTHORIZATION catalog_audit_cust_b;
	CALL pgphi.approve_rekey('moving', 'vault', 'pgphi-kek');
	CALL pgphi.approve_rekey('moving', 'aws_kms', 'alias/pgphi');
});
$node->safe_psql($db, q{SELECT count(pgphi.decrypt_phi(v)) FROM catalog_audit_data});
$node->poll_query_until($db, q{SELECT EXISTS (SELECT FROM pgphi.key_use_stats)})
  or die 'the audit writer wrote no key use counts';

is($node->safe_psql($db, q{SELECT count(*) FROM pgphi.audit_log WHERE action LIKE 'catalog%'}), '0',
	"pgphi's own functions (create, rotate, grant, retire, approve, destroy, reencrypt, the audit writer) "
	  . 'leave no catalog_* record');
is($node->safe_psql($db, q{SELECT string_agg(action, ',' ORDER BY seq) FROM pgphi.audit_log WHERE key_name = 'beta'}),
	'create,set_cryptoperiod,grant_decrypt,rotate,rotate,retire,retire,approve_destroy,approve_destroy,destroy',
	'and keep their semantic records');
is($node->safe_psql($db, q{SELECT string_agg(coalesce(detail, ''), ',' ORDER BY seq) FROM pgphi.audit_log
	WHERE key_name = 'alpha' AND action = 'approve_destroy'}),
	',approval renewed', 'a renewed destroy approval is recorded too');
# A suspended version with a pending approval to resume it (key lifecycle):
# a row in pgphi.resume_approvals for the probes.
$node->safe_psql($db, q{
	SET SESSION AUTHORIZATION catalog_audit_cust_a;
	SELECT pgphi.suspend_key('beta', 1);
	SELECT pgphi.approve_resume('beta', 1);
	RESET SESSION AUTHORIZATION;
});
is($node->safe_psql($db, q{SELECT count(*) FROM pgphi.audit_log WHERE action LIKE 'catalog%'}), '0',
	'suspending and approving a resume leave no catalog_* record');
# A decrypt limit, a break-glass role (proposed and approved) and an event
# (issue 16): rows in pgphi.decrypt_limits, break_glass_roles and
# break_glass_events.
$node->safe_psql($db, q{
	CREATE ROLE catalog_audit_doc; GRANT pgphi_decrypt TO catalog_audit_doc;
	CREATE ROLE catalog_audit_doc2;
	SET SESSION AUTHORIZATION catalog_audit_cust_a;
	SELECT pgphi.set_decrypt_limit('alpha', 'catalog_audit_app', 1000, '1 hour');
	SELECT pgphi.set_break_glass_role('alpha', 'catalog_audit_doc2', '2 hours');
	SELECT pgphi.set_break_glass_role('alpha', 'catalog_audit_doc', '1 hour');
	SET SESSION AUTHORIZATION catalog_audit_cust_b;
	SELECT pgphi.set_break_glass_role('alpha', 'catalog_audit_doc', '1 hour');
	RESET SESSION AUTHORIZATION;
	SET ROLE catalog_audit_doc;
	SELECT pgphi.break_glass('alpha', 'catalog audit probe');
	RESET ROLE;
});
is($node->safe_psql($db, q{SELECT count(*) FROM pgphi.audit_log WHERE action LIKE 'catalog%'}), '0',
	'decrypt limits and break-glass leave no catalog_* record');
# A version in the middle of a rekey (it records the KEK it is leaving):
# made by a superuser's direct DML, since no rekey can be left half-done
# without a second key manager here.
$node->safe_psql($db, q{UPDATE pgphi.key_versions SET rekey_source_provider = 'local', rekey_source_kek = 'default'
	WHERE key_id = pgphi._key_id('moving')});

# --- The probes -------------------------------------------------------------

$node->safe_psql($db, <<'SQL');
-- pgphi's tables: the extension's members, and anything else in its schema.
CREATE VIEW catalog_audit_tables AS
    SELECT c.oid::regclass AS tbl, c.relname::text AS name
      FROM pg_class c
     WHERE c.relkind IN ('r', 'p')
       AND (c.relnamespace = 'pgphi'::regnamespace
            OR c.oid IN (SELECT d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                          WHERE e.extname = 'pgphi' AND d.classid = 'pg_class'::regclass AND d.deptype = 'e'));
CREATE VIEW catalog_audit_columns AS
    SELECT t.tbl, t.name AS table_name, a.attname::text AS col, a.atttypid::regtype AS typ, a.attnum
      FROM catalog_audit_tables t JOIN pg_attribute a ON a.attrelid = t.tbl
     WHERE a.attnum > 0 AND NOT a.attisdropped;

-- Ways to change a column (a SET clause, and the new value): a value
-- another row has, the values its CHECK constraints name, a change by type,
-- NULL, and, where a CHECK ties it to other columns, those columns copied
-- together from a row where it differs.
CREATE FUNCTION catalog_audit_candidates(tbl regclass, col text, typ regtype, OUT set_clause text, OUT new_value text)
    RETURNS SETOF record LANGUAGE sql AS $$
    WITH single(v) AS (
        SELECT format('(SELECT x.%1$I FROM %2$s x WHERE x.%1$I IS NOT NULL AND x.%1$I IS DISTINCT FROM t.%1$I LIMIT 1)',
                      col, tbl)
        UNION ALL
        SELECT DISTINCT quote_literal(m[1]) || '::' || typ::text
          FROM pg_constraint k, regexp_matches(pg_get_constraintdef(k.oid), '''([^'']*)''', 'g') m
         WHERE k.conrelid = tbl AND k.contype = 'c'
           AND (SELECT attnum FROM pg_attribute WHERE attrelid = tbl AND attname = col) = ANY (k.conkey)
           AND typ IN ('text'::regtype, 'name'::regtype)
        UNION ALL
        SELECT v FROM unnest(CASE
            WHEN typ IN ('integer'::regtype, 'bigint'::regtype, 'smallint'::regtype) THEN
                ARRAY[format('coalesce(t.%I, 0) + 1', col), format('coalesce(t.%I, 0) - 1', col),
                      format('coalesce(t.%I, 0) + 1000', col)]
            WHEN typ IN ('text'::regtype, 'name'::regtype) THEN ARRAY[format('coalesce(t.%I::text, ''v'') || ''_changed''', col)]
            WHEN typ IN ('timestamptz'::regtype, 'timestamp'::regtype) THEN ARRAY[format('coalesce(t.%I, now()) + interval ''1 day''', col)]
            WHEN typ = 'interval'::regtype THEN ARRAY[format('coalesce(t.%I, interval ''1 day'') + interval ''1 day''', col)]
            WHEN typ = 'bytea'::regtype THEN ARRAY[format('coalesce(t.%I, ''\x01''::bytea) || ''\x00''::bytea', col)]
            WHEN typ = 'boolean'::regtype THEN ARRAY[format('NOT coalesce(t.%I, false)', col)]
            WHEN typ = 'regrole'::regtype THEN
                ARRAY[format('(SELECT r.oid::regrole FROM pg_roles r WHERE r.rolname LIKE ''catalog_audit_%%'' AND r.oid <> coalesce(t.%I::oid, 0) LIMIT 1)', col)]
            WHEN typ = 'oid'::regtype THEN ARRAY[format('(coalesce(t.%I::bigint, 0) + 1)::oid', col)]
            WHEN typ = 'regclass'::regtype THEN ARRAY['''pg_class''::regclass']
            WHEN typ = 'jsonb'::regtype THEN ARRAY[format('coalesce(t.%I, ''{}'') || ''{"changed": true}''', col)]
            ELSE ARRAY[]::text[] END) v
        UNION ALL
        SELECT 'NULL'
    )
    SELECT format('%I = %s', col, v), v FROM single
    UNION ALL
    SELECT format('(%s) = (SELECT %s FROM %s x WHERE x.%I IS DISTINCT FROM t.%I LIMIT 1)',
                  string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
                  string_agg('x.' || quote_ident(a.attname), ', ' ORDER BY a.attnum), tbl, col, col),
           format('(SELECT x.%1$I FROM %2$s x WHERE x.%1$I IS DISTINCT FROM t.%1$I LIMIT 1)', col, tbl)
      FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
     WHERE k.conrelid = tbl AND k.contype = 'c' AND cardinality(k.conkey) > 1
       AND (SELECT attnum FROM pg_attribute WHERE attrelid = tbl AND attname = col) = ANY (k.conkey)
     GROUP BY k.oid
$$;

CREATE FUNCTION catalog_audit_last_seq() RETURNS bigint LANGUAGE sql AS
    $$ SELECT coalesce(max(seq), 0) FROM pgphi.audit_log $$;

-- Whether an error came from one of pgphi's own guards (a trigger or
-- function of pgphi refusing the change), as opposed to a constraint.
CREATE FUNCTION catalog_audit_pgphi_refusal(context text) RETURNS boolean LANGUAGE sql AS
    $$ SELECT context ~ 'function pgphi\.' $$;

-- UPDATE of one column of one row; the result says whether (and how) the
-- change was audited. Everything is rolled back.
CREATE FUNCTION catalog_audit_probe_update(tbl regclass, table_name text, col text, typ regtype) RETURNS text
    LANGUAGE plpgsql AS $$
DECLARE
    target tid;
    before bigint;
    changed bigint;
    found text;
    result text;
    tried text[] := '{}';
    context text;
    cand record;
BEGIN
    -- Rows where the column has a value first; a few, since a row's other
    -- columns may rule a change out (a CHECK tying two columns).
    FOR target IN EXECUTE format('SELECT ctid FROM %s ORDER BY %I IS NULL, ctid LIMIT 5', tbl, col) LOOP
    FOR cand IN SELECT * FROM catalog_audit_candidates(tbl, col, typ) LOOP
        BEGIN
            before := catalog_audit_last_seq();
            EXECUTE format('UPDATE %s t SET %s WHERE t.ctid = $1 AND t.%I IS DISTINCT FROM %s',
                           tbl, cand.set_clause, col, cand.new_value) USING target;
            GET DIAGNOSTICS changed = ROW_COUNT;
            IF changed = 1 THEN
                SELECT a.detail INTO found FROM pgphi.audit_log a
                 WHERE a.seq > before AND a.action = 'catalog_update'
                   AND a.detail LIKE 'pgphi.' || table_name || ' row (%) changed: %'
                   AND a.detail ~ ('changed: (.*, )?' || col || ' ')
                 ORDER BY a.seq LIMIT 1;
                result := CASE WHEN found IS NULL THEN 'NOT AUDITED: ' || cand.set_clause
                               WHEN typ = 'bytea'::regtype AND found ~ '[0-9a-f]{32}' THEN 'BYTES IN THE AUDIT LOG: ' || found
                               WHEN typ = 'bytea'::regtype AND found !~ (col || ' (sha256:[0-9a-f]{16}|NULL)') THEN 'NO DIGEST: ' || found
                               ELSE 'audited' END;
            END IF;
            RAISE EXCEPTION 'probe done' USING ERRCODE = 'PX001';
        EXCEPTION
            WHEN SQLSTATE 'PX001' THEN
                IF result IS NOT NULL THEN
                    RETURN result;
                END IF;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS context = PG_EXCEPTION_CONTEXT;
                IF catalog_audit_pgphi_refusal(context) THEN
                    RETURN 'refused by pgphi (' || SQLSTATE || ')';
                END IF;
                tried := tried || format('%s: %s', cand.set_clause, SQLSTATE);
        END;
    END LOOP;
    END LOOP;
    IF cardinality(tried) = 0 THEN
        RETURN 'NO ROW to change';
    END IF;
    RETURN 'COULD NOT CHANGE the column: ' || array_to_string(tried, '; ');
END
$$;

-- DELETE of a row and INSERT of it again; then TRUNCATE.
CREATE FUNCTION catalog_audit_probe_rows(tbl regclass, table_name text, OUT op text, OUT result text)
    RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE
    saved jsonb;
    before bigint;
    found text;
    cols text[] := ARRAY(SELECT c.col FROM catalog_audit_columns c WHERE c.tbl = catalog_audit_probe_rows.tbl ORDER BY c.attnum);
    missing text[];
    context text;
BEGIN
    FOREACH op IN ARRAY ARRAY['delete', 'insert', 'truncate'] LOOP
        result := NULL;
        BEGIN
            before := catalog_audit_last_seq();
            EXECUTE format('DELETE FROM %s t WHERE t.ctid = (SELECT ctid FROM %s LIMIT 1) RETURNING to_jsonb(t)', tbl, tbl)
                INTO saved;
            IF saved IS NULL THEN
                result := 'NO ROW to change';
            ELSIF op = 'delete' THEN
                SELECT a.detail INTO found FROM pgphi.audit_log a
                 WHERE a.seq > before AND a.action = 'catalog_delete' AND a.detail LIKE 'pgphi.' || table_name || ' row (%) deleted: %'
                 ORDER BY a.seq DESC LIMIT 1;
            ELSIF op = 'insert' THEN
                before := catalog_audit_last_seq();
                EXECUTE format('INSERT INTO %s SELECT * FROM jsonb_populate_record(NULL::%s, $1)', tbl, tbl) USING saved;
                SELECT a.detail INTO found FROM pgphi.audit_log a
                 WHERE a.seq > before AND a.action = 'catalog_insert'
                   AND a.detail LIKE 'pgphi.' || table_name || ' row (%) inserted: %'
                 ORDER BY a.seq LIMIT 1;
            ELSE
                before := catalog_audit_last_seq();
                EXECUTE format('TRUNCATE %s CASCADE', tbl);
                SELECT a.detail INTO found FROM pgphi.audit_log a
                 WHERE a.seq > before AND a.action = 'catalog_truncate'
                   AND a.detail LIKE 'pgphi.' || table_name || ' truncated (% rows)%'
                 ORDER BY a.seq LIMIT 1;
                cols := '{}';
            END IF;
            IF result IS NULL THEN
                missing := ARRAY(SELECT c FROM unnest(cols) c WHERE found !~ ('(: |, )' || c || ' '));
                result := CASE WHEN found IS NULL THEN 'NOT AUDITED'
                               WHEN cardinality(missing) > 0 THEN 'COLUMNS NOT NAMED: ' || array_to_string(missing, ', ')
                               ELSE 'audited' END;
            END IF;
            RAISE EXCEPTION 'probe done' USING ERRCODE = 'PX001';
        EXCEPTION
            WHEN SQLSTATE 'PX001' THEN
                NULL;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS context = PG_EXCEPTION_CONTEXT;
                result := CASE WHEN catalog_audit_pgphi_refusal(context) THEN 'refused by pgphi (' || SQLSTATE || ')'
                               ELSE 'FAILED: ' || SQLERRM || ' (' || SQLSTATE || ')' END;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- A statement expected to fail: its SQLSTATE, or 'ran' (rolled back).
CREATE FUNCTION catalog_audit_try(statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    -- Keep the shared refusal queue from filling (the audit writer drains it).
    FOR i IN 1 .. 600 LOOP
        EXIT WHEN (SELECT queued_events FROM pgphi.audit_queue_status()) < 128;
        PERFORM pg_sleep(0.05);
    END LOOP;
    BEGIN
        EXECUTE statement;
        RAISE EXCEPTION 'ran' USING ERRCODE = 'PX001';
    EXCEPTION WHEN OTHERS THEN
        RETURN CASE WHEN SQLSTATE = 'PX001' THEN 'ran' ELSE SQLSTATE END;
    END;
END
$$;
SQL

# --- Every column, every row operation, every table --------------------------

my $tables = $node->safe_psql($db, q{SELECT string_agg(name, ' ' ORDER BY name) FROM catalog_audit_tables});
my $n_tables = scalar(split / /, $tables);
ok($tables =~ /\baudit_log\b/ && $tables =~ /\bkeys\b/ && $tables =~ /\bkey_versions\b/ && $tables =~ /\bkey_grants\b/,
	"pgphi's tables are found ($tables)");

my $triggers_missing = $node->safe_psql($db, q{
	SELECT string_agg(t.name, ', ') FROM catalog_audit_tables t
	 WHERE t.name NOT IN ('audit_log', 'audit_anchors')
	   AND (SELECT count(*) FROM pg_trigger g WHERE g.tgrelid = t.tbl AND g.tgenabled = 'A'
	           AND g.tgfoid = 'pgphi._audit_catalog_change()'::regprocedure) <> 2});
is($triggers_missing, '', 'every table but the append-only audit_log and audit_anchors has both catalog audit triggers, enabled ALWAYS');

my $probe = $node->safe_psql($db, q{
	SET session_replication_role = replica;
	SELECT format('%s.%s update: %s', c.table_name, c.col, catalog_audit_probe_update(c.tbl, c.table_name, c.col, c.typ))
	  FROM catalog_audit_columns c WHERE c.table_name NOT IN ('audit_log', 'audit_anchors') ORDER BY c.table_name, c.attnum;
	SELECT format('%s %s: %s', t.name, r.op, r.result)
	  FROM catalog_audit_tables t, catalog_audit_probe_rows(t.tbl, t.name) r
	 WHERE t.name NOT IN ('audit_log', 'audit_anchors') ORDER BY t.name;
});
my @lines = split /\n/, $probe;
my (%tables_covered, $columns, $row_ops, $refused);
for my $line (@lines)
{
	my ($what, $result) = $line =~ /^(\S+ \S+): (.*)$/ or die "probe output: $line";
	my $ok = $result eq 'audited' || $result =~ /^refused by pgphi/;
	ok($ok, "$what by a superuser's direct DML (replica mode): $result");
	$refused++ if $result =~ /^refused/;
	next unless $ok;
	my ($table) = $what =~ /^([^. ]+)/;
	$tables_covered{$table} = 1;
	if ($what =~ / update$/) { $columns++ } else { $row_ops++ }
}
my $expected_columns = $node->safe_psql($db,
	q{SELECT count(*) FROM catalog_audit_columns WHERE table_name NOT IN ('audit_log', 'audit_anchors')});
is($columns, $expected_columns, "every column of every catalog table was changed and audited ($columns columns)");
is(scalar(keys %tables_covered), $n_tables - 2, 'every table but audit_log and audit_anchors had a delete, an insert and a truncate');
note(sprintf('covered %d columns of %d tables by UPDATE, %d row operations (DELETE, INSERT, TRUNCATE)%s',
		$columns, scalar(keys %tables_covered), $row_ops, $refused ? ", $refused refused by a pgphi guard" : ''));
diag(sprintf('catalog audit: %d columns of %d tables changed one by one, %d row operations, all audited',
		$columns, scalar(keys %tables_covered), $row_ops));

# audit_log and audit_anchors refuse every change instead, column by column
# (an anchor is made first, so that each has a row to refuse changing).
$node->safe_psql($db, q{SELECT FROM pgphi.anchor_audit_log()});
for my $append_only (qw(audit_log audit_anchors))
{
	my $probe_sql = qq{
		SET session_replication_role = replica;
		SELECT format('%s %s', c.col, catalog_audit_try(format('UPDATE pgphi.$append_only SET %I = %I', c.col, c.col)))
		  FROM catalog_audit_columns c WHERE c.table_name = '$append_only' ORDER BY c.attnum;
		SELECT 'delete ' || catalog_audit_try('DELETE FROM pgphi.$append_only');
		SELECT 'truncate ' || catalog_audit_try('TRUNCATE pgphi.$append_only');
	};
	my $append_only_probe = $node->safe_psql($db, $probe_sql);
	my @refusals = split /\n/, $append_only_probe;
	is(scalar(grep { !/ 42501$/ } @refusals), 0, "$append_only refuses (42501) an update of each of its "
		  . (scalar(@refusals) - 2) . ' columns, a delete and a truncate')
	  or diag($append_only_probe);
}

# --- The changes the review made, one by one, without replica mode ------------

sub audited_change
{
	my ($sql, $action, $pattern, $name) = @_;
	my $out = $node->safe_psql($db, qq{
		BEGIN;
		SELECT catalog_audit_last_seq() AS before \\gset
		$sql;
		SELECT string_agg(action || ': ' || detail, E'\\n') FROM pgphi.audit_log WHERE seq > :before;
		ROLLBACK;});
	like($out, qr/^\Q$action\E: .*$pattern/m, $name) or diag($out);
}
audited_change(q{UPDATE pgphi.key_grants SET grantee = 'catalog_audit_other' WHERE grantee = 'catalog_audit_app'::regrole
	AND privilege = 'decrypt'}, 'catalog_update',
	qr/pgphi\.key_grants row \(key_id \d+, privilege 'decrypt', grantee 'catalog_audit_app'\) changed: grantee 'catalog_audit_app' -> 'catalog_audit_other'; by direct DML/,
	'a grant handed to another role is recorded, with both roles');
audited_change(q{UPDATE pgphi.keys SET name = 'gamma' WHERE name = 'alpha'}, 'catalog_update',
	qr/pgphi\.keys row \(key_id \d+\) changed: name 'alpha' -> 'gamma'/, 'renaming a key is recorded');
audited_change(q{UPDATE pgphi.keys SET kek_ref = 'elsewhere' WHERE name = 'alpha'}, 'catalog_update',
	qr/changed: kek_ref 'default' -> 'elsewhere'/, 'changing its KEK reference is recorded');
audited_change(q{DELETE FROM pgphi.key_versions WHERE key_id = pgphi._key_id('beta') AND version = 3}, 'catalog_delete',
	qr/pgphi\.key_versions row \(key_id \d+, version 3\) deleted: .*wrapped_dek sha256:[0-9a-f]{16} \(\d+ bytes\)/,
	'deleting a version is recorded, its DEK as a digest only');
audited_change(q{UPDATE pgphi.key_versions SET state = 'decrypt_only', retired_at = NULL
	WHERE key_id = pgphi._key_id('beta') AND version = 1}, 'catalog_update',
	qr/changed: state 'retired' -> 'decrypt_only', retired_at '[^']+' -> NULL/, 'un-retiring is recorded');
my $undestroy = q{UPDATE pgphi.key_versions SET state = 'decrypt_only', destroyed_at = NULL,
	wrapped_dek = (SELECT wrapped_dek FROM pgphi.key_versions WHERE key_id = pgphi._key_id('beta') AND version = 3)
	WHERE key_id = pgphi._key_id('beta') AND version = 2};
my $undestroy_error = PgphiTest::psql_error($node, $db, "BEGIN; $undestroy; ROLLBACK;");
if ($undestroy_error)
{
	like($undestroy_error, qr/ERROR:  \w{5}:/, 'un-destroying a version is refused');
}
else
{
	audited_change($undestroy, 'catalog_update', qr/changed: state 'destroyed' -> 'decrypt_only', wrapped_dek NULL -> sha256:/,
		'un-destroying a version is recorded');
}
audited_change(q{INSERT INTO pgphi.key_grants (key_id, privilege, grantee)
	VALUES (pgphi._key_id('beta'), 'decrypt', 'catalog_audit_other')}, 'catalog_insert',
	qr/pgphi\.key_grants row \(.*\) inserted: key_id \d+, privilege 'decrypt', grantee 'catalog_audit_other'/,
	'a grant inserted directly is recorded as such (beside its grant_decrypt record)');

# A function that is not pgphi's, whatever its name, is direct DML; so is
# someone's trigger that a pgphi procedure fires.
$node->safe_psql($db, q{
	CREATE FUNCTION public.rotate_key(name text) RETURNS integer LANGUAGE plpgsql SECURITY DEFINER
	    SET search_path = pg_catalog AS $$
	BEGIN
	    UPDATE pgphi.keys k SET rotated_at = pg_catalog.now() WHERE k.name = rotate_key.name;
	    RETURN 0;
	END $$;
	CREATE FUNCTION catalog_audit_sneak() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
	    UPDATE pgphi.keys SET kek_ref = 'sneaked' WHERE name = 'alpha';
	    RETURN NULL;
	END $$;
	CREATE TRIGGER sneak AFTER UPDATE ON catalog_audit_data FOR EACH STATEMENT EXECUTE FUNCTION catalog_audit_sneak();
});
audited_change(q{SELECT public.rotate_key('alpha')}, 'catalog_update',
	qr/changed: rotated_at .*; by direct DML, not by a pgphi function/,
	'a look-alike of a pgphi function gets no trust');
$node->safe_psql($db, q{SELECT pgphi.rotate_key('alpha')});
$node->safe_psql($db, q{CALL pgphi.reencrypt('catalog_audit_data', 'v', 10)});
like($node->safe_psql($db, q{SELECT string_agg(detail, E'\n') FROM pgphi.audit_log
	WHERE action = 'catalog_update' AND detail LIKE '%sneaked%'}),
	qr/changed: kek_ref 'default' -> 'sneaked'; not by a pgphi function \(inside pgphi\.(reencrypt|_\w+)\(/,
	"a user's trigger run by pgphi.reencrypt is not pgphi's own change");
$node->safe_psql($db, q{DROP TRIGGER sneak ON catalog_audit_data;
	UPDATE pgphi.keys SET kek_ref = 'default' WHERE name = 'alpha'});

# --- DDL that could switch the auditing off ----------------------------------

$node->safe_psql($db, q{CREATE SCHEMA catalog_audit_elsewhere});
my $before_ddl = $node->safe_psql($db, q{SELECT catalog_audit_last_seq()});
my $ddl = $node->safe_psql($db, q{
	WITH cases AS (
	    SELECT format('ALTER TABLE %s DISABLE TRIGGER ALL', t.tbl) AS s FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER TABLE %s DISABLE TRIGGER %I', g.tgrelid::regclass, g.tgname)
	      FROM pg_trigger g JOIN catalog_audit_tables t ON t.tbl = g.tgrelid WHERE NOT g.tgisinternal
	    UNION ALL SELECT format('DROP TRIGGER %I ON %s', g.tgname, g.tgrelid::regclass)
	      FROM pg_trigger g JOIN catalog_audit_tables t ON t.tbl = g.tgrelid WHERE NOT g.tgisinternal
	    UNION ALL SELECT format('ALTER TRIGGER %I ON %s RENAME TO x', g.tgname, g.tgrelid::regclass)
	      FROM pg_trigger g JOIN catalog_audit_tables t ON t.tbl = g.tgrelid WHERE NOT g.tgisinternal
	    UNION ALL SELECT format('CREATE TRIGGER probe BEFORE UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION catalog_audit_sneak()', t.tbl)
	      FROM catalog_audit_tables t
	    UNION ALL SELECT format('CREATE RULE probe AS ON UPDATE TO %s DO INSTEAD NOTHING', t.tbl) FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER TABLE %s RENAME TO probe', t.tbl) FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER TABLE %s SET SCHEMA catalog_audit_elsewhere', t.tbl) FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER TABLE %s ADD COLUMN probe int', t.tbl) FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER TABLE %s OWNER TO catalog_audit_cust_a', t.tbl) FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER EXTENSION pgphi DROP TABLE %s', t.tbl) FROM catalog_audit_tables t
	    UNION ALL SELECT format('ALTER ROUTINE %s SET SCHEMA catalog_audit_elsewhere', p.oid::regprocedure)
	      FROM pg_proc p WHERE p.pronamespace = 'pgphi'::regnamespace
	    UNION ALL SELECT 'CREATE TABLE pgphi.probe (x int)'
	    UNION ALL SELECT 'CREATE FUNCTION pgphi.probe() RETURNS int LANGUAGE sql AS ''SELECT 1'''
	    UNION ALL SELECT 'ALTER SCHEMA pgphi RENAME TO probe'
	    UNION ALL SELECT 'ALTER EXTENSION pgphi ADD TABLE catalog_audit_data'
	)
	SELECT s || ' => ' || catalog_audit_try(s) FROM cases ORDER BY s;
});
my @ddl = split /\n/, $ddl;
my @allowed = grep { !/ => 42501$/ } @ddl;
is(scalar(@allowed), 0, 'each of ' . scalar(@ddl) . ' DDL commands on pgphi\'s tables, triggers, functions and schema '
	  . 'is refused with 42501') or diag(join("\n", @allowed));
# Not recorded: a rename of the schema, and moves of the three functions
# that check and record (docs/access-control-and-audit.md, "Audit trail").
my $to_record = scalar(grep { / => 42501$/ && !/^ALTER SCHEMA pgphi RENAME|_in_extension_script|_catalog_writer\(\)|_queue_catalog_refusal/ } @ddl);
# (Counted by occurrences: identical refusals, and those beyond the shared
# queue's distinct entries, arrive coalesced.)
ok($node->poll_query_until($db, qq{SELECT coalesce(sum(occurrences), 0) = $to_record
		FROM pgphi.audit_log WHERE seq > $before_ddl AND action = 'catalog_ddl' AND outcome = 'refused'}),
	"each of the $to_record refusals is in the audit log (all but a rename of the schema and moves of the guard's helpers)");
like($node->safe_psql($db, qq{SELECT string_agg(login_role || ' ' || detail, E'\\n') FROM pgphi.audit_log
	WHERE seq > $before_ddl AND action = 'catalog_ddl'}),
	qr/^postgres ALTER TABLE: pgphi\.keys$/m, '... naming who tried what');
like(PgphiTest::psql_error($node, $db, 'ALTER SCHEMA pgphi RENAME TO probe'),
	qr/42501: schema pgphi cannot be renamed/, 'renaming the schema is refused');
like(PgphiTest::psql_error($node, $db, 'ALTER TABLE pgphi.keys DISABLE TRIGGER keys_catalog_audit'),
	qr/42501: ALTER TABLE on pgphi's catalog is not allowed/, 'the refusal says what is not allowed');
is($node->safe_psql($db, q{SET session_replication_role = replica;
	SELECT catalog_audit_try('ALTER TABLE pgphi.key_grants DISABLE TRIGGER ALL')}), '42501',
	'also under session_replication_role = replica');

# What stays possible (docs/access-control-and-audit.md: a superuser can switch the event triggers off)
# is visible in the catalog.
$node->safe_psql($db, q{ALTER EVENT TRIGGER pgphi_guard_catalog_ddl DISABLE});
is($node->safe_psql($db, q{SELECT string_agg(evtname || ' ' || evtenabled::text, ', ' ORDER BY evtname) FROM pg_event_trigger}),
	'pgphi_guard_catalog_ddl D, pgphi_guard_catalog_drop A', 'a disabled guard shows in pg_event_trigger');
$node->safe_psql($db, q{ALTER EVENT TRIGGER pgphi_guard_catalog_ddl ENABLE ALWAYS});
ok($node->poll_query_until($db, q{SELECT string_agg(detail, ', ' ORDER BY seq) FROM pgphi.audit_log
	WHERE action = 'catalog_guard'},
	'event trigger pgphi_guard_catalog_ddl disabled by ALTER EVENT TRIGGER, '
	  . 'event trigger pgphi_guard_catalog_ddl enabled always by ALTER EVENT TRIGGER'),
	'... and so does the audit log');

# Switching the guard off cannot be refused to a superuser, but it is never
# silent: every way to change each of the extension's event triggers
# (enumerated from pg_event_trigger and pg_depend) queues a catalog_guard
# event, which reaches the audit log even when the transaction aborts.
my @guards = split /\n/, $node->safe_psql($db, q{SELECT t.evtname FROM pg_event_trigger t
	JOIN pg_depend d ON d.classid = 'pg_event_trigger'::regclass AND d.objid = t.oid AND d.deptype = 'e'
	JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pgphi' ORDER BY t.evtname});
cmp_ok(scalar(@guards), '>=', 2, 'the extension\'s event triggers: ' . join(', ', @guards));
my $before_guard = $node->safe_psql($db, 'SELECT max(seq) FROM pgphi.audit_log');
my @guard_changes;
for my $guard (@guards)
{
	push @guard_changes,
	  [ "ALTER EVENT TRIGGER $guard DISABLE", "event trigger $guard disabled by ALTER EVENT TRIGGER" ],
	  [ "ALTER EVENT TRIGGER $guard ENABLE", "event trigger $guard enabled for origin sessions only by ALTER EVENT TRIGGER" ],
	  [ "ALTER EVENT TRIGGER $guard ENABLE REPLICA", "event trigger $guard enabled for replica sessions only by ALTER EVENT TRIGGER" ],
	  [ "ALTER EVENT TRIGGER $guard ENABLE ALWAYS", "event trigger $guard enabled always by ALTER EVENT TRIGGER" ],
	  [ "ALTER EVENT TRIGGER $guard OWNER TO catalog_audit_super", "event trigger $guard given to another owner" ],
	  [ "ALTER EVENT TRIGGER $guard OWNER TO CURRENT_USER", "event trigger $guard given to another owner" ],
	  [ "ALTER EVENT TRIGGER $guard RENAME TO ${guard}_moved", "event trigger $guard renamed to ${guard}_moved" ],
	  [ "ALTER EVENT TRIGGER ${guard}_moved RENAME TO $guard", "event trigger ${guard}_moved renamed to $guard" ];
}
# In a transaction that aborts, too.
push @guard_changes, [ "BEGIN; ALTER EVENT TRIGGER $guards[0] DISABLE; ROLLBACK",
	"event trigger $guards[0] disabled by ALTER EVENT TRIGGER" ];
$node->safe_psql($db, $_->[0]) for @guard_changes;
my %expected_guard;
$expected_guard{ $_->[1] }++ for @guard_changes;
my $recorded_guard = qq{SELECT string_agg(detail || ' x' || occurrences, E'\n' ORDER BY detail) FROM (
	SELECT detail, sum(occurrences) AS occurrences FROM pgphi.audit_log
	 WHERE seq > $before_guard AND action = 'catalog_guard' AND outcome = 'ok' GROUP BY detail) g};
my $want_guard = join("\n", map { "$_ x$expected_guard{$_}" } sort keys %expected_guard);
ok($node->poll_query_until($db, $recorded_guard, $want_guard),
	scalar(@guard_changes) . ' changes to the guard, each on record as catalog_guard')
  or diag($node->safe_psql($db, $recorded_guard));
SKIP:
{
	skip 'the setting event_triggers exists from PostgreSQL 17', 2 if $node->pg_version < 17;
	my $before_off = $node->safe_psql($db, 'SELECT max(seq) FROM pgphi.audit_log');
	$node->safe_psql($db, q{SET event_triggers = off; SELECT 1});
	{
		local $ENV{PGOPTIONS} = '-c event_triggers=off';
		$node->safe_psql($db, q{CREATE TEMP TABLE guard_off_probe (i int)});
	}
	ok($node->poll_query_until($db, qq{SELECT count(*) FROM pgphi.audit_log WHERE seq > $before_off
		AND action = 'catalog_guard' AND detail = 'event triggers switched off for the session (SET event_triggers)'}, '1'),
		'SET event_triggers = off is on record');
	ok($node->poll_query_until($db, qq{SELECT count(*) >= 1 FROM pgphi.audit_log WHERE seq > $before_off
		AND action = 'catalog_guard' AND detail LIKE 'a session ran commands with event triggers off%'}),
		'so is a session that starts with event triggers off');
}

# GRANT stays possible (pg_dump restores privileges with it); what it allows
# is audited.
is($node->safe_psql($db, q{SELECT catalog_audit_try('GRANT SELECT ON pgphi.keys TO catalog_audit_other')}), 'ran',
	'GRANT on a catalog table is not refused');

is($node->safe_psql($db, q{SELECT intact FROM pgphi.verify_audit_log()}), 't', 'the audit chain is intact');

done_testing();
