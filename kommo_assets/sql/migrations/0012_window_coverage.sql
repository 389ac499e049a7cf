-- Coverage per window: how far Kommo has been read for the leads created in each window.
--
-- Until now the sync kept one cursor for every window (kommo_sync_state.cursor), so a window that joined
-- the scope later (by configuration, or a new year at its first second) was never read for what had been
-- created in it before that cursor. Now each window records its own point on Kommo's clock: every change
-- Kommo stamped before covered_to, to a lead created in the window, is in production. A full refresh of
-- the window sets it to the refresh's Kommo clock, an increment to the Kommo clock it read up to, for
-- every window it covered; it never moves back. A window in scope without a row has never been read: the
-- sync reads it from its first second (kommo_sync_cursor), and bookings_fresh fails until it has.
CREATE TABLE kommo_window_coverage (
    created_from timestamptz NOT NULL,
    created_to   timestamptz NOT NULL,
    covered_to   timestamptz NOT NULL,
    run_id       uuid REFERENCES kommo_import_runs (id) ON DELETE SET NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (created_from, created_to),
    CHECK (created_from < created_to)
);
REVOKE ALL ON kommo_window_coverage FROM PUBLIC;

-- A window's coverage to start from: its latest succeeded full refresh with a Kommo clock. The old global
-- cursor is not carried over: which windows it covered depended on the configuration of the day, so a
-- window's coverage is only what a refresh of that very window proves. The first sync after this
-- migration re-reads the changes since then, which applying again leaves as they are.
INSERT INTO kommo_window_coverage (created_from, created_to, covered_to, run_id)
SELECT DISTINCT ON (r.created_from, r.created_to) r.created_from, r.created_to, r.kommo_clock_at, r.id
  FROM kommo_import_runs r
 WHERE r.status = 'succeeded' AND r.kind = 'full_refresh' AND r.kommo_clock_at IS NOT NULL
 ORDER BY r.created_from, r.created_to, r.finished_at DESC;

-- kommo_sync_state keeps when the sync last proved production up to date (an increment or an idle
-- probe: what bookings_fresh reads); where it reads from is the windows' coverage now.
ALTER TABLE kommo_sync_state DROP COLUMN cursor;
