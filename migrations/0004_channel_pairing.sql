-- openpista storage, version 4: who may talk to the agent through a channel.
--
-- A user a channel does not know gets a pairing code (pending until it
-- expires); the owner approves it with `openpista telegram pair CODE`, which
-- moves the user to channel_users. Ids are the platform's, as text.

CREATE TABLE channel_pairings (
    channel      TEXT    NOT NULL,
    user_id      TEXT    NOT NULL,
    conversation TEXT    NOT NULL,
    code         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (channel, user_id),
    UNIQUE (channel, code)
);

CREATE TABLE channel_users (
    channel   TEXT    NOT NULL,
    user_id   TEXT    NOT NULL,
    paired_at INTEGER NOT NULL,
    PRIMARY KEY (channel, user_id)
);
