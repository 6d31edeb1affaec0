-- Bucket change events (core/events.py): the receiver appends, bucket_inventory folds them in.
-- One stream per bucket: its sequence (seq of the last event), its epoch (bumped at every possible
-- gap: a receiver start, an event out of order, an event it could not store) and its liveness.
CREATE TABLE IF NOT EXISTS heimdall_storage_event_streams (
    bucket varchar(63) PRIMARY KEY,
    epoch bigint NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,
    gap_reason text NOT NULL,
    gap_at timestamptz NOT NULL,
    alive_until timestamptz NOT NULL,
    high_water timestamptz
);

CREATE TABLE IF NOT EXISTS heimdall_storage_bucket_events (
    bucket varchar(63) NOT NULL,
    seq bigint NOT NULL,
    event_id text NOT NULL,          -- digest of the source's record: a re-delivery is the same event
    key text NOT NULL,
    deleted boolean NOT NULL,
    size bigint NOT NULL,
    etag text NOT NULL,
    last_modified timestamptz NOT NULL,
    version_ns bigint NOT NULL,      -- orders one key's events: the server's sequencer or version time
    source varchar(16) NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, seq),
    CONSTRAINT heimdall_storage_bucket_events_identity UNIQUE (bucket, event_id)
);
