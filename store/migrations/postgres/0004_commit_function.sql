-- A whole commit in one call, so it costs one round trip instead of ten (see the module doc of
-- store/src/postgres/mod.rs). The caller runs it as a single autocommit statement. Every array
-- is one column; rows of one table are at the same index in its arrays.
--
-- The position lock (the UPDATE of event_position) is taken last and held until the call's
-- implicit commit: for the events insert and the WAL flush only, never across a network round
-- trip. Statements of a VOLATILE PL/pgSQL function each take a new snapshot under READ
-- COMMITTED, so the version check after the lock sees every earlier appending commit.
--
-- Errors the caller maps by SQLSTATE:
--   CP001  an input or event id is already recorded; MESSAGE is the first such id (batch order)
--   CP002  a run's version is not the expected one; MESSAGE is the run id, DETAIL
--          "<expected> <actual>"
--
-- enable_seqscan is off inside the call: every statement here is a key lookup, and a plan cached
-- while a table was small (a new database) would otherwise go on scanning it whole.

-- Raises CP001 with the first of `wanted` (in order) that is not in `written`: the id an insert
-- with ON CONFLICT DO NOTHING skipped because it was already stored. Nothing to look for when
-- every id was written, the usual case.
CREATE FUNCTION capstan_refuse_missing(wanted text[], written text[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    missing text;
BEGIN
    IF coalesce(cardinality(written), 0) = cardinality(wanted) THEN
        RETURN;
    END IF;
    SELECT u.id INTO missing FROM unnest(wanted) WITH ORDINALITY AS u (id, ord)
     WHERE NOT EXISTS (SELECT 1 FROM unnest(written) AS w (id) WHERE w.id = u.id)
     ORDER BY u.ord LIMIT 1;
    RAISE EXCEPTION USING ERRCODE = 'CP001', MESSAGE = missing;
END
$$;

CREATE FUNCTION capstan_commit(
    in_ids text[], in_at bigint,
    run_ids text[], run_projects text[], run_contexts text[], run_stages text[],
    run_sequences text[], run_services text[], run_definitions text[], run_versions bigint[],
    run_statuses text[], run_results text[], run_created bigint[], run_updated bigint[],
    out_ids text[], out_topics text[], out_keys text[], out_payloads bytea[],
    cancel_runs text[], cancel_keys text[], cancel_guards bigint[],
    timer_runs text[], timer_keys text[], timer_fire bigint[], timer_payloads jsonb[],
    eval_runs text[], eval_tasks text[], eval_projects text[], eval_stages text[],
    eval_services text[], eval_results text[], eval_scores float8[], eval_bodies jsonb[],
    eval_created bigint[],
    expect_runs text[], expect_versions bigint[],
    ev_runs text[], ev_seqs bigint[], ev_ids text[], ev_kinds text[], ev_payloads jsonb[],
    ev_recorded bigint[]
) RETURNS bigint
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    got text[];
    bad record;
    n bigint := cardinality(ev_ids);
    top bigint := 0;
BEGIN
    IF cardinality(in_ids) > 0 THEN
        WITH written AS (
            INSERT INTO processed_inputs (id, processed_at_ms)
            SELECT u.id, in_at FROM unnest(in_ids) AS u (id)
            ON CONFLICT (id) DO NOTHING RETURNING processed_inputs.id)
        SELECT array_agg(id) INTO got FROM written;
        PERFORM capstan_refuse_missing(in_ids, got);
    END IF;

    IF cardinality(run_ids) > 0 THEN
        INSERT INTO runs (run_id, project, context_id, stage, sequence, service, definition,
                          definition_version, status, result, created_at_ms, updated_at_ms)
        SELECT * FROM unnest(run_ids, run_projects, run_contexts, run_stages, run_sequences,
                             run_services, run_definitions, run_versions, run_statuses,
                             run_results, run_created, run_updated)
        ON CONFLICT (run_id) DO UPDATE SET project = excluded.project,
            context_id = excluded.context_id, stage = excluded.stage,
            sequence = excluded.sequence, service = excluded.service,
            definition = excluded.definition, definition_version = excluded.definition_version,
            status = excluded.status, result = excluded.result,
            created_at_ms = excluded.created_at_ms, updated_at_ms = excluded.updated_at_ms;
    END IF;

    IF cardinality(out_ids) > 0 THEN
        -- ORDER BY the ordinality so the serial seq follows the batch order.
        INSERT INTO outbox (id, topic, key, payload)
        SELECT u.id, u.topic, u.key, u.payload
          FROM unnest(out_ids, out_topics, out_keys, out_payloads) WITH ORDINALITY
               AS u (id, topic, key, payload, ord)
         ORDER BY u.ord;
    END IF;

    -- Cancels before sets: a batch that cancels a timer and sets it again keeps the new one.
    IF cardinality(cancel_runs) > 0 THEN
        DELETE FROM timers t
         USING unnest(cancel_runs, cancel_keys, cancel_guards) AS c (run_id, key, guard)
         WHERE t.run_id = c.run_id AND t.key = c.key
           AND (c.guard IS NULL OR t.fire_at_ms = c.guard);
    END IF;

    IF cardinality(timer_runs) > 0 THEN
        INSERT INTO timers (run_id, key, fire_at_ms, payload)
        SELECT * FROM unnest(timer_runs, timer_keys, timer_fire, timer_payloads)
        ON CONFLICT (run_id, key) DO UPDATE SET fire_at_ms = excluded.fire_at_ms,
            payload = excluded.payload;
    END IF;

    IF cardinality(eval_runs) > 0 THEN
        INSERT INTO evaluations (run_id, task, project, stage, service, result, score,
                                 evaluation, created_at_ms)
        SELECT * FROM unnest(eval_runs, eval_tasks, eval_projects, eval_stages, eval_services,
                             eval_results, eval_scores, eval_bodies, eval_created)
        ON CONFLICT (run_id, task) DO NOTHING;
    END IF;

    IF cardinality(expect_runs) > 0 THEN
        UPDATE event_position SET last = last + n WHERE id = 1 RETURNING last INTO top;
        SELECT x.run, x.expected, x.actual INTO bad
          FROM (SELECT e.run, e.expected,
                       COALESCE((SELECT max(ev.seq) FROM events ev WHERE ev.run_id = e.run), 0)
                           AS actual
                  FROM unnest(expect_runs, expect_versions) WITH ORDINALITY
                       AS e (run, expected, ord)
                 ORDER BY e.ord) x
         WHERE x.actual <> x.expected
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'CP002', MESSAGE = bad.run,
                DETAIL = bad.expected || ' ' || bad.actual;
        END IF;
    END IF;

    IF n > 0 THEN
        WITH written AS (
            INSERT INTO events (position, run_id, seq, id, kind, payload, recorded_at_ms)
            SELECT top - n + u.ord, u.run_id, u.seq, u.id, u.kind, u.payload, u.recorded
              FROM unnest(ev_runs, ev_seqs, ev_ids, ev_kinds, ev_payloads, ev_recorded)
                   WITH ORDINALITY AS u (run_id, seq, id, kind, payload, recorded, ord)
            ON CONFLICT (id) DO NOTHING RETURNING events.id)
        SELECT array_agg(id) INTO got FROM written;
        PERFORM capstan_refuse_missing(ev_ids, got);
    END IF;
    RETURN top;
END
$$;

-- The processed input ids among `ids`: read before every batch. A plain `id = ANY($1)` planned
-- while the table was small keeps scanning the whole table; here only the primary key is used.
CREATE FUNCTION capstan_inputs_seen(ids text[]) RETURNS SETOF text
LANGUAGE sql STABLE
SET enable_seqscan = off
SET jit = off
AS $$ SELECT id FROM processed_inputs WHERE id = ANY(ids) $$;
