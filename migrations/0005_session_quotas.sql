-- openpista storage, version 5: session control and quotas.
--
-- A suspended session refuses new turns until `openpista sessions resume`;
-- the reason says why (an operator, or a burst of failed tool calls).
-- session_token_usage counts the model tokens a session spent per UTC day,
-- so `[quotas] tokens_per_day` survives a restart.

ALTER TABLE sessions ADD COLUMN suspended_reason TEXT;

CREATE TABLE session_token_usage (
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    day        TEXT    NOT NULL,
    tokens     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, day)
);
