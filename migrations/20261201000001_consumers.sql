-- The consumers' own state: the version guard and the effects of the order pipeline's downstreams.
--
-- Every effect below is written in the same transaction as its `processed_events` row (see
-- 20261123000002), so an effect and the record that it was applied commit together or not at all.

-- Version guard: per consumer and entity, the highest version applied.
--
--   consumer    the consumer group's name (each downstream guards on its own)
--   entity      the entity the version belongs to (an account id, an order id)
--   version     the highest version whose event took effect; older or equal ones are skipped
--   updated_at  when it last advanced
CREATE TABLE IF NOT EXISTS consumer_versions (
    consumer   text        NOT NULL,
    entity     text        NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, entity)
);

-- Payment: one row per charge the payment consumer recorded. Deliberately no unique key on
-- order_id: a naive consumer's double charges must be visible here too (the gateway's ledger is
-- the authoritative evidence).
--
--   order_id     the order paid for
--   charge_id    the gateway's charge id
--   amount_cents what was charged
--   consumer     which payment consumer recorded it
CREATE TABLE IF NOT EXISTS payments (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id     text        NOT NULL,
    charge_id    text        NOT NULL,
    amount_cents bigint      NOT NULL,
    consumer     text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payments_order_id_idx ON payments (order_id);

-- Inventory: stock per SKU never goes negative (the CHECK is the last line of defence; the
-- consumer's conditional UPDATE is the first), and an order reserves a SKU at most once.
--
--   quantity  units on hand
CREATE TABLE IF NOT EXISTS inventory_stock (
    sku      text   PRIMARY KEY,
    quantity bigint NOT NULL CHECK (quantity >= 0)
);
--   status  'reserved' (stock decremented) or 'rejected' (not enough stock; nothing decremented)
CREATE TABLE IF NOT EXISTS inventory_reservations (
    order_id   text        NOT NULL,
    sku        text        NOT NULL,
    quantity   bigint      NOT NULL CHECK (quantity > 0),
    status     text        NOT NULL CHECK (status IN ('reserved', 'rejected')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);

-- Notification: an outbox of sent notifications, one per order (the primary key says so). A
-- sender process delivers rows with sent_at NULL; the consumer only records the intent.
CREATE TABLE IF NOT EXISTS notifications (
    order_id    text        PRIMARY KEY,
    customer_id text        NOT NULL,
    template    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);

-- Loyalty: points per customer (one point per whole currency unit ordered).
CREATE TABLE IF NOT EXISTS loyalty_points (
    customer_id text        PRIMARY KEY,
    points      bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Recommendations: how often a customer ordered a SKU.
CREATE TABLE IF NOT EXISTS recommendation_signals (
    customer_id text   NOT NULL,
    sku         text   NOT NULL,
    weight      bigint NOT NULL,
    PRIMARY KEY (customer_id, sku)
);

-- Warehouse: pick requests, written in batches (about 200 ms of orders per transaction).
--
--   batch_id  the batch (one transaction) the pick was written in
CREATE TABLE IF NOT EXISTS warehouse_picks (
    order_id   text        PRIMARY KEY,
    batch_id   uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Fraud audit: an append-only log of every order event seen. UPDATE and DELETE are refused by
-- a trigger, so the log cannot be rewritten by the consumer or by mistake.
CREATE TABLE IF NOT EXISTS fraud_audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL,
    order_id     text        NOT NULL,
    event_type   text        NOT NULL,
    amount_cents bigint,
    flagged      boolean     NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION fraud_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fraud_audit_log is append-only';
END
$$;
DROP TRIGGER IF EXISTS fraud_audit_log_append_only ON fraud_audit_log;
CREATE TRIGGER fraud_audit_log_append_only BEFORE UPDATE OR DELETE ON fraud_audit_log
    FOR EACH ROW EXECUTE FUNCTION fraud_audit_log_append_only();

-- Account balance: the balance per account as the account consumer applied it.
--
--   balance_cents   the current balance
--   applied_events  how many events changed it (skipped ones are not counted)
CREATE TABLE IF NOT EXISTS account_balances (
    account_id     text        PRIMARY KEY,
    balance_cents  bigint      NOT NULL,
    applied_events bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
