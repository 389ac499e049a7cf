-- What the calendar UI reads: manual events plus active, dated Kommo bookings. It runs as its reader
-- (security_invoker): the row level security the app puts on calendar_events, bookings and sales_leads
-- applies through it, and a reader without privileges on them reads nothing.
CREATE OR REPLACE VIEW calendar_events_expanded WITH (security_invoker = true) AS
SELECT 'manual'::text       AS kind,
       e.id                 AS id,
       e.id                 AS event_id,
       NULL::uuid           AS booking_id,
       e.title              AS title,
       e.vehicle_id         AS vehicle_id,
       e.start_at           AS start_at,
       e.end_at             AS end_at
  FROM calendar_events e
UNION ALL
SELECT 'kommo_booking'::text,
       b.id,
       NULL::uuid,
       b.id,
       coalesce(sl.name, b.source_payload_id),
       b.vehicle_id,
       b.start_at,
       b.end_at
  FROM bookings b
  LEFT JOIN sales_leads sl ON sl.id = b.sales_lead_id
 WHERE b.channel = 'Kommo' AND b.is_active AND b.start_at IS NOT NULL;
