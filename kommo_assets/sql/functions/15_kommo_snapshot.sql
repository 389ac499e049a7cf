-- The code of a Kommo lead's rows: sales_leads.lead_code and bookings.source_payload_id.
CREATE OR REPLACE FUNCTION kommo_lead_code(p_lead_id bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'kommo:' || p_lead_id
$$;

-- What Kommo's leads resolve to, one row per lead: the single definition of the mapping rules. The
-- leads come from one of two places:
--   * a run's staging (p_run_id given): what that run read, for its change preview (a full refresh's
--     guard, the nightly dry run, an increment's guard) and kommo_snapshot_clients;
--   * the current-state mirror (p_run_id NULL: kommo_leads, kommo_field_options; 18_kommo_mirror.sql):
--     the leads created in [p_from, p_to) (none when p_from is NULL) and those in p_lead_ids, for the swap
--     (kommo_apply_snapshot) and the local drift check (kommo_mirror_drift).
-- The rules:
--   status 143 is dropped (re-checked here although the client filters it);
--   is_booking: every status but 79790631, 91703923 and 143;
--   booking_status from kommo_status_map, 'pending' when unmapped;
--   source from kommo_source_map, else the option's label in Kommo (field 823206);
--   owner from kommo_user_map on responsible_user_id;
--   vehicle_name (for vehicles the swap creates) from the option's label (field 1234163), else a placeholder;
--   start/end from Delivery (1218176) / Collect (1218178): when one is missing, both take the other.
-- The inputs outside a lead that these rules read are the ones kommo_rules_changed (18_kommo_mirror.sql)
-- watches: change both together. Planned with the actual arguments (plan_cache_mode), so the source not
-- read is folded away and a list of leads becomes lookups on the mirror's key.
DROP FUNCTION IF EXISTS kommo_snapshot(uuid);
CREATE OR REPLACE FUNCTION kommo_snapshot(p_run_id uuid, p_from timestamptz DEFAULT NULL,
                                          p_to timestamptz DEFAULT NULL, p_lead_ids bigint[] DEFAULT NULL)
RETURNS TABLE (
    lead_id bigint, code text, contact_id bigint, status_id bigint, pipeline_id bigint, name text,
    price numeric, owner_id uuid, vehicle_enum_id bigint, vehicle_name text, source text, booking_status text,
    start_at timestamptz, end_at timestamptz, created_at timestamptz, updated_at timestamptz,
    closed_at timestamptz, is_booking boolean
)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH l AS (
        -- (stg_kommo_booking_vehicles holds the same vehicle_enum_id, kept in step by the staging writer)
        SELECT s.lead_id, s.contact_id, s.status_id, s.pipeline_id, s.responsible_user_id, s.price, s.name,
               s.vehicle_enum_id, s.source_enum_id, s.delivery_at, s.collect_at, s.created_at, s.updated_at,
               s.closed_at
          FROM stg_kommo_leads s
         WHERE p_run_id IS NOT NULL AND s.run_id = p_run_id
        UNION ALL
        SELECT m.lead_id, m.contact_id, m.status_id, m.pipeline_id, m.responsible_user_id, m.price, m.name,
               m.vehicle_enum_id, m.source_enum_id, m.delivery_at, m.collect_at, m.created_at, m.updated_at,
               m.closed_at
          FROM kommo_leads m
         WHERE p_run_id IS NULL
           AND ((p_from IS NOT NULL AND m.created_at >= p_from AND m.created_at < p_to)
                OR m.lead_id = ANY (p_lead_ids))
    ), o AS (
        SELECT x.field_id, x.enum_id, x.value FROM stg_kommo_field_options x
         WHERE p_run_id IS NOT NULL AND x.run_id = p_run_id
        UNION ALL
        SELECT x.field_id, x.enum_id, x.value FROM kommo_field_options x WHERE p_run_id IS NULL
    )
    SELECT l.lead_id,
           'kommo:' || l.lead_id,  -- kommo_lead_code, written out: pinned functions are not inlined
           l.contact_id,
           l.status_id,
           l.pipeline_id,
           l.name,
           l.price,
           um.owner_id,
           l.vehicle_enum_id,
           coalesce(vehopt.value, 'Kommo vehicle #' || l.vehicle_enum_id),
           coalesce(srcmap.source, srcopt.value),
           coalesce(stmap.booking_status, 'pending'),
           coalesce(l.delivery_at, l.collect_at),
           coalesce(l.collect_at, l.delivery_at),
           l.created_at,
           l.updated_at,
           l.closed_at,
           coalesce(l.status_id, 0) NOT IN (79790631, 91703923, 143)
      FROM l
      LEFT JOIN o vehopt ON vehopt.field_id = 1234163 AND vehopt.enum_id = l.vehicle_enum_id
      LEFT JOIN kommo_user_map um ON um.kommo_user_id = l.responsible_user_id
      LEFT JOIN kommo_source_map srcmap ON srcmap.enum_id = l.source_enum_id
      LEFT JOIN o srcopt ON srcopt.field_id = 823206 AND srcopt.enum_id = l.source_enum_id
      LEFT JOIN kommo_status_map stmap ON stmap.status_id = l.status_id
     WHERE coalesce(l.status_id, 0) <> 143;
END;
$$;

-- Whether a row is the import's own and belongs to window [p_from, p_to): its code is 'kommo:<lead id>'
-- (sales_leads.lead_code, bookings.source_payload_id) and its lead's Kommo created_at (kommo_created_at
-- of either table) is in the window. The single definition of what a refresh of a window may archive or
-- deactivate: the swap and the change preview use it, and so can any later import ('-infinity' and
-- 'infinity' for no window at all). sales_leads.source and bookings.channel play no part: the app may
-- write 'Kommo' there itself, and a row the app writes never carries a 'kommo:' code.
-- Every project function pins its search_path (docs/security.md), and PostgreSQL never inlines a function
-- with a SET clause: the swap and the change preview therefore write this expression out in their WHERE
-- clauses, where it matches the partial indexes sales_leads_kommo_live / bookings_kommo_active (as does
-- kommo_lead_code's in kommo_snapshot). Change all of them together.
CREATE OR REPLACE FUNCTION kommo_owned(p_code text, p_kommo_created_at timestamptz, p_from timestamptz,
                                       p_to timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_code LIKE 'kommo:%' AND p_kommo_created_at >= p_from AND p_kommo_created_at < p_to
$$;

-- The rows an increment may archive or deactivate: the codes of every lead it staged (whatever its
-- status: a lead moved to 143 is staged and left out of the snapshot) and of every lead it removes
-- (deleted in Kommo, stg_kommo_lead_removals). A full refresh's scope is its window instead (kommo_owned);
-- the swap and the previews apply either with the same statements.
CREATE OR REPLACE FUNCTION kommo_increment_scope(p_run_id uuid) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(x.code ORDER BY x.code), '{}')
      FROM (SELECT 'kommo:' || l.lead_id AS code FROM stg_kommo_leads l WHERE l.run_id = p_run_id  -- kommo_lead_code
            UNION
            SELECT 'kommo:' || r.lead_id FROM stg_kommo_lead_removals r WHERE r.run_id = p_run_id) x
$$;

-- What Kommo's contacts make of the clients, one row per contact: the client it updates (NULL: a client
-- to add), the values the client holds afterwards, and whether they differ from today's. The contacts
-- are a run's staged ones (p_run_id given), or (p_run_id NULL) the mirror's main contacts of the mirror's
-- leads created in [p_from, p_to) (the local drift check).
-- A missing client is added only for the main contact of a lead in the snapshot (linked): a full
-- refresh stages exactly those, and an increment also stages contacts Kommo changed, which update the
-- clients that exist and are otherwise no business of the import.
-- Clients are matched on kommo_contact_id only, so a client the app created (no Kommo id) is never read.
-- A field Kommo has empty (no name, phone or email) keeps the client's current value: an empty Kommo
-- field cannot tell "removed in Kommo" from "never entered there", and clearing it would erase what the
-- app's staff typed in. A value Kommo has always wins.
DROP FUNCTION IF EXISTS kommo_snapshot_clients(uuid);
CREATE OR REPLACE FUNCTION kommo_snapshot_clients(p_run_id uuid, p_from timestamptz DEFAULT NULL,
                                                  p_to timestamptz DEFAULT NULL)
RETURNS TABLE (contact_id bigint, client_id uuid, name text, phone text, email text, differs boolean,
               linked boolean)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH l AS MATERIALIZED (
        -- A join, not "IN (SELECT ...)" in the select list: that is a subplan, hashed only while the
        -- snapshot's contact ids fit in work_mem and otherwise rescanned for every contact (720k
        -- contacts x 1M leads never finished); a hash join spills to disk and stays linear.
        SELECT DISTINCT s.contact_id FROM kommo_snapshot(p_run_id, p_from, p_to) s WHERE s.contact_id IS NOT NULL
    ), c AS (
        SELECT x.contact_id, x.name, x.phone, x.email FROM stg_kommo_contacts x
         WHERE p_run_id IS NOT NULL AND x.run_id = p_run_id
        UNION ALL
        SELECT x.contact_id, x.name, x.phone, x.email FROM kommo_contacts x JOIN l ON l.contact_id = x.contact_id
         WHERE p_run_id IS NULL
    )
    SELECT x.contact_id, x.client_id, x.name, x.phone, x.email,
           x.client_id IS NOT NULL AND (x.old_name, x.old_phone, x.old_email) IS DISTINCT FROM (x.name, x.phone, x.email),
           x.linked
      FROM (SELECT c.contact_id, t.id AS client_id, t.name AS old_name, t.phone AS old_phone, t.email AS old_email,
                   coalesce(nullif(c.name, ''), t.name) AS name,
                   coalesce(nullif(c.phone, ''), t.phone) AS phone,
                   coalesce(nullif(c.email, ''), t.email) AS email,
                   l.contact_id IS NOT NULL AS linked
              FROM c
              LEFT JOIN clients t ON t.kommo_contact_id = c.contact_id
              LEFT JOIN l ON l.contact_id = c.contact_id) x;
END;
$$;
