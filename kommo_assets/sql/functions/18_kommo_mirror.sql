-- The current-state mirror (kommo_assets/sql/migrations/0013_current_state_mirror.sql): written by every
-- swap from its run's staging, in the swap's transaction, before production is derived from it.

-- Writes run p_run_id's staging into the mirror and returns the counts. A full refresh of [p_from, p_to)
-- read the whole window: the window's leads become exactly the ones it staged. An increment (p_from NULL)
-- read what changed: its leads are upserted and the leads it removes (stg_kommo_lead_removals) leave.
-- Contacts are upserted, never removed (a client stays a client). The select fields' options become the
-- ones the run read. An unchanged row is only read, not rewritten. The caller holds the
-- swap's lock and owns the transaction.
CREATE OR REPLACE FUNCTION kommo_mirror_write(p_run_id uuid, p_from timestamptz, p_to timestamptz) RETURNS jsonb
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_removed bigint;
    v_added bigint;
    v_changed bigint;
    v_contacts bigint;
    v_options bigint;
BEGIN
    IF NOT kommo_holds_lock('swap') THEN
        RAISE EXCEPTION 'kommo_mirror_write runs only inside run_kommo_full_refresh or run_kommo_increment';
    END IF;

    IF p_from IS NOT NULL THEN
        DELETE FROM kommo_leads m
         WHERE m.created_at >= p_from AND m.created_at < p_to
           AND NOT EXISTS (SELECT 1 FROM stg_kommo_leads s WHERE s.run_id = p_run_id AND s.lead_id = m.lead_id);
    ELSE
        DELETE FROM kommo_leads m
         USING stg_kommo_lead_removals r
         WHERE r.run_id = p_run_id AND m.lead_id = r.lead_id;
    END IF;
    GET DIAGNOSTICS v_removed = ROW_COUNT;

    WITH src AS MATERIALIZED (
        SELECT s.lead_id, s.contact_id, s.status_id, s.pipeline_id, s.responsible_user_id, s.price, s.name,
               s.vehicle_enum_id, s.source_enum_id, s.delivery_at, s.collect_at, s.created_at, s.updated_at,
               s.closed_at, m.lead_id IS NULL AS is_new,
               (m.contact_id, m.status_id, m.pipeline_id, m.responsible_user_id, m.price, m.name,
                m.vehicle_enum_id, m.source_enum_id, m.delivery_at, m.collect_at, m.created_at, m.updated_at,
                m.closed_at)
               IS DISTINCT FROM
               (s.contact_id, s.status_id, s.pipeline_id, s.responsible_user_id, s.price, s.name,
                s.vehicle_enum_id, s.source_enum_id, s.delivery_at, s.collect_at, s.created_at, s.updated_at,
                s.closed_at) AS differs
          FROM stg_kommo_leads s
          LEFT JOIN kommo_leads m ON m.lead_id = s.lead_id
         WHERE s.run_id = p_run_id
    ), upd AS (
        UPDATE kommo_leads m
           SET contact_id = src.contact_id, status_id = src.status_id, pipeline_id = src.pipeline_id,
               responsible_user_id = src.responsible_user_id, price = src.price, name = src.name,
               vehicle_enum_id = src.vehicle_enum_id, source_enum_id = src.source_enum_id,
               delivery_at = src.delivery_at, collect_at = src.collect_at, created_at = src.created_at,
               updated_at = src.updated_at, closed_at = src.closed_at, run_id = p_run_id, changed_at = now()
          FROM src
         WHERE m.lead_id = src.lead_id AND NOT src.is_new AND src.differs
        RETURNING 1
    ), ins AS (
        INSERT INTO kommo_leads (lead_id, contact_id, status_id, pipeline_id, responsible_user_id, price, name,
                                 vehicle_enum_id, source_enum_id, delivery_at, collect_at, created_at, updated_at,
                                 closed_at, run_id)
        SELECT src.lead_id, src.contact_id, src.status_id, src.pipeline_id, src.responsible_user_id, src.price,
               src.name, src.vehicle_enum_id, src.source_enum_id, src.delivery_at, src.collect_at, src.created_at,
               src.updated_at, src.closed_at, p_run_id
          FROM src
         WHERE src.is_new
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd) INTO v_added, v_changed;

    WITH src AS MATERIALIZED (
        SELECT c.contact_id, c.name, c.phone, c.email, m.contact_id IS NULL AS is_new,
               (m.name, m.phone, m.email) IS DISTINCT FROM (c.name, c.phone, c.email) AS differs
          FROM stg_kommo_contacts c
          LEFT JOIN kommo_contacts m ON m.contact_id = c.contact_id
         WHERE c.run_id = p_run_id
    ), upd AS (
        UPDATE kommo_contacts m
           SET name = src.name, phone = src.phone, email = src.email, run_id = p_run_id, changed_at = now()
          FROM src
         WHERE m.contact_id = src.contact_id AND NOT src.is_new AND src.differs
        RETURNING 1
    ), ins AS (
        INSERT INTO kommo_contacts (contact_id, name, phone, email, run_id)
        SELECT src.contact_id, src.name, src.phone, src.email, p_run_id FROM src WHERE src.is_new
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins) + (SELECT count(*) FROM upd) INTO v_contacts;

    -- Every run reads the options of both select fields the rules read (vehicle 1234163, source 823206): what
    -- it staged for them is all Kommo lists, none at all included.
    WITH staged AS (
        SELECT o.field_id, o.enum_id, o.value FROM stg_kommo_field_options o WHERE o.run_id = p_run_id
    ), gone AS (
        DELETE FROM kommo_field_options m
         WHERE m.field_id IN (1234163, 823206)
           AND NOT EXISTS (SELECT 1 FROM staged s WHERE s.field_id = m.field_id AND s.enum_id = m.enum_id)
        RETURNING 1
    ), put AS (
        INSERT INTO kommo_field_options AS m (field_id, enum_id, value)
        SELECT s.field_id, s.enum_id, s.value FROM staged s
        ON CONFLICT (field_id, enum_id) DO UPDATE SET value = EXCLUDED.value
         WHERE m.value IS DISTINCT FROM EXCLUDED.value
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM put) INTO v_options;

    RETURN jsonb_build_object('leads_added', v_added, 'leads_changed', v_changed, 'leads_removed', v_removed,
                              'contacts_changed', v_contacts, 'options_changed', v_options);
END;
$$;

-- The inputs outside a lead that the rules (kommo_snapshot) read, as they are in force now: each mapping
-- row, and each source option label the mirror holds. The vehicle options only name vehicles the swap
-- creates, which it never renames: they are not an input of any existing row.
CREATE OR REPLACE FUNCTION kommo_rules_in_force()
RETURNS TABLE (rule text, key bigint, value text)
LANGUAGE sql STABLE AS $$
    SELECT 'source_map', m.enum_id, m.source FROM kommo_source_map m
    UNION ALL
    SELECT 'status_map', m.status_id, m.booking_status FROM kommo_status_map m
    UNION ALL
    SELECT 'user_map', m.kommo_user_id, m.owner_id::text FROM kommo_user_map m
    UNION ALL
    SELECT 'source_option', o.enum_id, o.value FROM kommo_field_options o WHERE o.field_id = 823206
$$;

-- The rules whose value changed since production was last derived (kommo_derived_rules): added, edited
-- or removed, by rule and key, with the value in force (NULL: removed). Cheap (the mapping tables and the
-- options are small): the sync sensor asks it every tick, so a mapping edit starts a sync without asking
-- Kommo. (Dropped first: an earlier form returned no value.)
DROP FUNCTION IF EXISTS kommo_rules_changed();
CREATE FUNCTION kommo_rules_changed()
RETURNS TABLE (rule text, key bigint, value text)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(n.rule, d.rule), coalesce(n.key, d.key), n.value
      FROM kommo_rules_in_force() n
      FULL JOIN kommo_derived_rules d ON d.rule = n.rule AND d.key = n.key
     WHERE n.value IS DISTINCT FROM d.value
$$;

-- The mirror's leads whose rules changed since production was last derived, in order, but for those
-- created in [p_except_from, p_except_to) (a full refresh derives its whole window anyway); records the
-- rules in force as the ones production is derived with from now on (the caller derives those leads in
-- the same transaction). The caller holds the swap's lock.
DROP FUNCTION IF EXISTS kommo_take_rules_changes();
CREATE OR REPLACE FUNCTION kommo_take_rules_changes(p_except_from timestamptz, p_except_to timestamptz)
RETURNS bigint[]
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_leads bigint[];
BEGIN
    IF NOT kommo_holds_lock('swap') THEN
        RAISE EXCEPTION 'kommo_take_rules_changes runs only inside run_kommo_full_refresh or run_kommo_increment';
    END IF;
    -- The changes are read once, with their values: what is recorded is exactly what the leads were chosen
    -- for, so an edit committed meanwhile is left for the next sync (kommo_rules_changed still reports it).
    CREATE TEMP TABLE kommo_changed_rules ON COMMIT DROP AS SELECT * FROM kommo_rules_changed();
    IF NOT EXISTS (SELECT 1 FROM kommo_changed_rules) THEN
        DROP TABLE kommo_changed_rules;
        RETURN '{}';
    END IF;
    SELECT coalesce(array_agg(m.lead_id ORDER BY m.lead_id), '{}') INTO v_leads
      FROM kommo_leads m
     WHERE (m.source_enum_id IN (SELECT c.key FROM kommo_changed_rules c WHERE c.rule IN ('source_map', 'source_option'))
        OR m.status_id IN (SELECT c.key FROM kommo_changed_rules c WHERE c.rule = 'status_map')
        OR m.responsible_user_id IN (SELECT c.key FROM kommo_changed_rules c WHERE c.rule = 'user_map'))
       AND NOT (p_except_from IS NOT NULL AND m.created_at >= p_except_from AND m.created_at < p_except_to);
    DELETE FROM kommo_derived_rules d USING kommo_changed_rules c WHERE d.rule = c.rule AND d.key = c.key;
    INSERT INTO kommo_derived_rules (rule, key, value)
    SELECT c.rule, c.key, c.value FROM kommo_changed_rules c WHERE c.value IS NOT NULL;
    DROP TABLE kommo_changed_rules;
    RETURN v_leads;
END;
$$;

-- The local drift check: what deriving production from the mirror now would change in window
-- [p_from, p_to), as the change preview counts it (kommo_snapshot_preview with the mirror as source),
-- without asking Kommo. Every count is 0 while production follows the mirror; anything else is drift
-- (a write to production outside the import, or a rule change no swap has applied yet:
-- kommo_rules_changed). Read-only.
CREATE OR REPLACE FUNCTION kommo_mirror_drift(p_from timestamptz, p_to timestamptz, p_sample integer DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN kommo_snapshot_preview(NULL, p_from, p_to, NULL, p_sample);
END;
$$;
