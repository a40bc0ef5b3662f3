-- Timer checkpoints: per runtime partition, the event position up to which every timer it set
-- is in the timers table or moot. A partition keeps short-lived timers in memory and writes
-- only those that live past a second; after a crash the runtime derives again the timers of
-- the runs with events after the lowest checkpoint (see src/runtime/recovery.rs).
CREATE TABLE timer_checkpoints (
    name     TEXT   PRIMARY KEY,
    position BIGINT NOT NULL
);
