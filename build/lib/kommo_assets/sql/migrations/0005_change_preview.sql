-- What a run would change in production, computed from staging before the swap (kommo_change_preview).
ALTER TABLE kommo_import_runs ADD COLUMN change_preview jsonb;
