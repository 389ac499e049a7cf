-- Performance of the full refresh (benchmark: docs/benchmark.md).

-- 1. The Zoho outbox triggers decide in their WHEN clause whether a row is queued. Inside the refresh
--    (kommo.suppress_outbox = on, set transaction-locally by run_kommo_full_refresh) the row is then
--    skipped before any function call and before the after-trigger queue holds an event for it, instead
--    of one PL/pgSQL call per row that returns at once. For every other write the trigger fires as
--    before, with the same function, so the outbox gets exactly what it got.
DROP TRIGGER bookings_zoho_outbox ON bookings;
DROP TRIGGER booking_vehicles_zoho_outbox ON booking_vehicles;
DROP TRIGGER sales_leads_zoho_outbox ON sales_leads;

CREATE TRIGGER bookings_zoho_outbox AFTER INSERT OR UPDATE OR DELETE ON bookings
    FOR EACH ROW WHEN (coalesce(current_setting('kommo.suppress_outbox', true), '') <> 'on')
    EXECUTE FUNCTION zoho_outbox_enqueue();
CREATE TRIGGER booking_vehicles_zoho_outbox AFTER INSERT OR UPDATE OR DELETE ON booking_vehicles
    FOR EACH ROW WHEN (coalesce(current_setting('kommo.suppress_outbox', true), '') <> 'on')
    EXECUTE FUNCTION zoho_outbox_enqueue();
CREATE TRIGGER sales_leads_zoho_outbox AFTER INSERT OR UPDATE OR DELETE ON sales_leads
    FOR EACH ROW WHEN (coalesce(current_setting('kommo.suppress_outbox', true), '') <> 'on')
    EXECUTE FUNCTION zoho_outbox_enqueue();

-- 2. Staging statistics. Staging keeps several runs; right after a run is staged the planner must know
--    its run id (otherwise 100,000 fresh rows look like none, and the snapshot's joins turn into nested
--    loops over a whole run). Staging ends with ANALYZE of run_id only; a small statistics target keeps
--    that to a few thousand sampled rows instead of 30,000 (the lead rows are wide: raw payloads).
ALTER TABLE stg_kommo_leads ALTER COLUMN run_id SET STATISTICS 10;
ALTER TABLE stg_kommo_contacts ALTER COLUMN run_id SET STATISTICS 10;
ALTER TABLE stg_kommo_booking_vehicles ALTER COLUMN run_id SET STATISTICS 10;
ALTER TABLE stg_kommo_field_options ALTER COLUMN run_id SET STATISTICS 10;
