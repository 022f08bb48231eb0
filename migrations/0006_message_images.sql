-- openpista storage, version 6: images a tool produced.
--
-- `images` is a JSON array of absolute paths (e.g. a screen capture) on a
-- tool message, NULL when there are none. Only paths are stored, never bytes.

ALTER TABLE messages ADD COLUMN images TEXT;
