-- openpista storage, version 1: sessions, their messages, and tool invocations.
--
-- Timestamps are INTEGER unix milliseconds (UTC) throughout.
-- Ids of sessions are validated `SessionId` text; message and invocation ids
-- are AUTOINCREMENT so they never repeat, even after deletes.

CREATE TABLE sessions (
    id          TEXT    PRIMARY KEY NOT NULL,
    channel     TEXT    NOT NULL,
    title       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE INDEX sessions_updated_at ON sessions (updated_at);

CREATE TABLE messages (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id         TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    role               TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content            TEXT    NOT NULL,
    -- JSON array of {id, name, arguments}; NULL when the message calls no tool.
    tool_calls         TEXT    CHECK (tool_calls IS NULL OR json_valid(tool_calls)),
    tool_call_id       TEXT,
    tool_name          TEXT,
    prompt_tokens      INTEGER CHECK (prompt_tokens IS NULL OR prompt_tokens >= 0),
    completion_tokens  INTEGER CHECK (completion_tokens IS NULL OR completion_tokens >= 0),
    created_at         INTEGER NOT NULL
);

CREATE INDEX messages_session_id ON messages (session_id, id);

CREATE TABLE tool_invocations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id   TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    message_id   INTEGER REFERENCES messages (id) ON DELETE SET NULL,
    call_id      TEXT    NOT NULL,
    tool_name    TEXT    NOT NULL,
    args         TEXT    NOT NULL,
    result       TEXT    NOT NULL,
    exit_code    INTEGER,
    duration_ms  INTEGER NOT NULL CHECK (duration_ms >= 0),
    outcome      TEXT    NOT NULL
                 CHECK (outcome IN ('ok', 'error', 'denied', 'timeout', 'cancelled')),
    created_at   INTEGER NOT NULL
);

CREATE INDEX tool_invocations_session_id ON tool_invocations (session_id, id);
CREATE INDEX tool_invocations_message_id ON tool_invocations (message_id);
