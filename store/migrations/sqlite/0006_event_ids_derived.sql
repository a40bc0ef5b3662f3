-- An event's id is `<run_id>:<seq>` (see `capstan_store::event_id`), already unique through
-- UNIQUE (run_id, seq): the column and its unique index go. Every append inserted into three
-- b-trees (the rows, the id index, the (run_id, seq) index), now into two, and each row is an id
-- shorter. SQLite cannot drop a UNIQUE column in place, so the table is copied once.

CREATE TABLE events_next (
    position       INTEGER PRIMARY KEY,
    run_id         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    kind           TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (run_id, seq)
);
INSERT INTO events_next (position, run_id, seq, kind, payload, recorded_at_ms)
SELECT position, run_id, seq, kind, payload, recorded_at_ms FROM events ORDER BY position;
DROP TABLE events;
ALTER TABLE events_next RENAME TO events;
