-- Last: the catalog audit triggers (86_catalog_audit.sql) on every table that
-- belongs to the extension at this point, whichever file created it, but
-- audit_log and audit_anchors (append-only: their own triggers refuse every
-- change; an anchor audited would itself need anchoring, forever). ALWAYS:
-- also under session_replication_role = replica.
DO $attach$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid::regclass AS rel, c.relname
               FROM pg_catalog.pg_depend d
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.objid
              WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                AND d.refobjid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e
                                                        WHERE e.extname OPERATOR(pg_catalog.=) 'pgphi')
                AND d.deptype OPERATOR(pg_catalog.=) 'e'
                AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::"char"[])
                AND c.relname OPERATOR(pg_catalog.<>) ALL (ARRAY['audit_log', 'audit_anchors']::pg_catalog.name[])
              ORDER BY c.relname
    LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW '
                                  'EXECUTE FUNCTION pgphi._audit_catalog_change()',
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_audit', 63), t.rel);
        EXECUTE pg_catalog.format('CREATE TRIGGER %I BEFORE TRUNCATE ON %s FOR EACH STATEMENT '
                                  'EXECUTE FUNCTION pgphi._audit_catalog_change()',
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_truncate', 63), t.rel);
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.rel,
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_audit', 63));
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.rel,
                                  pg_catalog.left(t.relname OPERATOR(pg_catalog.||) '_catalog_truncate', 63));
    END LOOP;
END
$attach$;
