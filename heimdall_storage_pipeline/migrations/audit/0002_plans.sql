-- Plan and apply: the plan a deletion applied, and each plan's one application.
ALTER TABLE heimdall_storage_deletion_audit ADD COLUMN IF NOT EXISTS plan_id text;

CREATE TABLE IF NOT EXISTS heimdall_storage_plan_applications (
    plan_id text PRIMARY KEY,
    bucket varchar(63) NOT NULL,
    run_id varchar(64) NOT NULL,
    applied_at timestamptz NOT NULL
);
