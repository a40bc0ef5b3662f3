-- Capstan store schema for SQLite. Positions are assigned by the single writer inside its
-- transaction (max + 1), so they follow commit order without gaps.

CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    run_id         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    id             TEXT    NOT NULL UNIQUE,
    kind           TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (run_id, seq)
);

CREATE TABLE processed_inputs (
    id TEXT PRIMARY KEY
) WITHOUT ROWID;

CREATE TABLE runs (
    run_id             TEXT PRIMARY KEY,
    project            TEXT    NOT NULL,
    context_id         TEXT    NOT NULL,
    stage              TEXT    NOT NULL,
    sequence           TEXT    NOT NULL,
    service            TEXT,
    definition         TEXT    NOT NULL,
    definition_version INTEGER NOT NULL,
    status             TEXT    NOT NULL,
    result             TEXT,
    created_at_ms      INTEGER NOT NULL,
    updated_at_ms      INTEGER NOT NULL
);
CREATE INDEX runs_created ON runs (created_at_ms DESC, run_id DESC);
CREATE INDEX runs_project ON runs (project, created_at_ms DESC, run_id DESC);
CREATE INDEX runs_stage ON runs (project, stage, sequence);
CREATE INDEX runs_service ON runs (service);
CREATE INDEX runs_status ON runs (status);
CREATE INDEX runs_context ON runs (context_id);

CREATE TABLE outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    id      TEXT NOT NULL,
    topic   TEXT NOT NULL,
    key     TEXT NOT NULL,
    payload BLOB NOT NULL
);

CREATE TABLE timers (
    run_id     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    fire_at_ms INTEGER NOT NULL,
    payload    TEXT    NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE INDEX timers_fire_at ON timers (fire_at_ms);

CREATE TABLE definitions (
    project       TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    source        TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (project, name, version)
) WITHOUT ROWID;
