-- Timer checkpoints (see the PostgreSQL migration of the same name).
CREATE TABLE timer_checkpoints (
    name     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
);
