-- Versioned buckets and quarantine: the version ids a delete removed, and where a moved object went.
ALTER TABLE heimdall_storage_deletion_audit ADD COLUMN IF NOT EXISTS version_ids text[];
ALTER TABLE heimdall_storage_deletion_audit ADD COLUMN IF NOT EXISTS quarantine_bucket text;
ALTER TABLE heimdall_storage_deletion_audit ADD COLUMN IF NOT EXISTS quarantine_key text;
