-- openpista storage, version 3: scheduled (cron) jobs and their runs.
--
-- A run is claimed by inserting its row under the UNIQUE (job_id, scheduled_at)
-- key *before* the job starts, so an occurrence runs at most once, also across
-- restarts and with two schedulers on one database. `scheduled_at` is the
-- occurrence (unix ms, UTC); a manual `cron run` uses the time it was asked.

CREATE TABLE cron_jobs (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    expr                 TEXT    NOT NULL,
    tz                   TEXT    NOT NULL,
    target               TEXT    NOT NULL,
    prompt               TEXT    NOT NULL,
    paused               INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    consecutive_failures INTEGER NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    max_failures         INTEGER NOT NULL DEFAULT 3 CHECK (max_failures >= 1),
    missed_policy        TEXT    NOT NULL DEFAULT 'skip' CHECK (missed_policy IN ('skip', 'run_once')),
    created_at           INTEGER NOT NULL
);

CREATE TABLE cron_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       INTEGER NOT NULL REFERENCES cron_jobs (id) ON DELETE CASCADE,
    scheduled_at INTEGER NOT NULL,
    trigger      TEXT    NOT NULL CHECK (trigger IN ('schedule', 'catch_up', 'manual')),
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('running', 'ok', 'error', 'cancelled')),
    error        TEXT,
    UNIQUE (job_id, scheduled_at)
);

CREATE INDEX cron_runs_job_id ON cron_runs (job_id, scheduled_at);
