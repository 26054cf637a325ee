-- The transactional outbox.
--
-- A service writes its business row and one outbox row in the same transaction; the relays move
-- every committed outbox row to Kafka exactly once.
--
--   id             identity, increasing in insertion order (not in commit order: see txid)
--   event_id       the event's identity; consumers deduplicate on it
--   aggregate_type routes the event to a topic (template, default outbox.event.<aggregate_type>)
--   aggregate_id   the Kafka key: all events of one aggregate keep their order
--   event_type     the kind of event, copied into a Kafka header
--   payload        the Kafka record value, byte for byte as jsonb renders it
--   headers        optional extra Kafka headers (a JSON object of strings)
--   created_at     when the row was written
--   txid           the writing transaction's id (xid8). The polling relay reads only rows whose
--                  txid is below the snapshot's xmin: every such transaction has finished, so no
--                  row can later appear behind its cursor (txid, id).
CREATE TABLE IF NOT EXISTS outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id()
);

-- The polling relay's cursor scan: WHERE (txid, id) > ($1, $2) ORDER BY txid, id.
CREATE INDEX IF NOT EXISTS outbox_txid_id_idx ON outbox (txid, id);
-- The janitor's retention scan.
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);

-- The CDC relay reads inserts into the outbox through this publication. Updates and deletes are
-- published too so the relay can count (and ignore) them instead of never seeing them.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_pub') THEN
        CREATE PUBLICATION outbox_pub FOR TABLE outbox;
    END IF;
END
$$;
