-- The code of a Kommo lead's rows: sales_leads.lead_code and bookings.source_payload_id.
CREATE OR REPLACE FUNCTION kommo_lead_code(p_lead_id bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'kommo:' || p_lead_id
$$;

-- What a run's staging resolves to, one row per lead: the single definition of the mapping rules,
-- shared by the swap (run_kommo_full_refresh) and the change preview (kommo_change_preview). Below it,
-- the rows a refresh owns (kommo_owned) and what staged contacts make of the clients (kommo_snapshot_clients).
--   status 143 is dropped (re-checked here although the client filters it);
--   is_booking: every status but 79790631, 91703923 and 143;
--   booking_status from kommo_status_map, 'pending' when unmapped;
--   source from kommo_source_map, else the option's label in Kommo (field 823206);
--   owner from kommo_user_map on responsible_user_id;
--   vehicle_name (for vehicles the swap creates) from the option's label (field 1234163), else a placeholder;
--   start/end from Delivery (1218176) / Collect (1218178): when one is missing, both take the other.
DROP FUNCTION IF EXISTS kommo_snapshot(uuid);
CREATE FUNCTION kommo_snapshot(p_run_id uuid)
RETURNS TABLE (
    lead_id bigint, code text, contact_id bigint, status_id bigint, pipeline_id bigint, name text,
    price numeric, owner_id uuid, vehicle_enum_id bigint, vehicle_name text, source text, booking_status text,
    start_at timestamptz, end_at timestamptz, created_at timestamptz, updated_at timestamptz,
    closed_at timestamptz, is_booking boolean
)
LANGUAGE sql STABLE AS $$
    SELECT l.lead_id,
           'kommo:' || l.lead_id,  -- kommo_lead_code, written out: pinned functions are not inlined
           l.contact_id,
           l.status_id,
           l.pipeline_id,
           l.name,
           l.price,
           um.owner_id,
           bv.vehicle_enum_id,
           coalesce(vehopt.value, 'Kommo vehicle #' || bv.vehicle_enum_id),
           coalesce(srcmap.source, srcopt.value),
           coalesce(stmap.booking_status, 'pending'),
           coalesce(l.delivery_at, l.collect_at),
           coalesce(l.collect_at, l.delivery_at),
           l.created_at,
           l.updated_at,
           l.closed_at,
           coalesce(l.status_id, 0) NOT IN (79790631, 91703923, 143)
      FROM stg_kommo_leads l
      LEFT JOIN stg_kommo_booking_vehicles bv ON bv.run_id = l.run_id AND bv.lead_id = l.lead_id
      LEFT JOIN stg_kommo_field_options vehopt
             ON vehopt.run_id = l.run_id AND vehopt.field_id = 1234163 AND vehopt.enum_id = bv.vehicle_enum_id
      LEFT JOIN kommo_user_map um ON um.kommo_user_id = l.responsible_user_id
      LEFT JOIN kommo_source_map srcmap ON srcmap.enum_id = l.source_enum_id
      LEFT JOIN stg_kommo_field_options srcopt
             ON srcopt.run_id = l.run_id AND srcopt.field_id = 823206 AND srcopt.enum_id = l.source_enum_id
      LEFT JOIN kommo_status_map stmap ON stmap.status_id = l.status_id
     WHERE l.run_id = p_run_id
       AND coalesce(l.status_id, 0) <> 143
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

-- What a run's staged contacts make of the clients, one row per contact: the client it updates (NULL:
-- a client to add), the values the client holds afterwards, and whether they differ from today's.
-- A missing client is added only for the main contact of a lead in the snapshot (linked): a full
-- refresh stages exactly those, and an increment also stages contacts Kommo changed, which update the
-- clients that exist and are otherwise no business of the import.
-- Clients are matched on kommo_contact_id only, so a client the app created (no Kommo id) is never read.
-- A field Kommo has empty (no name, phone or email) keeps the client's current value: an empty Kommo
-- field cannot tell "removed in Kommo" from "never entered there", and clearing it would erase what the
-- app's staff typed in. A value Kommo has always wins.
DROP FUNCTION IF EXISTS kommo_snapshot_clients(uuid);
CREATE FUNCTION kommo_snapshot_clients(p_run_id uuid)
RETURNS TABLE (contact_id bigint, client_id uuid, name text, phone text, email text, differs boolean,
               linked boolean)
LANGUAGE sql STABLE AS $$
    SELECT x.contact_id, x.client_id, x.name, x.phone, x.email,
           x.client_id IS NOT NULL AND (x.old_name, x.old_phone, x.old_email) IS DISTINCT FROM (x.name, x.phone, x.email),
           x.linked
      FROM (SELECT c.contact_id, t.id AS client_id, t.name AS old_name, t.phone AS old_phone, t.email AS old_email,
                   coalesce(nullif(c.name, ''), t.name) AS name,
                   coalesce(nullif(c.phone, ''), t.phone) AS phone,
                   coalesce(nullif(c.email, ''), t.email) AS email,
                   l.contact_id IS NOT NULL AS linked
              FROM stg_kommo_contacts c
              LEFT JOIN clients t ON t.kommo_contact_id = c.contact_id
              -- A join, not "IN (SELECT ...)" in the select list: that is a subplan, hashed only while the
              -- snapshot's contact ids fit in work_mem and otherwise rescanned for every contact (720k
              -- contacts x 1M leads never finished); a hash join spills to disk and stays linear.
              LEFT JOIN (SELECT DISTINCT s.contact_id FROM kommo_snapshot(p_run_id) s
                          WHERE s.contact_id IS NOT NULL) l ON l.contact_id = c.contact_id
             WHERE c.run_id = p_run_id) x
$$;
