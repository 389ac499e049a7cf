-- What a run's staging resolves to, one row per lead: the single definition of the mapping rules,
-- shared by the swap (run_kommo_full_refresh) and the change preview (kommo_change_preview).
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
           'kommo:' || l.lead_id,
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
