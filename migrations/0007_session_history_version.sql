-- openpista storage, version 7: a version number for each session's history.
--
-- A session starts at a random `history_version`, and every append adds the
-- number of messages it appended, in the same transaction as the insert.
-- A process that keeps a session's recent history in memory compares the
-- version an append returns with the one it expects, and so notices messages
-- written by anyone else, or a session deleted and created again under the
-- same id (which starts at a new random version).

ALTER TABLE sessions ADD COLUMN history_version INTEGER NOT NULL DEFAULT 0;

UPDATE sessions SET history_version = abs(random() % 4503599627370496);
