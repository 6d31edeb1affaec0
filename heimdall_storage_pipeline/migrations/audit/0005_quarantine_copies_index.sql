-- Which listed objects of a quarantine location a move put there (AuditLog.quarantine_copies), asked
-- once per listed page by the location's check and its expiry: by index, not a scan of the whole log.
-- Neither column changes after the intent, so marks stay HOT updates.
CREATE INDEX IF NOT EXISTS heimdall_storage_deletion_audit_quarantine
    ON heimdall_storage_deletion_audit (quarantine_bucket, quarantine_key) WHERE quarantine_key IS NOT NULL;
