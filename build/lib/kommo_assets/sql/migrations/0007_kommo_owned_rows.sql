-- Which rows the import owns, and the window a full refresh replaces (kommo_owned, 15_kommo_snapshot.sql).
--
-- A row is the import's own by its code alone: sales_leads.lead_code / bookings.source_payload_id
-- 'kommo:<lead id>'. sales_leads.source and bookings.channel say where a row came from, and the app may
-- write 'Kommo' there itself; the refresh no longer archives or deactivates by them.

-- 1. An app insert without a source no longer becomes a 'Kommo' lead (the refresh writes 'Kommo' itself).
--    NOT NULL goes with the default: an app row may have no source at all.
ALTER TABLE sales_leads ALTER COLUMN source DROP DEFAULT, ALTER COLUMN source DROP NOT NULL;

-- 2. A refresh of window W replaces the rows whose Kommo created_at is in W. Bookings carry it too
--    (bookings.kommo_created_at, the lead's), so the same predicate reads one row of either table, with
--    no join to the sales lead on every swap. sales_leads.created_at becomes Kommo's created_at, as
--    kommo_created_at already is (the swap keeps the two equal).
ALTER TABLE bookings ADD COLUMN kommo_created_at timestamptz;

-- The backfill corrects data the import owns; like a refresh it queues nothing for Zoho and leaves
-- updated_at alone (transaction-local setting: this migration runs in its own transaction).
SELECT set_config('kommo.suppress_outbox', 'on', true);
UPDATE sales_leads
   SET created_at = kommo_created_at
 WHERE lead_code LIKE 'kommo:%' AND kommo_created_at IS NOT NULL AND created_at <> kommo_created_at;
UPDATE bookings b
   SET kommo_created_at = sl.kommo_created_at
  FROM sales_leads sl
 WHERE sl.lead_code = b.source_payload_id AND b.source_payload_id LIKE 'kommo:%';

-- 3. The rows a refresh may archive or deactivate: the live own rows of a window. The indexes they
--    replace were keyed on source / channel = 'Kommo', which the refresh no longer filters on.
DROP INDEX sales_leads_kommo_live;
DROP INDEX bookings_kommo_active;
CREATE INDEX sales_leads_kommo_live ON sales_leads (kommo_created_at)
    WHERE lead_code LIKE 'kommo:%' AND archived_at IS NULL;
CREATE INDEX bookings_kommo_active ON bookings (kommo_created_at)
    WHERE source_payload_id LIKE 'kommo:%' AND is_active;

-- 4. The drop guard looks up the last succeeded full refresh of the same window.
DROP INDEX kommo_import_runs_last_success;
CREATE INDEX kommo_import_runs_last_success ON kommo_import_runs (created_from, created_to, finished_at DESC)
    WHERE status = 'succeeded' AND NOT dry_run;
