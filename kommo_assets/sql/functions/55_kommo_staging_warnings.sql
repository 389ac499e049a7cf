-- The counts of the non-blocking staging checks, by the snapshot's rules (kommo_snapshot): the single
-- definition. The change preview stores them on the run as it stages (passing the count of vehicles it
-- found the swap will create); the checks read them back from there.
--   unmapped_status: bookings whose status has no kommo_status_map row (they import as 'pending');
--   booking_without_dates: bookings with neither delivery nor collect date (off the calendar);
--   lead_without_contact: leads without a main contact (imported without a client).
CREATE OR REPLACE FUNCTION kommo_staging_warnings(p_run_id uuid, p_vehicles_to_create integer)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
               'unmapped_status', count(*) FILTER (WHERE s.is_booking AND m.status_id IS NULL),
               'booking_without_dates', count(*) FILTER (WHERE s.is_booking AND s.start_at IS NULL),
               'lead_without_contact', count(*) FILTER (WHERE s.contact_id IS NULL),
               'vehicles_to_create', p_vehicles_to_create)
      FROM kommo_snapshot(p_run_id) s
      LEFT JOIN kommo_status_map m ON m.status_id = s.status_id
$$;
