-- openpista storage, version 8: `audit_head` follows each appended audit row.
--
-- The writer used to update `audit_head` with a statement of its own after
-- each insert into `audit_log`; the trigger does it inside SQLite in the same
-- statement, which saves a round trip to the database per audit row. The
-- writer still reads the head first (in its write transaction) to chain the
-- new row's hash onto it, so a missing head still refuses the append.

CREATE TRIGGER audit_head_follows AFTER INSERT ON audit_log
BEGIN
    UPDATE audit_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
END;
