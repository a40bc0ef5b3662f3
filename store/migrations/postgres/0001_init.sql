-- Capstan store schema for PostgreSQL. Event positions come from the single-row counter
-- event_position: a commit that appends increments it first, which row-locks it until the
-- commit ends. Appending commits are therefore serialized and positions become visible in
-- order without gaps, so a read_all watcher never skips a position that commits late.

CREATE TABLE event_position (
    id   SMALLINT PRIMARY KEY CHECK (id = 1),
    last BIGINT   NOT NULL
);
INSERT INTO event_position (id, last) VALUES (1, 0);

CREATE TABLE events (
    position       BIGINT PRIMARY KEY,
    run_id         TEXT   NOT NULL,
    seq            BIGINT NOT NULL,
    id             TEXT   NOT NULL UNIQUE,
    kind           TEXT   NOT NULL,
    payload        JSONB  NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    UNIQUE (run_id, seq)
);

CREATE TABLE processed_inputs (
    id TEXT PRIMARY KEY
);

CREATE TABLE runs (
    run_id             TEXT PRIMARY KEY,
    project            TEXT   NOT NULL,
    context_id         TEXT   NOT NULL,
    stage              TEXT   NOT NULL,
    sequence           TEXT   NOT NULL,
    service            TEXT,
    definition         TEXT   NOT NULL,
    definition_version BIGINT NOT NULL,
    status             TEXT   NOT NULL,
    result             TEXT,
    created_at_ms      BIGINT NOT NULL,
    updated_at_ms      BIGINT NOT NULL
);
CREATE INDEX runs_created ON runs (created_at_ms DESC, run_id DESC);
CREATE INDEX runs_project ON runs (project, created_at_ms DESC, run_id DESC);
CREATE INDEX runs_stage ON runs (project, stage, sequence);
CREATE INDEX runs_service ON runs (service);
CREATE INDEX runs_unfinished ON runs (created_at_ms, run_id) WHERE status NOT IN ('finished', 'cancelled');
CREATE INDEX runs_status ON runs (status);
CREATE INDEX runs_context ON runs (context_id);

CREATE TABLE outbox (
    seq     BIGSERIAL PRIMARY KEY,
    id      TEXT  NOT NULL,
    topic   TEXT  NOT NULL,
    key     TEXT  NOT NULL,
    payload BYTEA NOT NULL
);

CREATE TABLE timers (
    run_id     TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    fire_at_ms BIGINT NOT NULL,
    payload    JSONB  NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX timers_fire_at ON timers (fire_at_ms);

CREATE TABLE definitions (
    project       TEXT   NOT NULL,
    name          TEXT   NOT NULL,
    version       BIGINT NOT NULL,
    source        TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (project, name, version)
);
