-- The demo's business table: orders written together with their outbox events.
--
--   id          the order id, also the outbox aggregate_id of its events
--   customer_id who placed it
--   amount_cents the order total in cents
--   status      pending until the confirming events have been processed (never a premature success)
--   version     incremented on every change; consumers' version guard compares against it
--   created_at, updated_at
CREATE TABLE IF NOT EXISTS orders (
    id           uuid        PRIMARY KEY,
    customer_id  text        NOT NULL,
    amount_cents bigint      NOT NULL CHECK (amount_cents >= 0),
    status       text        NOT NULL DEFAULT 'pending',
    version      bigint      NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
