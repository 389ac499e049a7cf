-- Foreign keys during a bulk load: the first refresh into empty tables, or a window of mostly new leads.
--
-- PostgreSQL checks a foreign key with a trigger per inserted row. The 320,000 rows that a first refresh of
-- 100,000 leads creates carry 470,000 such checks: about 2.5 s, a third of the swap. PostgreSQL's own advice
-- for bulk loading (the "Populating a Database" chapter: remove foreign key constraints) is to drop them,
-- load, and add them back, which checks every row in one join (about 0.2 s here). Inside the swap's
-- transaction this stays all-or-nothing: the keys are added back before the commit, a row that breaks one
-- fails the swap as a row check would, and any error rolls the drop back with everything else.
--
-- Only validated foreign keys between the five tables the swap writes are suspended, with their names,
-- definitions (ON DELETE, DEFERRABLE, ...) and comments. Dropping them needs those tables locked in ACCESS
-- EXCLUSIVE mode, so while a bulk swap runs (seconds) the app's reads of them wait. When the locks cannot be
-- had within kommo.bulk_lock_timeout (default 2s), or the swap's role may not alter the tables (it does not
-- own them), nothing is suspended and the rows are checked one by one, as on every other run.

CREATE OR REPLACE FUNCTION kommo_suspend_foreign_keys(OUT restore text[], OUT refused text)
LANGUAGE plpgsql AS $$
DECLARE
    v_tables regclass[] := ARRAY['clients', 'vehicles', 'sales_leads', 'bookings', 'booking_vehicles']::regclass[];
    v_drop text[];
    v_statement text;
    v_lock_timeout text := current_setting('lock_timeout');
BEGIN
    SELECT coalesce(array_agg(format('ALTER TABLE %s ADD CONSTRAINT %I %s', c.conrelid::regclass, c.conname,
                                     pg_get_constraintdef(c.oid)) ORDER BY c.conrelid, c.conname), '{}')
           || coalesce(array_agg(format('COMMENT ON CONSTRAINT %I ON %s IS %L', c.conname, c.conrelid::regclass,
                                        obj_description(c.oid, 'pg_constraint')) ORDER BY c.conrelid, c.conname)
                       FILTER (WHERE obj_description(c.oid, 'pg_constraint') IS NOT NULL), '{}'),
           array_agg(format('ALTER TABLE %s DROP CONSTRAINT %I', c.conrelid::regclass, c.conname))
      INTO restore, v_drop
      FROM pg_constraint c
     WHERE c.contype = 'f' AND c.convalidated AND c.conparentid = 0
       AND c.conrelid = ANY (v_tables) AND c.confrelid = ANY (v_tables);
    IF v_drop IS NULL THEN
        restore := '{}';
        RETURN;
    END IF;
    BEGIN
        PERFORM set_config('lock_timeout',
                           coalesce(nullif(current_setting('kommo.bulk_lock_timeout', true), ''), '2s'), true);
        LOCK TABLE clients, vehicles, sales_leads, bookings, booking_vehicles IN ACCESS EXCLUSIVE MODE;
        FOREACH v_statement IN ARRAY v_drop LOOP
            EXECUTE v_statement;
        END LOOP;
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    EXCEPTION
        -- The block's locks, drops and setting are undone: the swap goes on with its keys checked per row.
        WHEN lock_not_available THEN
            restore := NULL;
            refused := 'the tables were busy';
        WHEN insufficient_privilege THEN
            restore := NULL;
            refused := 'the role may not alter the tables';
    END;
END;
$$;

CREATE OR REPLACE FUNCTION kommo_restore_foreign_keys(p_statements text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_statement text;
BEGIN
    FOREACH v_statement IN ARRAY p_statements LOOP
        EXECUTE v_statement;
    END LOOP;
END;
$$;
