-- Processed-input ids remember when they were committed, so that they can be pruned once no
-- redelivery can bring them back (the runtime's input retention). Rows written before this
-- migration get 0: they are the oldest and pruned first.

ALTER TABLE processed_inputs ADD COLUMN processed_at_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX processed_inputs_at ON processed_inputs (processed_at_ms);
