-- Outbox of deleted Heimdall entities whose objects the storage pipeline must clean up.
-- Idempotent: applying it again changes nothing (IF NOT EXISTS, CREATE OR REPLACE, and the
-- triggers are dropped and re-created inside the same transaction). Apply with
-- `heimdall-storage migrate` (or psql -1 -f this file) as a role that may create triggers.

-- Serialise concurrent applications (e.g. two deploys at once).
SELECT pg_advisory_xact_lock(hashtext('heimdall.storage_cleanup_events'));

CREATE SCHEMA IF NOT EXISTS heimdall;

CREATE TABLE IF NOT EXISTS heimdall.storage_cleanup_events (
    id bigserial PRIMARY KEY,
    entity_type text NOT NULL,           -- 'synthetic_dataset' or 'audio'
    entity_id uuid NOT NULL,
    bucket text NOT NULL,
    prefixes text[] NOT NULL,            -- the object prefixes the entity owned
    deleted_at timestamptz NOT NULL DEFAULT now(),
    attempts int NOT NULL DEFAULT 0,     -- cleanup runs that failed for this event
    last_error text,
    processed_at timestamptz,            -- set only after a cleanup run succeeded
    processed_run_id text,
    processed_dry_run boolean
);

CREATE INDEX IF NOT EXISTS storage_cleanup_events_unprocessed
    ON heimdall.storage_cleanup_events (id) WHERE processed_at IS NULL;

CREATE OR REPLACE FUNCTION heimdall.storage_cleanup_record_synthetic_dataset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO heimdall.storage_cleanup_events (entity_type, entity_id, bucket, prefixes)
    VALUES ('synthetic_dataset', OLD.id, 'heimdall-synthetic-iq',
            ARRAY['synthetic/' || OLD.id::text || '/', 'synthetic/dataset-' || OLD.id::text || '/']);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION heimdall.storage_cleanup_record_audio() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO heimdall.storage_cleanup_events (entity_type, entity_id, bucket, prefixes)
    VALUES ('audio', OLD.id, 'heimdall-audio-chunks',
            ARRAY[OLD.id::text || '/', 'imported/' || OLD.id::text || '/']);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS storage_cleanup_after_delete ON heimdall.synthetic_datasets;
CREATE TRIGGER storage_cleanup_after_delete
    AFTER DELETE ON heimdall.synthetic_datasets
    FOR EACH ROW EXECUTE FUNCTION heimdall.storage_cleanup_record_synthetic_dataset();

DROP TRIGGER IF EXISTS storage_cleanup_after_delete ON heimdall.audio_library;
CREATE TRIGGER storage_cleanup_after_delete
    AFTER DELETE ON heimdall.audio_library
    FOR EACH ROW EXECUTE FUNCTION heimdall.storage_cleanup_record_audio();
