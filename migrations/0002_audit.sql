-- openpista storage, version 2: the tamper-evident audit trail.
--
-- Every row carries `hash` = SHA-256 over a length-prefixed encoding of
-- (seq, at, session_id, actor, action, detail, prev_hash), and `prev_hash` =
-- the previous row's hash (64 zeros for the first), so editing, deleting or
-- reordering rows breaks the chain. `audit_head` holds the newest (seq, hash),
-- updated in the same transaction as each append, so deleting the last rows
-- is detected too. `session_id` has no foreign key on purpose: deleting a
-- session must not delete (and so break) its audit rows.

CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    session_id TEXT,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    detail     TEXT    NOT NULL,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL
);

CREATE INDEX audit_log_session_id ON audit_log (session_id, seq);

CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT    NOT NULL
);

INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
