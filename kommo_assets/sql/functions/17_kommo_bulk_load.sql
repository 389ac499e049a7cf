-- Foreign keys during a bulk load: the first refresh into empty tables, or a window of mostly new leads.
--
-- PostgreSQL checks a foreign key with a trigger per inserted row. The 320,000 rows that a first refresh of
-- 100,000 leads creates carry 470,000 such checks: 2 to 3 s, about a third of the swap. PostgreSQL's own
-- advice for bulk loading (the "Populating a Database" chapter: remove foreign key constraints) is to drop
-- them, load, and add them back, which checks every row in one join (about 0.2 s here). Inside the swap's
-- transaction this stays all-or-nothing: the keys are added back before the commit, a row that breaks one
-- fails the swap as a row check would, and any error rolls the drop back with everything else.
--
-- Only validated foreign keys between the five tables the swap writes are suspended, with their names,
-- definitions (ON DELETE, DEFERRABLE, ...) and comments. Dropping them needs those tables locked in ACCESS
-- EXCLUSIVE mode, so while a bulk swap runs (seconds) the app's queries on them wait. The locks are asked
-- for all at once without waiting (NOWAIT), again every 20 ms while the app holds any of them, for at most
-- kommo.bulk_lock_timeout (default 2s): the swap never waits while holding one, so it can neither deadlock
-- with the app nor make the app's queries queue behind a lock it does not have yet. If the locks cannot be
-- had in that time, or the swap's role may not alter the tables (it does not own them), nothing is
-- suspended and the rows are checked one by one, as on every other run.

-- Whether a swap that adds p_new_leads sales leads is a bulk load: at least kommo.bulk_load_min_new_leads
-- (default 10,000) and at least a tenth of sales_leads. Adding the keys back checks the whole tables in
-- one pass, about ten times cheaper per row than checking new rows one by one; below a tenth that no
-- longer pays. A setting that is not a whole number is reported and the default used.
CREATE OR REPLACE FUNCTION kommo_is_bulk_load(p_new_leads bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_setting text := nullif(btrim(current_setting('kommo.bulk_load_min_new_leads', true)), '');
    v_min bigint := 10000;
BEGIN
    IF v_setting ~ '^[0-9]{1,18}$' THEN
        v_min := v_setting::bigint;
    ELSIF v_setting IS NOT NULL THEN
        RAISE WARNING 'kommo.bulk_load_min_new_leads must be a whole number, got %; using 10000', v_setting;
    END IF;
    RETURN p_new_leads >= v_min AND p_new_leads * 10 >= (SELECT count(*) FROM sales_leads);
END;
$$;

-- Suspends the keys; returns the statements that put them back (restore), or NULL and why not (refused).
-- Only run_kommo_full_refresh calls it, inside its transaction: anywhere else the drops could commit on
-- their own, so it refuses to run outside the swap (recognised by the swap's transaction lock).
CREATE OR REPLACE FUNCTION kommo_suspend_foreign_keys(OUT restore text[], OUT refused text)
LANGUAGE plpgsql AS $$
DECLARE
    v_tables regclass[] := ARRAY['clients', 'vehicles', 'sales_leads', 'bookings', 'booking_vehicles']::regclass[];
    v_drop text[];
    v_statement text;
    v_setting text := nullif(btrim(current_setting('kommo.bulk_lock_timeout', true)), '');
    v_wait interval := interval '2 seconds';
    v_deadline timestamptz;
BEGIN
    IF NOT kommo_holds_lock('swap') THEN
        RAISE EXCEPTION 'kommo_suspend_foreign_keys runs only inside run_kommo_full_refresh';
    END IF;
    IF v_setting IS NOT NULL THEN
        BEGIN
            v_wait := v_setting::interval;
        EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
            RAISE WARNING 'kommo.bulk_lock_timeout must be an interval such as 2s or 500ms, got %; using 2s',
                v_setting;
        END;
    END IF;
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
    v_deadline := clock_timestamp() + v_wait;
    LOOP
        BEGIN
            LOCK TABLE clients, vehicles, sales_leads, bookings, booking_vehicles IN ACCESS EXCLUSIVE MODE NOWAIT;
            FOREACH v_statement IN ARRAY v_drop LOOP
                EXECUTE v_statement;
            END LOOP;
            RETURN;
        EXCEPTION
            -- Whatever the block took is given back: the locks it had and any key it dropped.
            WHEN lock_not_available THEN
                IF clock_timestamp() >= v_deadline THEN
                    restore := NULL;
                    refused := 'the tables were busy';
                    RETURN;
                END IF;
            WHEN insufficient_privilege THEN
                restore := NULL;
                refused := 'the role may not alter the tables';
                RETURN;
        END;
        PERFORM pg_sleep(0.02);
    END LOOP;
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
