-- Access control: per-key grants, and views for authorized roles.
--
-- Per-key grants decide which roles may encrypt and decrypt under a key; the
-- coarse roles pgphi_encrypt and pgphi_decrypt still decide who may call the
-- functions at all. What each kind of role may do is in the documentation
-- ("Access control"); the generated matrix in test/t/020_privileges_matrix.pl
-- holds every routine and relation of the extension to it.

-- Why a grant to `grantee` would reach a group, or NULL if it would not.
CREATE FUNCTION pgphi._group_grant_reason(grantee regrole) RETURNS text
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN grantee::oid IN ('pgphi_encrypt'::regrole::oid, 'pgphi_decrypt'::regrole::oid)
            THEN format('%s is one of pgphi''s group roles', grantee)
        WHEN pg_has_role('pgphi_encrypt', grantee::oid, 'MEMBER')
            THEN format('pgphi_encrypt is a member of %s', grantee)
        WHEN pg_has_role('pgphi_decrypt', grantee::oid, 'MEMBER')
            THEN format('pgphi_decrypt is a member of %s', grantee)
        WHEN m.members > 10
            THEN format('%s has %s member roles (more than 10)', grantee, m.members)
        END
      FROM (SELECT count(*) AS members FROM pg_roles r
             WHERE r.oid <> grantee::oid AND NOT r.rolsuper AND pg_has_role(r.oid, grantee::oid, 'MEMBER')) m
$$;

-- Refuses grantees no key may go to: PUBLIC, OIDs that are no role, and
-- (separation of duties) the custodian and auditor groups and roles they
-- are members of.
CREATE FUNCTION pgphi._check_grantee(grantee regrole) RETURNS void
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    via text;
BEGIN
    IF grantee IS NULL THEN
        RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF grantee::oid = 0 THEN
        RAISE EXCEPTION 'pgphi keys cannot be granted to PUBLIC'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Grant keys to the roles of the people or applications that use them.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = grantee::oid) THEN
        RAISE EXCEPTION 'role with OID % does not exist', grantee::oid USING ERRCODE = 'undefined_object';
    END IF;
    SELECT g INTO via FROM unnest(ARRAY['pgphi_key_custodian', 'pgphi_key_auditor']) g
     WHERE pg_has_role(g, grantee::oid, 'MEMBER');
    IF via = grantee::text THEN
        RAISE EXCEPTION 'pgphi keys cannot be granted to %', grantee
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Grant keys to the roles of the people or applications that use them.';
    ELSIF via IS NOT NULL THEN
        RAISE EXCEPTION 'pgphi keys cannot be granted to %', grantee
            USING ERRCODE = 'insufficient_privilege', DETAIL = format('%s is a member of %s.', via, grantee),
                  HINT = 'Grant keys to the roles of the people or applications that use them.';
    END IF;
END
$$;

-- A new grant covers its grantee and the roles that are members of it now
-- (directly or through other roles, inheriting or not: a member that does
-- not inherit can still SET ROLE), as pgphi.key_grant_members records;
-- superusers need no record. Stale records
-- of an earlier grant to the same role go first.
CREATE FUNCTION pgphi._record_grant_members(target_id integer, privilege text, grantee regrole) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgphi.key_grant_members m
     WHERE m.key_id = target_id AND m.privilege = _record_grant_members.privilege
       AND m.grantee::oid = _record_grant_members.grantee::oid;
    INSERT INTO pgphi.key_grant_members (key_id, privilege, grantee, member, reason)
    SELECT target_id, _record_grant_members.privilege, _record_grant_members.grantee, r.oid::regrole,
           'member when granted'
      FROM pg_roles r
     WHERE r.oid <> _record_grant_members.grantee::oid AND NOT r.rolsuper
       AND pg_has_role(r.oid, _record_grant_members.grantee::oid, 'MEMBER');
END
$$;

-- A grant deleted by other means than pgphi's functions (which remove the
-- records themselves) takes the records of whom it covered with it; those
-- deletes are audited as catalog changes, as the grant's is.
CREATE FUNCTION pgphi._forget_grant_members() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgphi.key_grant_members m
     WHERE m.key_id = OLD.key_id AND m.privilege = OLD.privilege AND m.grantee::oid = OLD.grantee::oid;
    RETURN NULL;
END
$$;

CREATE TRIGGER key_grants_forget_members AFTER DELETE ON pgphi.key_grants
    FOR EACH ROW EXECUTE FUNCTION pgphi._forget_grant_members();
ALTER TABLE pgphi.key_grants ENABLE ALWAYS TRIGGER key_grants_forget_members;

-- Grant records change what every session may do: clear their grant checks.
CREATE TRIGGER key_grant_members_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgphi.key_grant_members
    FOR EACH STATEMENT EXECUTE FUNCTION pgphi._key_catalog_changed();
ALTER TABLE pgphi.key_grant_members ENABLE ALWAYS TRIGGER key_grant_members_changed;

CREATE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean,
        valid_until timestamptz)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    existing pgphi.key_grants;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grant_members m
         WHERE m.key_id = target_id AND m.privilege = _change_key_grant.privilege
           AND m.grantee::oid = _change_key_grant.grantee::oid;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;
    IF valid_until IS NOT NULL AND valid_until <= now() THEN
        RAISE EXCEPTION 'a time-limited pgphi key grant must end in the future'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass valid_until => now() + interval ''...''.';
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    SELECT * INTO existing FROM pgphi.key_grants g WHERE g.key_id = target_id
       AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid FOR UPDATE;
    IF FOUND THEN
        -- A grant without expiry covers any time-limited one; a
        -- time-limited one is extended, shortened or made permanent.
        IF existing.valid_until IS NULL OR existing.valid_until IS NOT DISTINCT FROM valid_until THEN
            RETURN false;
        END IF;
        UPDATE pgphi.key_grants g SET valid_until = _change_key_grant.valid_until
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        PERFORM pgphi._audit('grant_' || privilege, target_id, NULL, 'ok',
                             format('to %s %s (was until %s)', grantee,
                                    coalesce('until ' || pgphi._audit_time(valid_until), 'without expiry'),
                                    pgphi._audit_time(existing.valid_until)));
        RETURN true;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee, valid_until)
        VALUES (target_id, privilege, grantee, valid_until)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed > 0 THEN
        PERFORM pgphi._record_grant_members(target_id, privilege, grantee);
    END IF;
    RETURN changed > 0;
END
$$;

CREATE FUNCTION pgphi._change_key_grant(key_name text, grantee regrole, privilege text, granting boolean)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    granter name := session_user;
    group_reason text;
    changed integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT granting THEN
        -- Revoking always works, also for a role dropped since (its OID).
        IF grantee IS NULL THEN
            RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM pgphi.key_grant_members m
         WHERE m.key_id = target_id AND m.privilege = _change_key_grant.privilege
           AND m.grantee::oid = _change_key_grant.grantee::oid;
        DELETE FROM pgphi.key_grants g
         WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
           AND g.grantee::oid = _change_key_grant.grantee::oid;
        GET DIAGNOSTICS changed = ROW_COUNT;
        RETURN changed > 0;
    END IF;

    PERFORM pgphi._check_grantee(grantee);
    -- Nobody grants a key to themselves.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = granter)
       AND pg_has_role(granter, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot grant pgphi key "%" to itself or to a role it belongs to', granter, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must make this grant.';
    END IF;
    IF EXISTS (SELECT FROM pgphi.key_grants g WHERE g.key_id = target_id AND g.valid_until IS NULL
                  AND g.privilege = _change_key_grant.privilege AND g.grantee::oid = _change_key_grant.grantee::oid) THEN
        RETURN false;
    END IF;
    -- A grant that reaches a group takes a second custodian's approval.
    group_reason := pgphi._group_grant_reason(grantee);
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
            AND a.grantee::oid = _change_key_grant.grantee::oid
            AND a.approved_by <> granter AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'granting pgphi key "%" to % needs the approval of a second key custodian', key_name, grantee
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('The grant reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then grant again within a day.',
                                    key_name, grantee::text, privilege);
        END IF;
        -- An approval serves one grant.
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = _change_key_grant.privilege
           AND a.grantee::oid = _change_key_grant.grantee::oid;
    END IF;
    -- A time-limited grant becomes one without expiry.
    UPDATE pgphi.key_grants g SET valid_until = NULL
     WHERE g.key_id = target_id AND g.privilege = _change_key_grant.privilege
       AND g.grantee::oid = _change_key_grant.grantee::oid AND g.valid_until IS NOT NULL;
    IF FOUND THEN
        PERFORM pgphi._audit('grant_' || privilege, target_id, NULL, 'ok',
                             format('to %s without expiry (was time-limited)', grantee));
        RETURN true;
    END IF;
    INSERT INTO pgphi.key_grants (key_id, privilege, grantee) VALUES (target_id, privilege, grantee)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF changed > 0 THEN
        PERFORM pgphi._record_grant_members(target_id, privilege, grantee);
    END IF;
    RETURN changed > 0;
END
$$;

-- Each returns whether it changed anything (false: the grant was already so).
CREATE FUNCTION pgphi.grant_decrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', true) $$;

CREATE FUNCTION pgphi.revoke_decrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'decrypt', false) $$;

CREATE FUNCTION pgphi.grant_encrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', true) $$;

CREATE FUNCTION pgphi.revoke_encrypt(key_name text, grantee regrole) RETURNS boolean
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgphi._change_key_grant(key_name, grantee, 'encrypt', false) $$;

-- One custodian's approval of a group-wide grant, valid for a day; another
-- custodian then makes the grant. Audited as approve_grant.
CREATE FUNCTION pgphi.approve_grant(key_name text, grantee regrole, privilege text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    approver name := session_user;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF NOT pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve a grant of a pgphi key'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    PERFORM pgphi._check_grantee(grantee);
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = approver)
       AND pg_has_role(approver, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" cannot approve granting pgphi key "%" to itself or to a role it belongs to',
                        approver, key_name
            USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must approve this grant.';
    END IF;
    INSERT INTO pgphi.grant_approvals (key_id, privilege, grantee, approved_by)
        VALUES (target_id, approve_grant.privilege, approve_grant.grantee, approver)
        ON CONFLICT ON CONSTRAINT grant_approvals_pkey DO UPDATE SET approved_at = now();
    PERFORM pgphi._audit('approve_grant', target_id, NULL, 'ok',
                         format('%s to %s%s', approve_grant.privilege, approve_grant.grantee,
                                coalesce('; ' || pgphi._group_grant_reason(approve_grant.grantee), '')));
END
$$;

-- A key custodian extends a grant to a role that joined the grantee after
-- the grant was made (which the grant does not cover), and to the roles that
-- are members of that role now. Not to a custodian or auditor group. Not by
-- the role itself or a role it belongs to, nor by whoever made any of the
-- memberships that lead from the roles it adds to the grantee (or a role it
-- belongs to, or when that role was dropped since): whoever widened the group
-- does not also hand it the key. Widening a grant to a group (as
-- _group_grant_reason says, or more than ten roles at once) takes a second
-- custodian's approve_grant for the member, as a group-wide grant does.
-- Returns how many roles it added. Audited as grant_member, one row per role.
CREATE FUNCTION pgphi.approve_grant_member(key_name text, privilege text, grantee regrole, member regrole)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer := pgphi._key_id(key_name);
    approver name := session_user;
    approver_is_super boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
    adding oid[];
    group_reason text;
    added integer;
BEGIN
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    IF grantee IS NULL OR member IS NULL THEN
        RAISE EXCEPTION 'a grant needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_has_role(approver, 'pgphi_key_custodian', 'MEMBER') THEN
        RAISE EXCEPTION 'only key custodians can approve a member of a pgphi key grant'
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pgphi_key_custodian TO the approving role.';
    END IF;
    IF NOT EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = approve_grant_member.privilege
                      AND g.grantee::oid = approve_grant_member.grantee::oid) THEN
        RAISE EXCEPTION 'role % holds no % grant on pgphi key "%"', grantee, privilege, key_name
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.access_review() lists the grants.';
    END IF;
    IF member::oid = grantee::oid OR NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = member::oid)
       OR NOT pg_has_role(member::oid, grantee::oid, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is not a member of role %', member, grantee
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Approve a role that is a member of the grantee.';
    END IF;
    PERFORM pgphi._check_grantee(member);
    -- The roles it would add: the member and the members it has now.
    adding := ARRAY(SELECT r.oid FROM pg_roles r
                     WHERE NOT r.rolsuper AND r.oid <> approve_grant_member.grantee::oid
                       AND (r.oid = approve_grant_member.member::oid
                            OR pg_has_role(r.oid, approve_grant_member.member::oid, 'MEMBER'))
                       AND NOT EXISTS (SELECT FROM pgphi.key_grant_members m
                                        WHERE m.key_id = target_id AND m.privilege = approve_grant_member.privilege
                                          AND m.grantee::oid = approve_grant_member.grantee::oid
                                          AND m.member::oid = r.oid));
    IF NOT approver_is_super THEN
        IF EXISTS (SELECT FROM unnest(adding) a(oid) WHERE pg_has_role(approver, a.oid, 'MEMBER')) THEN
            RAISE EXCEPTION 'role "%" cannot approve its own use of pgphi key "%"', approver, key_name
                USING ERRCODE = 'insufficient_privilege', HINT = 'Another key custodian must approve it.';
        END IF;
        -- Every membership on the way from a role it adds up to the grantee.
        IF EXISTS (SELECT FROM pg_auth_members am
                    LEFT JOIN pg_roles granted_by ON granted_by.oid = am.grantor
                    WHERE pg_has_role(am.roleid, approve_grant_member.grantee::oid, 'MEMBER')
                      AND (am.member = ANY (adding)
                           OR pg_has_role(approve_grant_member.member::oid, am.member, 'MEMBER'))
                      AND (granted_by.oid IS NULL OR pg_has_role(approver, granted_by.oid, 'MEMBER'))) THEN
            RAISE EXCEPTION 'role "%" made role % a member, and cannot also approve its use of pgphi key "%"',
                            approver, member, key_name
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'It, or a role it belongs to, or a role dropped since, granted a membership that leads to the grant.',
                      HINT = 'Another key custodian must approve it.';
        END IF;
    END IF;
    -- Nor by a role that can add members on the way: CREATEROLE, or ADMIN
    -- OPTION on the grantee, the member or a role between them.
    IF NOT approver_is_super
       AND ((SELECT rolcreaterole FROM pg_roles WHERE rolname = approver)
            OR EXISTS (SELECT FROM pg_roles x
                        WHERE pg_has_role(x.oid, approve_grant_member.grantee::oid, 'MEMBER')
                          AND pg_has_role(approve_grant_member.member::oid, x.oid, 'MEMBER')
                          AND pg_has_role(approver, x.oid, 'MEMBER WITH ADMIN OPTION'))) THEN
        RAISE EXCEPTION 'role "%" can add members to role %, and cannot also approve members of its pgphi key grant',
                        approver, grantee
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'It has CREATEROLE, or ADMIN OPTION on a role between the member and the grantee.',
                  HINT = 'A key custodian who does not administer the group must approve it.';
    END IF;
    group_reason := pgphi._group_grant_reason(member);
    IF group_reason IS NULL AND cardinality(adding) > 10 THEN
        group_reason := format('%s brings %s roles (more than 10)', member, cardinality(adding));
    END IF;
    IF group_reason IS NOT NULL THEN
        PERFORM FROM pgphi.grant_approvals a
          WHERE a.key_id = target_id AND a.privilege = approve_grant_member.privilege
            AND a.grantee::oid = approve_grant_member.member::oid
            AND a.approved_by <> approver AND a.approved_at > now() - interval '1 day'
            AND pg_has_role(a.approved_by, 'pgphi_key_custodian', 'MEMBER');
        IF NOT FOUND THEN
            RAISE EXCEPTION 'extending the grant of pgphi key "%" to % needs the approval of a second key custodian',
                            key_name, member
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('It reaches a group: %s.', group_reason),
                      HINT = format('Another member of pgphi_key_custodian runs SELECT pgphi.approve_grant(%L, %L, %L); then approve the member again within a day.',
                                    key_name, member::text, privilege);
        END IF;
        DELETE FROM pgphi.grant_approvals a
         WHERE a.key_id = target_id AND a.privilege = approve_grant_member.privilege
           AND a.grantee::oid = approve_grant_member.member::oid;
    END IF;
    INSERT INTO pgphi.key_grant_members (key_id, privilege, grantee, member, reason, approved_by)
    SELECT target_id, approve_grant_member.privilege, approve_grant_member.grantee, a.oid::regrole, 'approved',
           approver
      FROM unnest(adding) a(oid)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added;
END
$$;

-- Records of roles that are no longer members of the grantee: a role that
-- left a group (REVOKE, DROP ROLE) and is added again later is a later member
-- again. Run by the REVOKE and DROP ROLE that pgphi's utility hook sees in this
-- database, and by expire_key_grants() (scheduled), for changes made while
-- connected to another database. Returns how many it removed; each is audited
-- as forget_member.
CREATE FUNCTION pgphi._prune_grant_members() RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gone record;
    removed integer := 0;
BEGIN
    FOR gone IN
        DELETE FROM pgphi.key_grant_members m
         WHERE NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = m.member::oid)
            OR NOT pg_has_role(m.member::oid, m.grantee::oid, 'MEMBER')
        RETURNING m.key_id, m.privilege, m.grantee::oid AS grantee, m.member::oid AS member
    LOOP
        PERFORM pgphi._audit('forget_member', gone.key_id, NULL, 'ok',
                             format('%s grant to %s no longer covers %s: no longer a member',
                                    gone.privilege, coalesce(gone.grantee::regrole::text, gone.grantee::text),
                                    coalesce((SELECT rolname::text FROM pg_roles WHERE oid = gone.member),
                                             gone.member::text)));
        removed := removed + 1;
    END LOOP;
    RETURN removed;
END
$$;

-- Whether a role may encrypt or decrypt under a key: a grant to it, or to a
-- role whose privileges it has and that the grant covers (it was a member when
-- the grant was made, or was approved since), as decrypt_phi and encrypt_phi check. Who may
-- ask: key custodians, auditors and superusers about any role; other members
-- of pgphi's roles only about roles whose privileges they have (themselves,
-- their groups). Nobody else, so a key's grantees cannot be enumerated.
CREATE FUNCTION pgphi.has_key_privilege(role regrole, key_name text, privilege text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target_id integer;
    asker text := pgphi._acting_role();
BEGIN
    IF NOT (pg_has_role(session_user, 'pgphi_key_custodian', 'MEMBER')
            OR pg_has_role(session_user, 'pgphi_key_auditor', 'MEMBER')
            OR (has_key_privilege.role IS NOT NULL
                AND EXISTS (SELECT FROM pg_roles r WHERE r.oid = has_key_privilege.role::oid)
                AND pg_has_role(asker, has_key_privilege.role::oid, 'USAGE'))) THEN
        RAISE EXCEPTION 'only key custodians and auditors can ask about the pgphi key grants of other roles'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Other roles may ask about themselves and the roles whose privileges they have.';
    END IF;
    IF privilege IS NULL OR privilege NOT IN ('encrypt', 'decrypt') THEN
        RAISE EXCEPTION 'unknown pgphi key privilege'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use encrypt or decrypt.';
    END IF;
    target_id := pgphi._key_id(key_name);
    IF target_id IS NULL THEN
        RAISE EXCEPTION 'pgphi key does not exist'
            USING ERRCODE = 'undefined_object', HINT = 'pgphi.key_inventory lists the keys.',
                  DETAIL = 'pgphi does not repeat a name that names no key: a misplaced argument could be PHI.';
    END IF;
    RETURN (SELECT rolsuper FROM pg_roles WHERE oid = role)
        OR EXISTS (SELECT FROM pgphi.key_grants g
                    WHERE g.key_id = target_id AND g.privilege = has_key_privilege.privilege
                      AND (g.valid_until IS NULL OR g.valid_until > clock_timestamp())
                      AND pg_has_role(role, g.grantee::oid, 'USAGE')
                      AND (g.grantee::oid = role::oid
                           OR EXISTS (SELECT FROM pgphi.key_grant_members m
                                       WHERE m.key_id = g.key_id AND m.privilege = g.privilege
                                         AND m.grantee::oid = g.grantee::oid AND m.member::oid = role::oid)));
END
$$;

-- Creates a view of a table with its encrypted columns decrypted, and lets
-- `grant_to` read it. The view reads the table with its owner's rights, but
-- decrypts with the reader's: the reader still needs pgphi_decrypt and a
-- decrypt grant on the keys. Columns default to those of type
-- pgphi.encrypted; name bytea columns explicitly. With context_column, every
-- value is authenticated against that column (then key_name is required).
CREATE FUNCTION pgphi.create_decrypted_view(tbl regclass, view_name text, grant_to regrole,
        columns name[] DEFAULT NULL, key_name text DEFAULT NULL, context_column name DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    select_list text[] := '{}';
    decrypted name[] := '{}';
    a record;
    missing name;
    view_schema text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE c.oid = tbl);
BEGIN
    IF view_name IS NULL OR grant_to IS NULL THEN
        RAISE EXCEPTION 'create_decrypted_view needs a view name and a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF context_column IS NOT NULL AND key_name IS NULL THEN
        RAISE EXCEPTION 'a context column needs the key name too'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass key_name => the key the columns use.';
    END IF;
    IF columns IS NOT NULL THEN
        SELECT c INTO missing FROM unnest(columns) c
         WHERE NOT EXISTS (SELECT FROM pg_attribute x WHERE x.attrelid = tbl AND x.attname = c
                              AND x.attnum > 0 AND NOT x.attisdropped
                              AND x.atttypid IN ('pgphi.encrypted'::regtype, 'bytea'::regtype));
        IF FOUND THEN
            RAISE EXCEPTION 'relation % has no pgphi.encrypted or bytea column "%"', tbl, missing
                USING ERRCODE = 'undefined_column';
        END IF;
    END IF;
    FOR a IN SELECT x.attname, x.atttypid FROM pg_attribute x
              WHERE x.attrelid = tbl AND x.attnum > 0 AND NOT x.attisdropped ORDER BY x.attnum LOOP
        IF (columns IS NULL AND a.atttypid = 'pgphi.encrypted'::regtype) OR a.attname = ANY (columns) THEN
            select_list := select_list || CASE
                WHEN context_column IS NOT NULL THEN
                    format('pgphi.decrypt_phi(%I, %L, %I::text) AS %I', a.attname, key_name, context_column, a.attname)
                WHEN key_name IS NOT NULL THEN
                    format('pgphi.decrypt_phi(%I, %L) AS %I', a.attname, key_name, a.attname)
                ELSE format('pgphi.decrypt_phi(%I) AS %I', a.attname, a.attname) END;
            decrypted := decrypted || a.attname;
        ELSE
            select_list := select_list || format('%I', a.attname);
        END IF;
    END LOOP;
    IF cardinality(decrypted) = 0 THEN
        RAISE EXCEPTION 'relation % has no pgphi.encrypted columns', tbl
            USING ERRCODE = 'undefined_column', HINT = 'Name bytea columns that hold ciphertexts in columns => ...';
    END IF;
    EXECUTE format('CREATE VIEW %I.%I AS SELECT %s FROM %s', view_schema, view_name,
                   array_to_string(select_list, ', '), tbl);
    EXECUTE format('GRANT SELECT ON %I.%I TO %s', view_schema, view_name, grant_to);
    IF NOT pg_has_role(grant_to, 'pgphi_decrypt', 'USAGE') THEN
        RAISE NOTICE 'role % is not a member of pgphi_decrypt and cannot decrypt yet', grant_to
            USING HINT = format('GRANT pgphi_decrypt TO %s;', grant_to);
    END IF;
    IF key_name IS NOT NULL AND NOT pgphi.has_key_privilege(grant_to, key_name, 'decrypt') THEN
        RAISE NOTICE 'role % holds no decrypt grant on pgphi key "%"', grant_to, key_name
            USING HINT = format('A key custodian runs SELECT pgphi.grant_decrypt(%L, %L);', key_name, grant_to::text);
    END IF;
    RAISE NOTICE 'view %.% decrypts % for %', view_schema, view_name, array_to_string(decrypted, ', '), grant_to;
END
$$;

-- Every key version, with what an auditor asks about it. Never the DEK.
CREATE VIEW pgphi.key_inventory AS
    SELECT k.name AS key_name, k.key_id, k.purpose, k.created_by AS owner,
           -- What wraps this version's DEK (mid-rekey: the KEK it is leaving).
           coalesce(v.rekey_source_provider, k.provider) AS provider,
           coalesce(v.rekey_source_kek, k.kek_ref) AS kek_ref,
           v.version, v.state, v.kek_version, v.created_at, k.rotated_at, v.retired_at, v.destroyed_at,
           k.cryptoperiod,
           CASE WHEN v.state = 'active' THEN v.created_at + k.cryptoperiod END AS rotate_by,
           coalesce(v.state = 'active' AND v.created_at + k.cryptoperiod < pg_catalog.now(), false)
               AS rotation_overdue,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'encrypt' ORDER BY 1) AS encrypt_grantees,
           ARRAY(SELECT g.grantee::text FROM pgphi.key_grants g
                  WHERE g.key_id = k.key_id AND g.privilege = 'decrypt' ORDER BY 1) AS decrypt_grantees,
           (k.suspended_at IS NOT NULL OR v.suspended_at IS NOT NULL) AS suspended,
           coalesce(v.suspended_at, k.suspended_at) AS suspended_at,
           coalesce(v.suspended_by, k.suspended_by) AS suspended_by,
           v.compromised_at IS NOT NULL AS compromised,
           v.compromised_at, v.compromised_by,
           -- A rekey still has to move this version to the key's provider.
           (v.rekey_source_provider IS NOT NULL AND v.wrapped_dek IS NOT NULL) AS rekey_pending
      FROM pgphi.keys k JOIN pgphi.key_versions v USING (key_id);

GRANT EXECUTE ON FUNCTION pgphi._change_key_grant(text, regrole, text, boolean),
    pgphi.grant_decrypt(text, regrole), pgphi.revoke_decrypt(text, regrole),
    pgphi.grant_encrypt(text, regrole), pgphi.revoke_encrypt(text, regrole),
    pgphi.approve_grant(text, regrole, text), pgphi.approve_grant_member(text, text, regrole, regrole)
    TO pgphi_key_custodian;
GRANT EXECUTE ON FUNCTION pgphi.has_key_privilege(regrole, text, text)
    TO pgphi_encrypt, pgphi_decrypt, pgphi_key_custodian, pgphi_key_auditor;
-- create_decrypted_view tells whether the view's reader holds the key (it
-- calls has_key_privilege), so it is for the roles that may ask.
GRANT EXECUTE ON FUNCTION pgphi.create_decrypted_view(regclass, text, regrole, name[], text, name)
    TO pgphi_key_custodian, pgphi_encrypt, pgphi_decrypt;
REVOKE ALL ON pgphi.key_inventory FROM PUBLIC;
GRANT SELECT ON pgphi.key_inventory TO pgphi_key_custodian, pgphi_key_auditor;
