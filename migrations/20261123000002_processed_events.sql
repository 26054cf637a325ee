-- Consumer-side deduplication.
--
-- A consumer inserts (consumer, event_id) first, in the same transaction as the event's effect.
-- A unique violation means the event was already applied: the consumer rolls back and counts a
-- dedup hit. Because the row commits with the effect, "applied" and "recorded as applied" can
-- never disagree.
--
--   consumer      the consumer group's name (each downstream deduplicates on its own)
--   event_id      the outbox event_id
--   processed_at  when the effect committed
CREATE TABLE IF NOT EXISTS processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
