-- Consumers with exactly-once effects: the message ids each consumer has processed, and the
-- last position it applied. Both are written in the consumer's own transaction, together with
-- its read model, while it holds its advisory lock.
CREATE TABLE "__SCHEMA__".inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE TABLE "__SCHEMA__".checkpoints (
    consumer   text        PRIMARY KEY,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
