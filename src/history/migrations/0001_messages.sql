-- Every published message, keyed by room and seq. The body is `json`, not
-- `jsonb`: json keeps the exact text the sender sent (PROTOCOL.md section 3),
-- and casts to jsonb for queries.
CREATE TABLE messages (
    room   text        NOT NULL,
    seq    bigint      NOT NULL,
    sender text        NOT NULL,
    ts     timestamptz NOT NULL,
    body   json        NOT NULL,
    PRIMARY KEY (room, seq)
);

-- Each room's current epoch, so a restart can continue its sequence.
CREATE TABLE rooms (
    room  text PRIMARY KEY,
    epoch text NOT NULL
);

-- Whether a single node stopped cleanly (its write-behind queue written out).
CREATE TABLE nodes (
    name  text PRIMARY KEY,
    clean boolean NOT NULL
);
