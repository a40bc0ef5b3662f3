-- Three indexes of the run index go: runs_status, runs_service and runs_stage (see the
-- PostgreSQL migration of the same name). runs_status served the unfinished runs read at
-- start; a partial index with the query's own condition serves it now, and holds only the
-- runs still under way.
DROP INDEX IF EXISTS runs_status;
DROP INDEX IF EXISTS runs_service;
DROP INDEX IF EXISTS runs_stage;
CREATE INDEX runs_unfinished ON runs (created_at_ms, run_id) WHERE status NOT IN ('finished', 'cancelled');
