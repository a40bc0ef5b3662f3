-- An event's id is `<run_id>:<seq>` (see `capstan_store::event_id`), already unique through
-- UNIQUE (run_id, seq): the column and its unique index go, and capstan_commit takes no event
-- ids. CP001 (migration 0004) now only means an input id already recorded.

DROP FUNCTION capstan_commit(
    text[], bigint,
    text[], text[], text[], text[], text[], text[], text[], bigint[], text[], text[], bigint[], bigint[],
    text[], text[], text[], bytea[],
    text[], text[], bigint[],
    text[], text[], bigint[], jsonb[],
    text[], text[], text[], text[], text[], text[], float8[], jsonb[], bigint[],
    text[], bigint[],
    text[], bigint[], text[], text[], jsonb[], bigint[]);

ALTER TABLE events DROP COLUMN id;

-- capstan_read_streams (0005) returns SETOF events and so follows the table's new row type;
-- PostgreSQL drops the plans it cached for the old one.

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
    ev_runs text[], ev_seqs bigint[], ev_kinds text[], ev_payloads jsonb[],
    ev_recorded bigint[]
) RETURNS bigint
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    got text[];
    bad record;
    n bigint := cardinality(ev_runs);
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

    -- The version check above, under the position lock, leaves these seqs free.
    IF n > 0 THEN
        INSERT INTO events (position, run_id, seq, kind, payload, recorded_at_ms)
        SELECT top - n + u.ord, u.run_id, u.seq, u.kind, u.payload, u.recorded
          FROM unnest(ev_runs, ev_seqs, ev_kinds, ev_payloads, ev_recorded)
               WITH ORDINALITY AS u (run_id, seq, kind, payload, recorded, ord);
    END IF;
    RETURN top;
END
$$;
