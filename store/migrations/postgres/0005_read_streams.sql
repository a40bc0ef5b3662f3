-- The whole streams of several runs in one call: the runs in the order given, each run's
-- events in seq order. Read by the runtime for the runs of a batch it holds in no cache, one
-- round trip per batch instead of one per run.
--
-- PL/pgSQL, not SQL: a SQL function that cannot be inlined (one with SET clauses) is parsed and
-- planned again at every call, while PL/pgSQL keeps its plan for the session. Measured with
-- pgbench on the bench machine, ten fresh runs: 245 us per call as SQL, 158 us as PL/pgSQL,
-- 101 us for `SELECT 1`. capstan_inputs_seen (migration 0004), called before every batch,
-- becomes PL/pgSQL for the same reason. enable_seqscan stays off inside both, so a plan made
-- while a table was small never goes on scanning it whole.
CREATE FUNCTION capstan_read_streams(runs text[]) RETURNS SETOF events
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET jit = off
AS $$
BEGIN
    RETURN QUERY
        SELECT e.* FROM unnest(runs) WITH ORDINALITY AS r (run_id, ord)
          JOIN events e ON e.run_id = r.run_id
         ORDER BY r.ord, e.seq;
END
$$;

CREATE OR REPLACE FUNCTION capstan_inputs_seen(ids text[]) RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET jit = off
AS $$
BEGIN
    RETURN QUERY SELECT p.id FROM processed_inputs p WHERE p.id = ANY(ids);
END
$$;
