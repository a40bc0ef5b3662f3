-- Results of quality gates, per project, stage and service (service '' for runs without one):
-- the baseline of Keptn's relative criteria. Written by the same batch as the task's end.

CREATE TABLE evaluations (
    seq           BIGSERIAL PRIMARY KEY,
    run_id        TEXT             NOT NULL,
    task          TEXT             NOT NULL,
    project       TEXT             NOT NULL,
    stage         TEXT             NOT NULL,
    service       TEXT             NOT NULL,
    result        TEXT             NOT NULL,
    score         DOUBLE PRECISION,
    evaluation    JSONB            NOT NULL,
    created_at_ms BIGINT           NOT NULL,
    UNIQUE (run_id, task)
);
CREATE INDEX evaluations_lane ON evaluations (project, stage, service, seq DESC);
