"""Find and safely delete orphaned objects in S3-compatible storage."""
